"""Acceptance rules, one function each, in tensor ops only: both backends call them, and the fast
one captures them in its CUDA graphs (no host syncs, thresholds are device tensors).

    kept = longest_accepted(own, fed, tree.tensors(device))  # verify: which drafts the backbone agrees with
    n = span_at_threshold(clp(h, head_logits), threshold)     # CLP: how many head tokens to take unchecked
    n = leading_true(gates(h).sigmoid() >= threshold)         # gates: one by one until the first "no"
    first, n, overrides = compete(own, heads_tok, gate_p, threshold)

The unverified rules (CLP, gates, competition) emit head tokens without a check; `verify` emits only
what the backbone's own argmax confirms, so its output is the backbone's.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def pick(logits: torch.Tensor) -> torch.Tensor:
    """The one token-choice rule of every mode, backbone and heads alike: greedy."""
    return logits.argmax(-1)


def leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Length of the all-true prefix along the last dimension."""
    return mask.long().cumprod(-1).sum(-1)


class Kept(NamedTuple):
    row: torch.Tensor  # () feed row of the deepest kept node (0: the root, no draft kept)
    count: torch.Tensor  # () drafts kept: that node's depth
    path: torch.Tensor  # (max_depth,) feed rows of the kept nodes by depth 1..max_depth (past `count`: 0)


def longest_accepted(own: torch.Tensor, fed: torch.Tensor, tree) -> Kept:
    """Greedy verify. own[r] is the backbone's token after feed row r, fed the (n+1,) fed tokens.
    A node is kept when its token is the backbone's choice after its parent and every ancestor is
    kept; the deepest kept node (the first one, on a tie) ends the accepted path."""
    if tree.is_chain:  # the same rule in fewer kernels: the agreeing prefix
        count = leading_true(fed[1:] == own[:-1])
        return Kept(count, count, torch.arange(1, fed.shape[0], device=fed.device))
    ok = torch.cat([torch.ones_like(fed[:1], dtype=torch.bool), fed[1:] == own[tree.parents]])  # (n+1,)
    kept = (ok[None, :] | ~tree.visible).all(-1)  # (n+1,): every row on the way is ok
    row = torch.where(kept, tree.depths, -1).argmax().view(1)  # (1,): no indexing by a 0-d tensor (a host read)
    depth = torch.arange(1, tree.max_depth + 1, device=fed.device)[:, None]  # (D, 1)
    on_path = tree.visible.index_select(0, row) & (tree.depths[None, :] == depth)  # (D, n+1)
    return Kept(row[0], tree.depths.index_select(0, row)[0], on_path.long().argmax(-1))


def span_at_threshold(length_logits: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """CLP's rule over its length classes 0..k-1: the argmax, or with a threshold the longest length
    whose P(the whole span is right) = P(label >= length) reaches it."""
    if threshold is None:
        return length_logits.argmax(-1)
    p_at_least = length_logits.float().softmax(-1).flip(-1).cumsum(-1).flip(-1)  # P(label >= c); c=0: 1
    idx = torch.arange(length_logits.shape[-1], device=length_logits.device)
    return torch.where((p_at_least >= threshold) | (idx == 0), idx, 0).amax(-1)


def compete(own: torch.Tensor, heads_tok: torch.Tensor, gate_p: torch.Tensor, threshold: torch.Tensor):
    """Head competition (the paper's baseline): the +1 head replaces the backbone's token when its gate
    says so, then head tokens are taken as the gates allow. Returns (first token, head tokens taken,
    overrides: 1 when the +1 head replaced a different backbone token)."""
    override = (gate_p[0] >= threshold) & (heads_tok[0] != own)
    first = torch.where(override, heads_tok[0], own)
    return first, leading_true(gate_p[1:] >= threshold), override.long()
