"""--exact on the device: verify (chain, trees up to 48 nodes at their widths) against ar --exact at the
same width, in bf16 with the fast backend's compiled step and CUDA graphs, on both tiny models with random
heads and a random block drafter (bench/cuda_check.py's `exact` part alone, for a short GPU call).

    python bench/exact_check.py        # prints one line per configuration; exit status 1 if any differs
    python bench/exact_check.py --shared-layout   # the counterfactual: tree rows read the feed's slots as
                                                  # they lie (the plain tree attention), off-chain nodes kept
"""
import sys

import torch

import cuda_check as c

if __name__ == "__main__":
    if "--shared-layout" in sys.argv:
        from collocate import fast
        forward = fast.StaticBackend.forward

        def shared(self, ids, pos0, tree, attn_len=None, *, taps=(), exact=False):
            return forward(self, ids, pos0, tree, attn_len, taps=taps, exact=exact and tree.is_chain)

        fast.StaticBackend.forward = shared
    bad = 0
    for make in (c.tiny_llama, c.tiny_qwen):
        model = make().to(c.DEVICE)
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (4,), generator=g)]
        for drafter in ("heads", "block"):
            bad += c.exact(f"{make.__name__} {drafter}", model, c.bundle_of(model, drafter), prompts, None)
    sys.exit(1 if bad else 0)
