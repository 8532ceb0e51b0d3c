"""Drafts as data: tokens plus each node's parent, and the MTP heads as a drafter.

    tree = DraftTree.chain(3)                      # root -> d1 -> d2 -> d3
    tree = DraftTree.chain(3).with_siblings(4)     # ... and 4 more guesses for d1, side by side
    tree = DraftTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])   # ranks along each path (Medusa's choices)
    tree = DraftTree.best(rank_probs, 16)          # the 16 nodes with the most expected accepted tokens
    tokens = HeadDrafter(bundle).propose(head_logits, tree)   # (tree.n,): a token per node

A step feeds the root (the token the backbone chose) at row 0 and draft node i at row i + 1. Node i's
parent is the row `parents[i]` (< i + 1), so any prefix of the nodes is a tree too: that is how an
adaptive draft is cut short. Node i at depth d is the `ranks[i]`-th guess of the head for offset d + 1
(rank 0: its argmax). A chain, side-by-side candidates and a full tree are the same structure; the
backends turn it into positions (row depth) and an attention mask (a row sees its ancestors).
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

import torch

from .rules import pick


@dataclass(frozen=True)
class DraftTree:
    parents: tuple[int, ...]  # parents[i]: the feed row of node i's parent (0 = the root)
    ranks: tuple[int, ...] = ()  # ranks[i]: which of its head's guesses node i is (0, the argmax, by default)

    def __post_init__(self):
        if not self.ranks:
            object.__setattr__(self, "ranks", (0,) * len(self.parents))
        if len(self.ranks) != len(self.parents):
            raise ValueError(f"a draft tree needs a rank per node: {len(self.parents)} parents, {len(self.ranks)} ranks")
        for i, p in enumerate(self.parents):
            if not 0 <= p <= i:
                raise ValueError(f"draft node {i} has parent row {p}; a parent must be an earlier row (0..{i})")

    @staticmethod
    def chain(n: int) -> "DraftTree":
        return DraftTree(tuple(range(n)))

    def with_siblings(self, n: int) -> "DraftTree":
        """n more nodes beside the first one: the next guesses (ranks 1..n) for the same position."""
        return DraftTree(self.parents + (0,) * n, self.ranks + tuple(range(1, n + 1)))

    @staticmethod
    def from_paths(paths) -> "DraftTree":
        """A tree from its nodes' rank paths, e.g. (0, 1): the second guess after the first head's argmax.
        Every prefix of a path must be a path too; rows are ordered by depth, then path."""
        paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        row = {p: i + 1 for i, p in enumerate(paths)}
        missing = [p for p in paths if len(p) > 1 and p[:-1] not in row]
        if missing or any(len(p) == 0 or min(p) < 0 for p in paths):
            raise ValueError(f"draft paths need every prefix and ranks >= 0; bad: {(missing or paths)[:3]}")
        return DraftTree(tuple(row.get(p[:-1], 0) for p in paths), tuple(p[-1] for p in paths))

    @staticmethod
    def best(rank_probs: list[list[float]], n: int) -> "DraftTree":
        """The n nodes with the largest P(accepted), taking a node's chance as the product of its path's
        rank probabilities (rank_probs[d][r]: the head for offset d + 2 has the backbone's token at rank r).
        Best-first from the root: a child is never likelier than its parent, so this set is prefix-closed
        and maximises the expected number of accepted drafts under that independence assumption."""
        frontier = [(-p, (r,)) for r, p in enumerate(rank_probs[0]) if p > 0]
        heapq.heapify(frontier)
        chosen = []
        while frontier and len(chosen) < n:
            neg, path = heapq.heappop(frontier)
            chosen.append(path)
            if len(path) < len(rank_probs):
                for r, p in enumerate(rank_probs[len(path)]):
                    if p > 0:
                        heapq.heappush(frontier, (neg * p, path + (r,)))
        return DraftTree.from_paths(chosen)

    def first(self, n: int) -> "DraftTree":
        return DraftTree(self.parents[:n], self.ranks[:n])

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
        rows = [[c == 0 for c in range(self.n + 1)]]  # the root sees itself
        for r, parent in enumerate(self.parents, start=1):
            rows.append(list(rows[parent]))  # what its parent sees, and itself
            rows[r][r] = True
        return tuple(tuple(row) for row in rows)

    @functools.lru_cache(maxsize=None)
    def tensors(self, device: torch.device) -> "TreeTensors":
        """The tree as device tensors, built once per device (the same tensors every graph reads)."""
        return TreeTensors(parents=torch.tensor(self.parents, dtype=torch.long, device=device),
                           ranks=torch.tensor(self.ranks, dtype=torch.long, device=device),
                           depths=torch.tensor(self.depths, dtype=torch.long, device=device),
                           visible=torch.tensor(self.visible, dtype=torch.bool, device=device),
                           max_depth=self.max_depth, is_chain=self.is_chain)


@dataclass(frozen=True, eq=False)
class TreeTensors:
    parents: torch.Tensor  # (n,) feed row of each node's parent
    ranks: torch.Tensor  # (n,) which guess of its head each node is
    depths: torch.Tensor  # (n + 1,) depth of each feed row
    visible: torch.Tensor  # (n + 1, n + 1) bool: row r attends to row c
    max_depth: int
    is_chain: bool


class HeadDrafter:
    """The MTP heads as a drafter: node i at depth d is the ranks[i]-th guess of the head for offset
    d + 1. The chain is each head's argmax; side-by-side candidates are the +2 head's runners-up; a tree
    (`--tree N`) is chosen from the heads' held-out rank statistics (bundle.rank_probs)."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.k = bundle.k

    def tree(self, *, candidates: int = 1, nodes: int = 0) -> DraftTree:
        if nodes:
            return DraftTree.best(self.bundle.rank_probs(), nodes)
        return DraftTree.chain(self.k - 1).with_siblings(candidates - 1)

    @staticmethod
    def propose(head_logits: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """(k-1, V) logits of heads +2..+k from the root's row -> (tree.n,) draft tokens."""
        if tree.is_chain and not any(tree.ranks):  # a chain of argmaxes: no top-k needed
            return pick(head_logits)[: tree.n]
        t = tree.tensors(head_logits.device)
        guesses = head_logits.topk(max(tree.ranks) + 1, dim=-1).indices  # (k-1, R)
        return guesses[t.depths[1:] - 1, t.ranks]
