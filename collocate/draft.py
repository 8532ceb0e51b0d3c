"""Drafts as data: tokens plus each node's parent, and the MTP heads as a drafter.

    tree = DraftTree.chain(3)                      # root -> d1 -> d2 -> d3
    tree = DraftTree.chain(3).with_siblings(4)     # ... and 4 more guesses for d1, side by side
    tree = DraftTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])   # ranks along each path (Medusa's choices)
    tree = DraftTree.best(rank_probs, 16)          # the 16 nodes with the most expected accepted tokens
    tree = HeadDrafter(bundle).tree(nodes=48, depth=3)                # the bundle's best 48-node tree, 3 deep
    t = tree.tensors(device)                                          # the tree as the step reads it
    draft = HeadDrafter(bundle).propose(t, head_logits=logits)      # independent heads: draft.tokens (tree.n,)
    draft = TokenDrafter(bundle, lm_head, embed).propose(t, h=h, root=y1)  # token-conditioned, depth by depth

A step feeds the root (the token the backbone chose) at row 0 and draft node i at row i + 1. Node i's
parent is the row `parents[i]` (< i + 1), so any prefix of the nodes is a tree too: that is how an
adaptive draft is cut short. Node i at depth d is the `ranks[i]`-th guess of the head for offset d + 1
(rank 0: its argmax). A chain, side-by-side candidates and a full tree are the same structure; the
backends turn it into positions (row depth) and an attention mask (a row sees its ancestors). Rows
start with the argmax chain, so the likeliest path needs no K/V move when it is kept.
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .errors import BundleError
from .heads import VocabSlice
from .rules import pick

MAX_TREE = 64  # draft nodes a step can feed (a 64-node step costs 1.2x a 1-token one on the H200, bench/README.md)


@dataclass(frozen=True)
class DraftTree:
    parents: tuple[int, ...]  # parents[i]: the feed row of node i's parent (0 = the root)
    ranks: tuple[int, ...] = ()  # ranks[i]: which of its head's guesses node i is (0, the argmax, by default)
    # derived in __post_init__, as plain attributes: a compiled step reads them (dynamo cannot trace a
    # cached_property on every Python we support)
    depths: tuple[int, ...] = field(init=False, repr=False, compare=False)  # of every feed row: the root 0
    chain_rows: int = field(init=False, repr=False, compare=False)  # leading nodes that form a chain from the root

    def __post_init__(self):
        if not self.ranks:
            object.__setattr__(self, "ranks", (0,) * len(self.parents))
        if len(self.ranks) != len(self.parents):
            raise ValueError(f"a draft tree needs a rank per node: {len(self.parents)} parents, {len(self.ranks)} ranks")
        for i, p in enumerate(self.parents):
            if not 0 <= p <= i:
                raise ValueError(f"draft node {i} has parent row {p}; a parent must be an earlier row (0..{i})")
        depths = [0]
        for p in self.parents:
            depths.append(depths[p] + 1)
        object.__setattr__(self, "depths", tuple(depths))
        object.__setattr__(self, "chain_rows", next((i for i, p in enumerate(self.parents) if p != i), self.n))

    @staticmethod
    def chain(n: int) -> "DraftTree":
        return DraftTree(tuple(range(n)))

    def with_siblings(self, n: int) -> "DraftTree":
        """n more nodes beside the first one: the next guesses (ranks 1..n) for the same position."""
        return DraftTree(self.parents + (0,) * n, self.ranks + tuple(range(1, n + 1)))

    @staticmethod
    def from_paths(paths) -> "DraftTree":
        """A tree from its nodes' rank paths, e.g. (0, 1): the second guess after the first head's argmax.
        Every prefix of a path must be a path too; rows are the argmax chain first, then by depth and path."""
        paths = sorted({tuple(p) for p in paths}, key=lambda p: (any(p), len(p), p))
        row = {p: i + 1 for i, p in enumerate(paths)}
        missing = [p for p in paths if len(p) > 1 and p[:-1] not in row]
        if missing or any(len(p) == 0 or min(p) < 0 for p in paths):
            raise ValueError(f"draft paths need every prefix and ranks >= 0; bad: {(missing or paths)[:3]}")
        return DraftTree(tuple(row.get(p[:-1], 0) for p in paths), tuple(p[-1] for p in paths))

    @staticmethod
    def best(rank_probs: list[list[float]], n: int) -> "DraftTree":
        return DraftTree.from_paths(best_paths(rank_probs, n))

    def first(self, n: int) -> "DraftTree":
        return DraftTree(self.parents[:n], self.ranks[:n])

    @property
    def n(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(self.n))

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @functools.cached_property
    def levels(self) -> tuple["Level", ...]:
        """Per depth d, the rows at depth d that have children, and those children: what a drafter that
        conditions on each parent's token computes, one depth after another."""
        out = []
        for d in range(self.max_depth):
            rows = sorted({p for p in self.parents if self.depths[p] == d})
            kids = [i for i, p in enumerate(self.parents) if self.depths[p] == d]
            out.append(Level(rows=tuple(rows), parents=tuple(self.parents[r - 1] if r else 0 for r in rows),
                             children=tuple(kids), child_of=tuple(rows.index(self.parents[i]) for i in kids),
                             ranks=tuple(self.ranks[i] for i in kids)))
        return tuple(out)

    @functools.cached_property
    def visible(self) -> tuple[tuple[bool, ...], ...]:
        """visible[r][c]: row c is row r or one of its ancestors (what row r may attend to in the feed)."""
        rows = [[c == 0 for c in range(self.n + 1)]]  # the root sees itself
        for r, parent in enumerate(self.parents, start=1):
            rows.append(list(rows[parent]))  # what its parent sees, and itself
            rows[r][r] = True
        return tuple(tuple(row) for row in rows)

    @functools.cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """paths[r][j]: the feed row at depth j on row r's path from the root (j <= depth of r), then r
        again up to the tree's depth (--exact lays a row's keys out in this order, as `ar` has them)."""
        rows = [(0,)]
        for r, parent in enumerate(self.parents, start=1):
            rows.append(rows[parent][: self.depths[parent] + 1] + (r,))
        return tuple(row + (row[-1],) * (self.max_depth + 1 - len(row)) for row in rows)

    @functools.lru_cache(maxsize=None)
    def tensors(self, device: torch.device) -> "TreeTensors":
        """The tree as device tensors, built once per device (the same tensors every graph reads)."""
        return TreeTensors(parents=torch.tensor(self.parents, dtype=torch.long, device=device),
                           ranks=torch.tensor(self.ranks, dtype=torch.long, device=device),
                           depths=torch.tensor(self.depths, dtype=torch.long, device=device),
                           visible=torch.tensor(self.visible, dtype=torch.bool, device=device),
                           paths=torch.tensor(self.paths, dtype=torch.long, device=device),
                           n=self.n, max_depth=self.max_depth, is_chain=self.is_chain,
                           top=max(self.ranks, default=0) + 1,
                           levels=tuple(lv.tensors(device) for lv in self.levels),
                           earlier=torch.tensor([[j < i and self.parents[j] == p for j in range(self.n)]
                                                 for i, p in enumerate(self.parents)], dtype=torch.bool,
                                                device=device).view(self.n, self.n))


