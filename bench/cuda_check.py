"""The fast backend on CUDA (compiled layers, CUDA graphs, steps queued ahead) against the eager one
(each step read before the next), on tiny random models in float32: every mode, trees, token-conditioned
heads, the block drafter (plain and --block-tc) and sampling (same seed), same tokens and stats; the same
with a second threshold on the same graphs; and --exact (fast backend only) verify against --exact ar, in bf16.

    python bench/cuda_check.py            # prints one line per mode and model; exits 1 on a difference
    python bench/cuda_check.py --compile  # on a CPU: the same with the compiled step (inductor's C++ backend)

The unit tests run the fast backend on the CPU without graphs; this is what they cannot: capture.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import randomize, tiny_llama, tiny_qwen, with_rank_probs  # noqa: E402

from collocate.block import BlockConfig  # noqa: E402
from collocate.bundle import MTPBundle  # noqa: E402
from collocate.decode import DecodeConfig  # noqa: E402
from collocate.engine import build_decoder  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (a CPU dry run checks the script, not graphs)
CONFIGS = [dict(mode="ar"), dict(mode="verify"), dict(mode="verify", candidates=5), dict(mode="verify", adaptive=True),
           dict(mode="verify", adaptive=True, threshold=0.3), dict(mode="clp"), dict(mode="clp", threshold=0.5),
           dict(mode="clp", threshold=0.9), dict(mode="gate", threshold=0.0), dict(mode="gate"),
           dict(mode="compete", threshold=0.0), dict(mode="compete", threshold=0.5), dict(mode="verify", tree_size=16),
           dict(mode="ar", temperature=0.8, top_p=0.9, seed=2), dict(mode="verify", temperature=0.8, seed=1, tree_size=16),
           dict(mode="verify", temperature=0.7, top_k=20, seed=3, candidates=4)]
TOKEN_CONFIGS = [dict(mode="verify"), dict(mode="verify", tree_size=24), dict(mode="verify", adaptive=True),
                 dict(mode="clp", threshold=0.5), dict(mode="verify", temperature=0.8, seed=4, tree_size=24)]
EXACT_CONFIGS = [dict(mode="verify"), dict(mode="verify", tree_size=15), dict(mode="verify", candidates=5),
                 dict(mode="verify", tree_size=31, exact_width=32), dict(mode="verify", tree_size=48, tree_depth=3, exact_width=64)]
BLOCK_CONFIGS = [dict(mode="verify"), dict(mode="verify", tree_size=24), dict(mode="verify", tree_size=24, tree_depth=3),
                 dict(mode="verify", adaptive=True), dict(mode="clp", threshold=0.5),
                 dict(mode="verify", temperature=0.8, seed=4, tree_size=24)]


def bundle_of(model, drafter: str) -> MTPBundle:
    """A random bundle of this drafter (a block drafter, "block" or "block-tc" (`--block-tc`): block size 6,
    its default layers)."""
    block = BlockConfig.for_backbone(model, block_size=6, token_cond=drafter == "block-tc").as_dict() \
        if drafter.startswith("block") else {}
    bundle = MTPBundle.for_backbone(model, k=6 if block else 4, base_model="tiny", has_gates=not block,
                                    drafter="block" if block else drafter, compete=drafter == "heads", block=block)
    randomize(bundle, seed=3, scale=4.0)
    bundle.clp = randomize(bundle.clp, seed=4, scale=20.0)
    return with_rank_probs(bundle)


def compare(name, eager, fast, prompts, configs) -> int:
    bad = 0
    for kw in configs:
        cfg = DecodeConfig(max_new_tokens=48, **kw)
        same = 0
        for p in prompts:
            a, b = eager.generate(p, cfg), fast.generate(p, cfg)
            same += a.tokens == b.tokens and a.stats.counts() == b.stats.counts()
        bad += same != len(prompts)
        print(f"{name:<22} {str(kw):<55} same tokens and stats {same}/{len(prompts)}")
    return bad


def exact(name, model, bundle, prompts, compile_on) -> int:
    """bf16, fast backend: verify --exact gives ar --exact's tokens."""
    fast = build_decoder(model.to(torch.bfloat16), bundle=bundle, engine="fast", eos_token_ids=[2], max_len=256,
                         compile=compile_on)
    bad = 0
    for kw in EXACT_CONFIGS:
        width = dict(exact_width=kw["exact_width"]) if "exact_width" in kw else {}  # ar at the tree's width
        same = sum(fast.generate(p, DecodeConfig(max_new_tokens=48, exact=True, **kw)).tokens ==
                   fast.generate(p, DecodeConfig(max_new_tokens=48, exact=True, **width)).tokens for p in prompts)
        bad += same != len(prompts)
        print(f"{name:<22} bf16 --exact {str(kw):<42} same tokens as ar --exact {same}/{len(prompts)}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="compile the fast backend's step on a CPU too "
                    "(on CUDA it always compiles)")
    compile_on = ap.parse_args().compile or None  # None: the backend's default (compile on CUDA)
    bad = 0
    for make in (tiny_llama, tiny_qwen):
        model = make().to(DEVICE)
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (4,), generator=g)]
        for drafter, configs in (("heads", CONFIGS), ("tc-shared", TOKEN_CONFIGS), ("block", BLOCK_CONFIGS),
                                 ("block-tc", BLOCK_CONFIGS)):
            bundle = bundle_of(model, drafter)
            # the reference reads every step before the next (overlap off); the fast backend queues ar's and
            # verify's next step ahead, as it runs by default on CUDA (on a CPU dry run, forced on)
            eager = build_decoder(model, bundle=bundle, engine="eager", eos_token_ids=[2], overlap=False)
            fast = build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[2], max_len=256,
                                 compile=compile_on, overlap=True)
            name = f"{make.__name__} {drafter}"
            bad += compare(name, eager, fast, prompts, configs)
            print(f"{name}: {fast.backend.describe()}, {len(fast.backend.graphs)} graphs")
        bad += exact(make.__name__, model, bundle_of(model, "tc-shared"), prompts, compile_on)
        for drafter in ("block", "block-tc"):
            bad += exact(f"{make.__name__} {drafter}", model, bundle_of(model, drafter), prompts, compile_on)
    return 1 if bad else 0

if __name__ == "__main__":
    sys.exit(main())
