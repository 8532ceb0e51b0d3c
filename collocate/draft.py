"""Drafts as data: tokens plus each node's parent, and the MTP heads as a drafter.

    tree = DraftTree.chain(3)                      # root -> d1 -> d2 -> d3
    tree = DraftTree.chain(3).with_siblings(4)     # ... and 4 more guesses for d1, side by side
    drafter = HeadDrafter(bundle, lm_head)
    tokens = drafter.propose(head_logits, tree)    # (tree.n,): a token per node

A step feeds the root (the token the backbone chose) at row 0 and draft node i at row i + 1. Node i's
parent is the row `parents[i]` (< i + 1), so any prefix of the nodes is a tree too: that is how an
adaptive draft is cut short. A chain, side-by-side candidates and a full tree are the same structure;
the backends turn it into positions (row depth) and an attention mask (a row sees its ancestors).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .rules import pick


@dataclass(frozen=True)
class DraftTree:
    parents: tuple[int, ...]  # parents[i]: the feed row of node i's parent (0 = the root)

    def __post_init__(self):
        for i, p in enumerate(self.parents):
            if not 0 <= p <= i:
                raise ValueError(f"draft node {i} has parent row {p}; a parent must be an earlier row (0..{i})")

    @staticmethod
    def chain(n: int) -> "DraftTree":
        return DraftTree(tuple(range(n)))

    def with_siblings(self, n: int) -> "DraftTree":
        """n more nodes beside the first one: other guesses for the same position."""
        return DraftTree(self.parents + (0,) * n)

    def first(self, n: int) -> "DraftTree":
        return DraftTree(self.parents[:n])

    @property
    def n(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(self.n))

    @functools.cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth of every feed row: the root 0, a node one more than its parent."""
        d = [0]
        for p in self.parents:
            d.append(d[p] + 1)
        return tuple(d)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @functools.cached_property
    def visible(self) -> tuple[tuple[bool, ...], ...]:
        """visible[r][c]: row c is row r or one of its ancestors (what row r may attend to in the feed)."""
        rows = [[False] * (self.n + 1) for _ in range(self.n + 1)]
        for r in range(self.n + 1):
            rows[r][r] = True
            if r:
                rows[r] = [a or b for a, b in zip(rows[r], rows[self.parents[r - 1]])]
                rows[r][r] = True
        return tuple(tuple(row) for row in rows)

    @functools.lru_cache(maxsize=None)
    def tensors(self, device: torch.device) -> "TreeTensors":
        """The tree as device tensors, built once per device (the same tensors every graph reads)."""
        return TreeTensors(parents=torch.tensor(self.parents, dtype=torch.long, device=device),
                           depths=torch.tensor(self.depths, dtype=torch.long, device=device),
                           visible=torch.tensor(self.visible, dtype=torch.bool, device=device),
                           max_depth=self.max_depth, is_chain=self.is_chain)


@dataclass(frozen=True, eq=False)
class TreeTensors:
    parents: torch.Tensor  # (n,) feed row of each node's parent
    depths: torch.Tensor  # (n + 1,) depth of each feed row
    visible: torch.Tensor  # (n + 1, n + 1) bool: row r attends to row c
    max_depth: int
    is_chain: bool


class HeadDrafter:
    """The MTP heads as a drafter: the chain is each head's argmax (+2, +3, ...); side-by-side
    siblings of the first node are the +2 head's runners-up."""

    def __init__(self, bundle):
        self.k = bundle.k

    def tree(self, *, candidates: int = 1) -> DraftTree:
        return DraftTree.chain(self.k - 1).with_siblings(candidates - 1)

    @staticmethod
    def propose(head_logits: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """(k-1, V) logits of heads +2..+k from the root's row -> (tree.n,) draft tokens."""
        chain = pick(head_logits)  # (k-1,)
        extra = tree.n - chain.shape[0]
        if extra <= 0:
            return chain[: tree.n]
        return torch.cat([chain, head_logits[0].topk(1 + extra).indices[1:]])  # ranks 2.. of the +2 head