def best_paths(rank_probs: list[list[float]], n: int) -> list[tuple[int, ...]]:
    """The n rank paths with the largest P(accepted), best first, taking a node's chance as the product of
    its path's rank probabilities (rank_probs[d][r]: the head for offset d + 2 has the backbone's token at
    rank r). Best-first from the root: a child is never likelier than its parent, so every prefix of the
    list is prefix-closed and maximises the expected accepted drafts for its size (under that independence)."""
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
    return chosen


@dataclass(frozen=True)
class Level:
    rows: tuple[int, ...]  # feed rows at this depth with children
    parents: tuple[int, ...]  # each such row's parent row (the root's: 0, unused)
    children: tuple[int, ...]  # draft nodes one depth down
    child_of: tuple[int, ...]  # each child's parent, as an index into rows
    ranks: tuple[int, ...]  # each child's rank among its parent's guesses

    def tensors(self, device) -> "LevelTensors":
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return LevelTensors(t(self.rows), t(self.parents), t(self.children), t(self.child_of), t(self.ranks),
                            max(self.ranks) + 1)


class LevelTensors(NamedTuple):
    rows: torch.Tensor
    parents: torch.Tensor
    children: torch.Tensor
    child_of: torch.Tensor
    ranks: torch.Tensor
    top: int  # guesses needed per row


@dataclass(frozen=True, eq=False)
class TreeTensors:
    """A DraftTree as the step reads it: tensors and plain numbers only, so a compiled step traces it whole."""
    parents: torch.Tensor  # (n,) feed row of each node's parent
    ranks: torch.Tensor  # (n,) which guess of its head each node is
    depths: torch.Tensor  # (n + 1,) depth of each feed row
    visible: torch.Tensor  # (n + 1, n + 1) bool: row r attends to row c
    paths: torch.Tensor  # (n + 1, max_depth + 1) DraftTree.paths
    n: int
    max_depth: int
    is_chain: bool
    top: int  # guesses needed per head: the largest rank + 1 (1: argmaxes only)
    levels: tuple[LevelTensors, ...]
    earlier: torch.Tensor  # (n, n) bool: node j is an earlier sibling of node i (sampling tries them in order)


