"""Acceptance policies: how many head tokens to accept after the backbone's own token.

    clp = CLP(hidden=1536, k=4)                # 6,148 parameters
    n = clp.accept(h, head_logits, threshold=0.6)

Both policies take (last hidden state, head logits) and return a count in 0..k-1 per row, so the
decoder treats them alike. CLP (the paper) is one linear layer that predicts the whole span length
at once; the gate baseline (prior work) is one ~1M-parameter MLP per head, accepting head tokens
one by one until the first gate says no.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .rules import leading_true, span_at_threshold

CLP_FEATURES = ("hidden", "hidden+conf")  # the hidden state (the paper), or it and each head's top-1 probability
GATE_THRESHOLD = 0.5  # a gate's default: accept while P(head right) >= 0.5


def head_confidence(head_logits: torch.Tensor) -> torch.Tensor:
    """(..., n_heads, V) -> (..., n_heads): each head's top-1 probability."""
    return head_logits.float().softmax(-1).amax(-1)


class CLP(nn.Module):
    """Collocation-Length Predictor: class c = accept the first c head tokens (c = 0..k-1)."""

    def __init__(self, hidden: int, k: int, *, features: str = "hidden"):
        super().__init__()
        if features not in CLP_FEATURES:
            raise ValueError(f"CLP features must be one of {', '.join(CLP_FEATURES)}, got {features!r}")
        self.k, self.features = k, features
        extra = k - 1 if features == "hidden+conf" else 0
        self.linear = nn.Linear(hidden + extra, k)

    def inputs(self, h: torch.Tensor, head_logits: torch.Tensor | None) -> torch.Tensor:
        if self.features == "hidden":
            return h
        return torch.cat([h, head_confidence(head_logits).to(h.dtype)], dim=-1)

    def forward(self, h: torch.Tensor, head_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Length logits (..., k)."""
        x = self.inputs(h, head_logits)
        return self.linear(x.to(self.linear.weight.dtype))

    def accept(self, h, head_logits, *, threshold: float | torch.Tensor | None = None) -> torch.Tensor:
        """argmax, or with a threshold the longest length whose P(all of it correct) >= threshold."""
        return span_at_threshold(self(h, head_logits).float(), threshold)


class Gates(nn.Module):
    """The gate baseline: per head an MLP hidden -> 512 -> 256 -> 1 giving P(head j correct)."""

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 512), nn.SiLU(), nn.Linear(512, 256), nn.SiLU(), nn.Linear(256, 1))
            for _ in range(n_heads)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., n_heads) logits of 'this head is right'."""
        h = h.to(self.mlps[0][0].weight.dtype)
        return torch.cat([mlp(h) for mlp in self.mlps], dim=-1)

    def probs(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., n_heads) P(head j is right), in float32."""
        return self(h).float().sigmoid()

    def accept(self, h, head_logits=None, *, threshold: float | torch.Tensor = GATE_THRESHOLD,
               last: int | None = None) -> torch.Tensor:
        """Accept head tokens in order until the first gate under the threshold; `last`: only the last
        this many gates (a bundle with a +1 head has one gate more)."""
        p = self.probs(h)
        return leading_true((p if last is None else p[..., -last:]) >= threshold)
