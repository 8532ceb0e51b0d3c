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
    return longest_accepted_mask(ok, tree)


def longest_accepted_mask(ok: torch.Tensor, tree) -> Kept:
    """The deepest row whose every ancestor (and itself) is ok (ok: (n+1,), the root's True)."""
    kept = (ok[None, :] | ~tree.visible).all(-1)  # (n+1,): every row on the way is ok
    row = torch.where(kept, tree.depths, -1).argmax().view(1)  # (1,): no indexing by a 0-d tensor (a host read)
    depth = torch.arange(1, tree.max_depth + 1, device=ok.device)[:, None]  # (D, 1)
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


# -- sampling ----------------------------------------------------------------------------------------
# Temperature > 0: `ar` draws each token from the backbone's filtered distribution; `verify` keeps a
# draft node with probability p(node | parent) / (1 - p(its earlier siblings)) and, past the last kept
# row, draws from that row's distribution with every tried child removed. Drafts are deterministic (the
# heads' guesses, a point mass each), for which this recursive rule is speculative sampling: the output
# has ar's distribution exactly, whatever the drafts. Uniforms come from a counter-based hash of (seed,
# step, index) in integer tensor ops, so they need no generator object, replay inside CUDA graphs, and
# are the same on every backend.

class Sampling(NamedTuple):
    """Per-request knobs, on the device (graphs read them; a new value needs no new graph)."""
    temperature: torch.Tensor  # ()
    top_k: torch.Tensor  # () 0: off
    top_p: torch.Tensor  # () 1: off
    seed: torch.Tensor  # () int64
    counter: torch.Tensor  # () int64, one per step


def filtered_probs(logits: torch.Tensor, s: Sampling, *, use_top_k: bool, use_top_p: bool) -> torch.Tensor:
    """(m, V) logits -> (m, V) probabilities after temperature, top-k, then top-p (HF's order)."""
    x = logits.float() / s.temperature
    if use_top_k or use_top_p:
        x_sorted, order = x.sort(-1, descending=True)
        rank = torch.arange(x.shape[-1], device=x.device)
        if use_top_k:
            x_sorted = x_sorted.masked_fill(rank >= s.top_k, float("-inf"))
        if use_top_p:  # the smallest head of the sorted list whose mass reaches top_p
            p_sorted = x_sorted.softmax(-1)
            x_sorted = x_sorted.masked_fill(p_sorted.cumsum(-1) - p_sorted >= s.top_p, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, x_sorted)
    return x.softmax(-1)


M32 = 0xFFFFFFFF


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on int64 tensors holding 32-bit values (products keep their low 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def uniforms(s: Sampling, n: int) -> torch.Tensor:
    """(n,) uniforms in [0, 1) for this step, a hash of (seed, step counter, index); 24 bits each, exact
    in float32 and never 1."""
    key = fmix32((s.seed & M32) ^ fmix32((s.seed >> 32) & M32))
    h = fmix32(key ^ fmix32((s.counter * 0x9E3779B1 + torch.arange(n, device=s.seed.device)) & M32))
    return (h >> 8).float() / 2.0 ** 24


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token from (V,) probabilities (need not sum to 1) by inverse CDF at u."""
    c = probs.cumsum(-1)
    return (c < u * c[-1]).sum(-1).clamp(max=probs.shape[-1] - 1)


def sampled_accepted(probs: torch.Tensor, fed: torch.Tensor, tree, u: torch.Tensor) -> Kept:
    """Speculative sampling over a draft tree. probs[r]: the backbone's distribution after feed row r;
    fed: (n+1,) tokens (a token < 0 is never kept); u: (n,) a uniform per node. Siblings are tried in row
    order; a node is kept with p(token) / (1 - p(earlier siblings' tokens)) when no earlier sibling was."""
    tokens = fed[1:]
    valid = tokens >= 0
    px = torch.where(valid, probs[tree.parents, tokens.clamp(min=0)], 0.0)  # (n,) p(node | parent)
    earlier = tree.earlier  # (n, n) bool: j is an earlier sibling of i
    before = (earlier.float() * px[None, :]).sum(-1)
    passes = u * (1 - before).clamp(min=1e-12) < px  # u < px / (1 - before), without dividing
    ok = passes & ~(earlier & passes[None, :]).any(-1)
    return longest_accepted_mask(torch.cat([ok.new_ones(1), ok]), tree)


def residual_draw(probs: torch.Tensor, fed: torch.Tensor, tree, row: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token after the last kept row: its distribution without the children tried there (all of them,
    since none was kept), drawn at u. row: (1,)."""
    p = probs.index_select(0, row)[0]  # (V,)
    tokens = fed[1:]
    tried = (tree.parents == row) & (tokens >= 0)  # (n,)
    hits = torch.zeros_like(p).index_add(0, tokens.clamp(min=0), tried.to(p.dtype))  # (a chain repeats tokens)
    return draw(p.masked_fill(hits > 0, 0.0), u)
