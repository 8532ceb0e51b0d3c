"""The fast backend on CUDA (compiled layers, CUDA graphs) against the eager one, on tiny random models
in float32: every mode, same tokens and stats; and the same with a second threshold on the same graphs.

    python bench/cuda_check.py      # prints one line per mode and model; exits 1 on a difference

The unit tests run the fast backend on the CPU without graphs; this is what they cannot: capture.
"""
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import randomize, tiny_llama, tiny_qwen  # noqa: E402

from collocate.bundle import MTPBundle  # noqa: E402
from collocate.decode import DecodeConfig  # noqa: E402
from collocate.engine import build_decoder  # noqa: E402

CONFIGS = [dict(mode="ar"), dict(mode="verify"), dict(mode="verify", candidates=5), dict(mode="verify", adaptive=True),
           dict(mode="verify", adaptive=True, threshold=0.3), dict(mode="clp"), dict(mode="clp", threshold=0.5),
           dict(mode="clp", threshold=0.9), dict(mode="gate", threshold=0.0), dict(mode="gate"),
           dict(mode="compete", threshold=0.0), dict(mode="compete", threshold=0.5)]


def main() -> int:
    bad = 0
    for make in (tiny_llama, tiny_qwen):
        model = make().cuda()
        bundle = randomize(MTPBundle.for_backbone(model, k=4, base_model="tiny", has_gates=True, compete=True),
                           seed=3, scale=4.0)
        bundle.clp = randomize(bundle.clp, seed=4, scale=20.0)
        eager = build_decoder(model, bundle=bundle, engine="eager", eos_token_ids=[2])
        fast = build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[2], max_len=256)
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (4,), generator=g)]
        for kw in CONFIGS:
            cfg = DecodeConfig(max_new_tokens=48, **kw)
            same = 0
            for p in prompts:
                a, b = eager.generate(p, cfg), fast.generate(p, cfg)
                same += a.tokens == b.tokens and dataclasses.replace(a.stats, seconds=0) == dataclasses.replace(b.stats, seconds=0)
            bad += same != len(prompts)
            print(f"{make.__name__:<11} {str(kw):<55} same tokens and stats {same}/{len(prompts)}")
        print(f"{make.__name__}: {fast.backend.describe()}, {len(fast.backend.graphs)} graphs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
