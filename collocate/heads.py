"""MTP heads: residual blocks on the backbone's last hidden state, decoded by its own frozen LM head.

    heads = MTPHeads(hidden=576, k=4)          # offsets +2, +3, +4, each from the hidden state alone
    logits = heads.logits(h, lm_head)         # (B, T, k-1, V), one matmul through the LM head
    heads = TokenHeads(hidden=576, k=4)        # +j also sees the token chosen at +j-1
    logits = heads.logits(h, lm_head, tokens=y, embed=model.get_input_embeddings())
    vocab = VocabSlice(lm_head, ids)           # the LM head over a draft vocabulary: (..., len(ids)) logits

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

    def forward(self, h: torch.Tensor, *, with_first: bool = True, tokens=None, embed=None) -> torch.Tensor:
        """(..., d) hidden -> (..., n_heads, d) head states, ready for the LM head (tokens and embed are
        what TokenHeads reads; these heads see the hidden state only).
        with_first=False leaves out a +1 (competition) head, for every mode but `compete`."""
        blocks = self.blocks if with_first or not self.compete else self.blocks[1:]
        x = h.to(self.blocks[0][0].linear.weight.dtype)
        return torch.stack([block(x) for block in blocks], dim=-2)

    def logits(self, h: torch.Tensor, lm_head: nn.Module, *, tokens=None, embed=None) -> torch.Tensor:
        """(..., d) -> (..., n_heads, V): all heads through the shared LM head in one matmul."""
        return lm_head(self(h).to(lm_head.weight.dtype))


def unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x scaled to unit root-mean-square: token embeddings are ~100x smaller than final hidden states."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class TokenBlock(nn.Module):
    """s + W_out SiLU(W_in [s; e] + b_depth): a state updated by the embedding of one token, through an
    inner layer of `inner` units (default: hidden). W_out starts at zero, so a fresh block passes its
    state through."""

    def __init__(self, hidden: int, depths: int = 1, inner: int | None = None):
        super().__init__()
        inner = inner or hidden
        self.inp = nn.Linear(2 * hidden, inner)
        self.out = nn.Linear(inner, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # a block shared by several depths is told which one it serves by a learned bias
        self.depth_bias = nn.Parameter(torch.zeros(depths, inner)) if depths > 1 else None

    def forward(self, s: torch.Tensor, e: torch.Tensor, depth: int) -> torch.Tensor:
        return s + self.delta(s, e, depth)

    def delta(self, s: torch.Tensor, e: torch.Tensor, depth: int) -> torch.Tensor:
        """What the block adds to s: W_out SiLU(W_in [s; e] + b_depth)."""
        u = self.inp(torch.cat([s, unit_rms(e.to(s.dtype))], dim=-1))
        if self.depth_bias is not None:
            u = u + self.depth_bias[depth]
        return self.out(F.silu(u))


class TokenHeads(nn.Module):
    """Token-conditioned heads: the state for offset j+1 is the state for offset j updated by the token
    chosen there, s_1 = U_1(h, y_1), s_j = U_j(s_{j-1}, y_j), with y_1 the backbone's own t+1. Under
    greedy decoding y_1 is a function of h, so +2 gains little; +3 and further gain most.

    design "tc-depth": one block per offset; "tc-shared": one block for every offset (a learned bias says
    which), the recurrence EAGLE runs on its features, with fewer weights to read per draft; "tc-wide":
    tc-shared with WIDE times the inner units (12 hidden^2 weights, as many as a gated MLP 4x wide)."""

    DESIGNS = ("tc-depth", "tc-shared", "tc-wide")
    WIDE = 4

    def __init__(self, hidden: int, k: int, *, design: str = "tc-depth"):
        super().__init__()
        if k < 2:
            raise ValueError(f"k must be >= 2 (k=1 means no heads), got {k}")
        if design not in self.DESIGNS:
            raise ValueError(f"token-conditioned design must be one of {', '.join(self.DESIGNS)}, got {design!r}")
        self.hidden, self.k, self.design, self.compete = hidden, k, design, False
        self.offsets = list(range(2, k + 1))
        if design == "tc-depth":
            self.blocks = nn.ModuleList(TokenBlock(hidden) for _ in self.offsets)
        else:
            inner = hidden * (self.WIDE if design == "tc-wide" else 1)
            self.blocks = nn.ModuleList([TokenBlock(hidden, k - 1, inner=inner)])

    @property
    def n_heads(self) -> int:
        return len(self.offsets)

    def update(self, s: torch.Tensor, e: torch.Tensor, depth: int) -> torch.Tensor:
        """The state for offset depth + 2 from the state before it and the chosen token's embedding."""
        block = self.blocks[min(depth, len(self.blocks) - 1)]
        return block(s.to(block.inp.weight.dtype), e, depth)

    def forward(self, h: torch.Tensor, *, tokens: torch.Tensor, embed: nn.Module, with_first: bool = True):
        """(..., d) hidden and (..., k-1) chosen tokens y_1..y_{k-1} (teacher-forced in training: the
        backbone's own) -> (..., k-1, d) head states, ready for the LM head."""
        s, states = h, []
        for j in range(self.n_heads):
            s = self.update(s, embed(tokens[..., j].clamp(min=0)), j)  # (-100 past an answer's end: masked)
            states.append(s)
        return torch.stack(states, dim=-2)

    def logits(self, h: torch.Tensor, lm_head: nn.Module, *, tokens: torch.Tensor, embed: nn.Module) -> torch.Tensor:
        return lm_head(self(h, tokens=tokens, embed=embed).to(lm_head.weight.dtype))


class VocabSlice(nn.Module):
    """The frozen LM head over some tokens only (a draft vocabulary, most used first): its matmul reads
    len(ids) rows instead of the whole vocabulary. `local` maps full-vocabulary ids to positions in ids
    (-100 outside it: never guessed, so not a training target either); `ids[j]` maps back."""

    def __init__(self, lm_head: nn.Module, ids: torch.Tensor):
        super().__init__()
        weight = lm_head.weight
        self.ids = ids.to(weight.device)
        self.weight = weight.detach().index_select(0, self.ids)  # (V', d)
        bias = getattr(lm_head, "bias", None)
        self.bias = bias.detach().index_select(0, self.ids) if bias is not None else None
        self.index = torch.full((weight.shape[0],), -100, dtype=torch.long, device=weight.device)
        self.index[self.ids] = torch.arange(len(self.ids), device=weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def local(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids (-100 kept) -> positions in the draft vocabulary, -100 outside it."""
        return torch.where(tokens >= 0, self.index[tokens.clamp(min=0)], tokens)
