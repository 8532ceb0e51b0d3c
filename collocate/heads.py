"""MTP heads: residual blocks on the backbone's last hidden state, decoded by its own frozen LM head.

    heads = MTPHeads(hidden=576, k=4)          # offsets +2, +3, +4
    logits = heads.logits(h, lm_head)         # (B, T, k-1, V), one matmul through the LM head

Backbone-as-Architect: the backbone's LM head picks token t+1; head j predicts token t+j for
j = 2..k. `compete=True` adds a head for +1, the head-competition baseline the paper beats.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """x + SiLU(W x + b), zero-initialised so a fresh head is the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class MTPHeads(nn.Module):
    def __init__(self, hidden: int, k: int, *, layers: int = 1, compete: bool = False):
        super().__init__()
        if k < 2:
            raise ValueError(f"k must be >= 2 (k=1 means no heads), got {k}")
        self.hidden, self.k, self.layers, self.compete = hidden, k, layers, compete
        first = 1 if compete else 2
        self.offsets = list(range(first, k + 1))
        # one independent stack per offset: never `[ResBlock(h)] * n`, which would share weights
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(layers)]) for _ in self.offsets
        )

    @property
    def n_heads(self) -> int:
        return len(self.offsets)

    def forward(self, h: torch.Tensor, *, with_first: bool = True) -> torch.Tensor:
        """(..., d) hidden -> (..., n_heads, d) head states, ready for the LM head.
        with_first=False leaves out a +1 (competition) head, for every mode but `compete`."""
        blocks = self.blocks if with_first or not self.compete else self.blocks[1:]
        x = h.to(self.blocks[0][0].linear.weight.dtype)
        return torch.stack([block(x) for block in blocks], dim=-2)

    def logits(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """(..., d) -> (..., n_heads, V): all heads through the shared LM head in one matmul."""
        return lm_head(self(h).to(lm_head.weight.dtype))
