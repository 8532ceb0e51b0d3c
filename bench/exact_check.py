"""--exact on the device: verify (chain, trees up to 48 nodes at their widths) against ar --exact at the
same width, in bf16 with the fast backend's compiled step and CUDA graphs, on both tiny models with random
heads and a random block drafter, plain and --block-tc (bench/cuda_check.py's `exact` part alone, for a
short GPU call).

    python bench/exact_check.py                  # one line per configuration; exit status 1 if any differs
    python bench/exact_check.py --shared-layout  # the counterfactual: every row, ar's too, reads the cache's
                                                 # slots as they lie (the plain attention, at the same widths
                                                 # and attention length), off-chain nodes kept
    python bench/exact_check.py [--shared-layout] -- bench --model ... --exact ...   # a `collocate` command
"""
import sys

import torch

import cuda_check as c


def shared_layout() -> None:
    """--exact without `fast.exact_attention`: the forward is told no step is exact (the rule still feeds
    every step at --exact-width and reads one attention length)."""
    from collocate import fast
    forward = fast.StaticBackend.forward

    def shared(self, ids, pos0, tree, attn_len=None, *, taps=(), exact=False):
        return forward(self, ids, pos0, tree, attn_len, taps=taps, exact=False)

    fast.StaticBackend.forward = shared


def tiny_checks() -> int:
    bad = 0
    for make in (c.tiny_llama, c.tiny_qwen):
        model = make().to(c.DEVICE)
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (4,), generator=g)]
        for drafter in ("heads", "block", "block-tc"):
            bad += c.exact(f"{make.__name__} {drafter}", model, c.bundle_of(model, drafter), prompts, None)
    return bad


if __name__ == "__main__":
    args = sys.argv[1:]
    command = args[args.index("--") + 1:] if "--" in args else None
    if "--shared-layout" in (args[:args.index("--")] if command is not None else args):
        shared_layout()
    if command is not None:
        from collocate import cli
        sys.exit(cli.main(command))
    sys.exit(1 if tiny_checks() else 0)
