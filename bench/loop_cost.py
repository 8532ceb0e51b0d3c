"""The whole decode loop's speed on a random-weight Qwen2.5 shape: ar tok/s and ms per step for ar and
verify, host loop included, for comparing two trees (run it with PYTHONPATH at each; both must have
collocate.engine.build_decoder, as every tree since the one decode loop has).

    python bench/loop_cost.py --shape 1.5b --out loop_new.json
    (cd OLD/bench && PYTHONPATH=OLD python ../../bench/loop_cost.py --shape 1.5b --out loop_old.json)

Random weights give honest step timings; no EOS is set, so every answer is --new tokens long.
"""
import argparse
import json
import statistics

import torch

from collocate.bundle import MTPBundle
from collocate.decode import DecodeConfig
from collocate.engine import build_decoder

from step_cost import build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = build(args.shape)
    dec = build_decoder(model, None, MTPBundle.for_backbone(model, k=4, base_model="random weights"), engine="fast",
                        eos_token_ids=[])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(32, 400, (args.prompts,), generator=g)]
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(), "new_tokens": args.new}
    for mode in ("ar", "verify"):
        cfg = DecodeConfig(mode=mode, max_new_tokens=args.new)
        dec.generate(prompts[0], cfg)  # compile and capture
        runs = []
        for _ in range(args.repeats):
            stats = [dec.generate(p, cfg).stats for p in prompts]
            runs.append({"tok_per_s": sum(s.new_tokens for s in stats) / sum(s.seconds for s in stats),
                         "ms_per_step": statistics.median(1000 * s.seconds / s.steps for s in stats)})
        result[mode] = runs
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