def top_indices(logits: torch.Tensor, top: int, chunks: int = 64) -> torch.Tensor:
    """(r, V) -> (r, top): where each row's `top` largest logits are, largest first, in two rounds where V
    splits into `chunks` equal pieces: each piece's `top`, then the `top` of those, the same set as one
    top-k over the row (ties aside). Why: on CUDA a top-k over a long row with few rows is a multi-block
    select of about 15 small kernels; over pieces of at most a few thousand it is one kernel a round, and
    a tree step takes one per drafting depth. top 1 (a chain's level) is the argmax: no top-k at all."""
    if top == 1:
        return pick(logits)[:, None]
    r, v = logits.shape
    while chunks > 1 and v % chunks:
        chunks //= 2
    if chunks == 1 or top > v // chunks:
        return logits.topk(top, dim=-1).indices
    piece = logits.reshape(r, chunks, v // chunks).topk(top, dim=-1, sorted=False)  # (r, chunks, top)
    best = piece.values.view(r, -1).topk(top, dim=-1).indices  # (r, top), into chunks * top
    return piece.indices.view(r, -1).gather(1, best) + best.div(top, rounding_mode="floor") * (v // chunks)


class Draft(NamedTuple):
    tokens: torch.Tensor  # (tree.n,) a token per node
    chain_logits: torch.Tensor | None  # (k-1, V) the argmax chain's logits per offset, when the drafter has them


class HeadDrafter:
    """The independent MTP heads as a drafter: node i at depth d is the ranks[i]-th guess of the head
    for offset d + 1. The chain is each head's argmax; side-by-side candidates are the +2 head's
    runners-up; a tree (`--tree-size N`) is the best N nodes of the bundle's stored paths (best first) or,
    where it stores none, of its heads' held-out rank statistics.
    `fused`: the heads' states join the backbone's LM-head matmul (step.StepRunner.logits)."""

    fused = True
    taps: tuple[int, ...] = ()  # backbone layers it reads as context (none: it reads the root's row only)

    def __init__(self, bundle):
        self.bundle = bundle
        self.k = bundle.k

    def tree(self, *, candidates: int = 1, nodes: int = 0, depth: int | None = None) -> DraftTree:
        """The draft this drafter feeds: its argmax chain (and candidates - 1 more guesses for +2), or the
        best tree of `nodes` nodes whose paths are at most `depth` drafts deep (a token-conditioned depth
        costs a sequential LM-head read, so a shallower tree of the same size can be faster)."""
        if not nodes:
            return DraftTree.chain(self.k - 1).with_siblings(candidates - 1)
        if depth is not None and not 1 <= depth <= self.k - 1:
            raise BundleError(f"tree depth must lie in 1..{self.k - 1}: this bundle drafts +2..+{self.k}, got {depth}")
        stored = [tuple(p) for p in self.bundle.config.tree]
        paths = stored or best_paths(self.bundle.rank_probs(), MAX_TREE)
        if depth is not None:  # the best-first order stays best first, and prefix-closed, when cut by depth
            paths = [p for p in paths if len(p) <= depth]
            if len(paths) < nodes and self.bundle.heldout:  # the stored paths hold too few this shallow
                paths = best_paths(self.bundle.rank_probs()[:depth], nodes)
        return DraftTree.from_paths(paths[:nodes])

    def propose(self, t: TreeTensors, *, head_logits: torch.Tensor, h=None, root=None, pos=None, attn_len=None) -> Draft:
        """(k-1, V) logits of heads +2..+k from the root's row -> a token per node of the tree t."""
        guesses = top_indices(head_logits, t.top)  # (k-1, R)
        return Draft(guesses[t.depths[1:] - 1, t.ranks], head_logits)


def draft_by_level(level, first: torch.Tensor, root: torch.Tensor, levels: tuple[LevelTensors, ...], n: int,
                   vocab, chain_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tree drafted depth by depth, each node's guesses from a state its parent's state and its own token
    make: level(before (r, d) the parents' states (depth 0: first[None]), tokens (r,) the rows' own, depth,
    top) -> (the rows' states, their logits (r, V'), their `top` guesses (r, top) as positions in V').
    -> (n,) a token per node and, if asked, (depths, V') the first row's logits at each depth."""
    tokens = torch.cat([root.view(1), root.new_zeros(n)])  # by feed row; rows 1.. filled depth by depth
    states = first.new_zeros(n + 1, first.shape[-1])
    chain = []
    for d, lv in enumerate(levels):
        before = first[None] if d == 0 else states.index_select(0, lv.parents)  # (r, d) the parents' states
        s, logits, best = level(before, tokens.index_select(0, lv.rows), d, lv.top)
        states = states.index_copy(0, lv.rows, s)
        guesses = best[lv.child_of, lv.ranks]  # (children,)
        if vocab is not None:
            guesses = vocab.ids.index_select(0, guesses)
        tokens = tokens.index_copy(0, lv.children + 1, guesses)
        chain.append(logits[0])
    return tokens[1:], torch.stack(chain) if chain_logits else None


class TokenDrafter(HeadDrafter):
    """Token-conditioned heads as a drafter: a node's guesses come from its parent's state updated by its
    parent's token, so a tree is drafted one depth after another, each depth one LM-head matmul over the
    rows that have children. With a draft vocabulary (bundle.draft_ids, the tokens the answers use most)
    that matmul reads only those rows of the LM head."""

    fused = False

    def __init__(self, bundle, lm_head, embed):
        super().__init__(bundle)
        self.heads, self.embed = bundle.heads, embed
        self.vocab = VocabSlice(lm_head, bundle.draft_ids) if bundle.draft_ids is not None else None
        self.lm_head = self.vocab if self.vocab is not None else lm_head  # (r, d) -> (r, V') logits

    def propose(self, t: TreeTensors, *, h: torch.Tensor, root: torch.Tensor, head_logits=None, pos=None,
                attn_len=None) -> Draft:
        """h (d,) the root's hidden row and root () its token -> a token per node of the tree t."""
        # a chain's logits per offset (what a CLP reading head confidences needs; over the draft vocabulary,
        # as training computed them)
        full_chain = t.is_chain and t.n == self.k - 1
        tokens, chain = draft_by_level(self.level, h, root, t.levels, t.n, self.vocab, full_chain)
        return Draft(tokens, chain)

    def level(self, before: torch.Tensor, tokens: torch.Tensor, depth: int, top: int):
        """One depth: the parents' states (r, d) updated by their tokens (r,) -> the new states, their
        logits (r, V') and each row's `top` guesses (r, top), as positions in V'."""
        s = self.heads.update(before, self.embed(tokens), depth).to(before.dtype)
        logits = self.lm_head(s)
        return s, logits, top_indices(logits, top)


class BlockDrafter(HeadDrafter):
    """The block drafter (block.BlockModel) as a drafter: one pass drafts a block anchored on the root, its
    slot j the guess for offset j + 1, read as independent heads' logits are (the argmax chain, or a tree of
    each slot's runners-up chosen from held-out rank statistics). Its context is the backbone's states at
    the layers `taps` of every position before the root, cached by position (`remember`, each step's kept
    rows; a rejected row's slot is overwritten before a draft reads it)."""

    fused = False

    def __init__(self, bundle, lm_head, embed):
        super().__init__(bundle)
        self.block, self.embed = bundle.heads, embed
        self.taps = tuple(self.block.c.taps)
        self.cache = None  # block.ContextCache, from allocate
        self.vocab = VocabSlice(lm_head, bundle.draft_ids) if bundle.draft_ids is not None else None
        self.lm_head = self.vocab if self.vocab is not None else lm_head

    def allocate(self, slots: int, device, dtype) -> None:
        self.cache = self.block.allocate(slots, device, dtype)

    def remember(self, taps: torch.Tensor, pos: torch.Tensor) -> None:
        """(n, n_taps * d) the backbone's tapped states at positions pos (n,) -> the context cache."""
        self.block.extend(self.cache, taps, pos)

    def propose(self, t: TreeTensors, *, root: torch.Tensor, pos: torch.Tensor, attn_len: int | None = None,
                h=None, head_logits=None) -> Draft:
        """root () the backbone's token at position pos () -> a token per node of the tree t, from the block's
        (B-1, V') logits (attention over the first attn_len cached slots: they cover pos)."""
        if self.block.tc is not None:  # each depth's guesses follow the token drafted above it
            x = self.block.draft_states(self.cache, self.embed, root, pos, attn_len)

            def level(before, tokens, depth, top):
                s = self.block.step(x, before, self.embed(tokens), depth + 1)
                logits = self.lm_head(self.block.norm(s).to(self.lm_head.weight.dtype))
                return s, logits, top_indices(logits, top)

            return Draft(*draft_by_level(level, x[0], root, t.levels, t.n, self.vocab, t.is_chain))
        logits = self.block.draft(self.cache, self.embed, self.lm_head, root, pos, attn_len)
        guesses = top_indices(logits, t.top)  # (B-1, R)
        tokens = guesses[t.depths[1:] - 1, t.ranks]
        if self.vocab is not None:
            tokens = self.vocab.ids.index_select(0, tokens)
        return Draft(tokens, logits)
