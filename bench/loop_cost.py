"""The whole decode loop's speed on a random-weight Qwen2.5 shape, for comparing two trees on one GPU: tok/s
and ms per step of `ar`, chain `verify` and a token-conditioned tree, host loop included, and the tokens,
which two trees must agree on (run it with PYTHONPATH at each; both need collocate.engine.build_decoder).

    python bench/loop_cost.py --shape 1.5b --out loop_new.json
    (cd bench && PYTHONPATH=OLD python loop_cost.py --shape 1.5b --out loop_old.json)
    python bench/loop_cost.py --compare loop_old.json loop_new.json

Random weights give honest step timings (tau near 1: each step's cost is what is compared); no EOS is
set, so every answer is --new tokens long. The cache is --max-len slots in both trees.
"""
import argparse
import json
import re
import statistics

import torch

from collocate.decode import DecodeConfig
from collocate.engine import build_decoder

from step_cost import build, random_bundle

MODES = {"ar": ("heads", 0, 4, dict(mode="ar")), "verify": ("heads", 0, 4, dict(mode="verify")),
         "verify-t48d3 (tc-shared, k=6)": ("tc-shared", 32768, 6, dict(mode="verify", tree_size=48, tree_depth=3)),
         "verify (block, k=16)": ("block", 32768, 16, dict(mode="verify")),
         "verify-t48d6 (block, k=16)": ("block", 32768, 16, dict(mode="verify", tree_size=48, tree_depth=6)),
         "verify-t48d3 (block, k=16)": ("block", 32768, 16, dict(mode="verify", tree_size=48, tree_depth=3)),
         "verify (block-tc, k=16)": ("block-tc", 32768, 16, dict(mode="verify")),
         "verify-t48d3 (block-tc, k=16)": ("block-tc", 32768, 16, dict(mode="verify", tree_size=48, tree_depth=3)),
         # --exact: every step 16 rows wide over one attention length per request (the cache has --max-len slots)
         "ar --exact": ("heads", 0, 4, dict(mode="ar", exact=True)),
         "verify --exact (block, k=16)": ("block", 32768, 16, dict(mode="verify", exact=True))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two results: speed ratios, same tokens?")
    ap.add_argument("--only", help="a regular expression of the modes to run (a tree before the block drafter: "
                                   "'tc-shared|^ar$|^verify$')")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.compare:
        old, new = (json.load(open(f)) for f in args.compare)
        for mode in new["modes"]:
            o, n = old["modes"][mode], new["modes"][mode]
            tok_s = lambda r: statistics.mean(x["tok_per_s"] for x in r["runs"])  # noqa: E731
            print(f"{mode}: new/old tok/s {tok_s(n) / tok_s(o):.3f} ({tok_s(o):.1f} -> {tok_s(n):.1f}), "
                  f"same tokens {o['tokens'] == n['tokens']}")
        return
    model = build(args.shape)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(32, 400, (args.prompts,), generator=g)]
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(), "new_tokens": args.new, "modes": {}}
    for name, (drafter, vocab, k, kw) in MODES.items():
        if args.only and not re.search(args.only, name):
            continue
        torch.manual_seed(1)
        bundle = random_bundle(model, drafter, vocab, k)
        dec = build_decoder(model, None, bundle, engine="fast", eos_token_ids=[], max_len=args.max_len)
        cfg = DecodeConfig(max_new_tokens=args.new, **kw)
        dec.generate(prompts[0], cfg)  # compile and capture
        runs, tokens = [], None
        for _ in range(args.repeats):
            answers = [dec.generate(p, cfg) for p in prompts]
            stats = [a.stats for a in answers]
            tokens = tokens or [a.tokens for a in answers]
            runs.append({"tok_per_s": sum(s.new_tokens for s in stats) / sum(s.seconds for s in stats),
                         "ms_per_step": statistics.median(1000 * s.seconds / s.steps for s in stats),
                         "tau": sum(s.new_tokens for s in stats) / sum(s.steps for s in stats)})
        result["modes"][name] = {"runs": runs, "tokens": tokens}
        print(name, json.dumps(runs), flush=True)
        del dec, bundle
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
