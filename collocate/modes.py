"""Decoding modes as rules: one small frozen object per mode, which is also the key of its step's graphs.

    rule = rule_class(cfg).build(cfg, drafter, threshold)   # Ar, Verify, AdaptiveVerify, Clp, Gate, Compete
    kept, wrong = rule.accept(own, ids, tree, probs, u)       # what a step keeps of what it fed
    nxt = rule.next(at, kit)                                  # the next root, its draft, how much to feed
    emitted, n = rule.emit(ids, kept, nxt, feed)              # what the step emits

A rule says which options it reads and how they combine (checked when a DecodeConfig is made), which
widths its steps have, and, in tensor ops from rules.py, what a step keeps and what it feeds next. The
lossless rules (ar, verify) emit only what the backbone's own argmax confirms; the unverified ones (clp,
gate, compete: the paper's) emit head tokens at once and count, from the next pass, those the backbone
would not have written. Graphs are keyed by the rule and the step's width, never by a threshold's value
(that lives in a device tensor).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from .draft import MAX_TREE, DraftTree, TreeTensors
from .errors import DecodeError
from .rules import Kept, compete, longest_accepted, pick, sampled_accepted

MAX_CANDIDATES = 8
# `clp` with neither --threshold nor --max-wrong nor --argmax: the calibrated threshold whose held-out wrong
# share is at most this (or the bundle's most cautious one, where none is that low); bench/README.md (the
# whole-suite frontier) says why this value
CLP_DEFAULT_MAX_WRONG = 0.01
# --exact feeds every step this many rows (--exact-width), ar included, so that no row's arithmetic depends
# on the step's width (matmul kernels are chosen by shape); 16 rows cost ~1.07x a 1-row step on the H200
# (bench/README.md). A wider one holds a bigger tree: a multiple of 16, up to one that holds MAX_TREE nodes
EXACT_WIDTH = 16
EXACT_WIDTHS = tuple(range(16, MAX_TREE + 17, 16))
# the options every mode reads
COMMON = frozenset({"mode", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"})


class At(NamedTuple):
    """The new root, which the next draft grows from."""
    h: torch.Tensor  # (d,) its hidden row
    root: torch.Tensor  # () the backbone's token there (sampling: drawn)
    heads: torch.Tensor | None  # (n_heads, V) independent heads' logits at that row (None: token-conditioned)
    drafts: TreeTensors  # the rule's draft tree
    pos: torch.Tensor  # () the root's position
    attn_len: int | None  # cache slots the step's attention read (a drafter with a context cache reads as many)


class Kit(NamedTuple):
    """What a rule's `next` may read besides the root."""
    drafter: object  # draft.HeadDrafter or TokenDrafter
    bundle: object  # bundle.MTPBundle: its CLPs and gates
    threshold: torch.Tensor  # () the request's threshold (CLP's or the gates')


class Next(NamedTuple):
    """What follows a step's new root, on the device."""
    root: torch.Tensor  # () the root token (the backbone's own; `compete`: maybe the +1 head's)
    draft: torch.Tensor  # (n,) draft tokens from the root's heads
    n: torch.Tensor  # () how many of them the next step feeds (unverified modes: emitted now, unchecked)
    overrides: torch.Tensor  # () compete: 1 when the +1 head replaced the backbone's token


def check_exact_fits(cfg, nodes: int) -> None:
    if nodes + 1 > cfg.exact_width:
        fits = next((w for w in EXACT_WIDTHS if w > nodes), None)
        raise DecodeError(f"--exact feeds {cfg.exact_width} rows a step (--exact-width), the root and at most "
                          f"{cfg.exact_width - 1} draft nodes; a draft of {nodes} needs --exact-width {fits} "
                          "(and ar at that width to compare with)")


def exact_rows(cfg, tree: DraftTree) -> int:
    """The rows every --exact step feeds (0: not --exact); a draft the width cannot hold is refused."""
    if not cfg.exact:
        return 0
    check_exact_fits(cfg, tree.n)
    return cfg.exact_width


@dataclass(frozen=True)
class Rule:
    """What every step of one generation does; subclasses are the modes."""
    tree: DraftTree = DraftTree(())  # the draft fed after the root (unverified: the head tokens they may take)
    exact: int = 0  # --exact: every step feeds this many rows (--exact-width); those past the draft are padding
    sample: bool = False  # temperature > 0 (the values live in device tensors)
    top_k: bool = False  # sampling filters in use
    top_p: bool = False

    name: ClassVar[str]
    options: ClassVar[frozenset]  # the DecodeConfig fields this mode reads
    lossless: ClassVar[bool]  # its answers are the backbone's own (so head accuracy can be read off them)
    drafts: ClassVar[bool] = True  # a drafter proposes a draft after each root
    any_root: ClassVar[bool] = True  # any kept row can be the next root (so heads run at every fed row)
    plus_one: ClassVar[bool] = False  # the +1 head's logits too (compete)
    fixed: ClassVar[bool] = True  # every step feeds the whole draft (the context's edge aside)

    # -- options -----------------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg) -> None:
        """How this mode's options combine (each one's range is DecodeConfig's)."""

    @classmethod
    def check_bundle(cls, cfg, bundle) -> None:
        if bundle is None:
            raise DecodeError(f"mode '{cls.name}' needs an MTP bundle (--heads DIR)")

    @classmethod
    def threshold(cls, cfg, bundle) -> float | None:
        return cfg.threshold

    @classmethod
    def calibrated_share(cls, cfg) -> float | None:
        """The held-out wrong share its threshold was calibrated for, where it was (clp's default)."""
        return None

    @classmethod
    def build(cls, cfg, drafter, threshold: float | None) -> "Rule":
        return cls(drafter.tree(), **sampling(cfg))

    # -- widths ------------------------------------------------------------------------------------
    @property
    def widths(self) -> tuple[int, ...]:
        """Every feed width a step of this rule can have (the context edge adds width 1)."""
        if self.exact:
            return (self.exact,)
        return (1 + self.tree.n,) if self.fixed else tuple(range(1, self.tree.n + 2))

    @property
    def fixed_width(self) -> int | None:
        """The width of every step, where no step's result decides it (None: the rule decides each step)."""
        return 1 + self.tree.n if self.fixed else None

    @property
    def most_emitted(self) -> int:
        """The most tokens one step can emit: the draft's longest path and the root."""
        return self.tree.max_depth + 1

    @functools.lru_cache(maxsize=None)  # (the host asks every step; a rule has a few widths)
    def fed(self, width: int) -> DraftTree:
        """The tree a step of this width feeds after the root: a prefix of the draft, or (exact) the whole
        draft padded to `exact` - 1 nodes (a chain stays a chain)."""
        if not self.exact:
            return self.tree.first(width - 1)
        if self.tree.is_chain:
            return DraftTree.chain(self.exact - 1)
        pad = self.exact - 1 - self.tree.n
        return DraftTree(self.tree.parents + (0,) * pad, self.tree.ranks + (0,) * pad)

    def seen(self, ids: torch.Tensor, n_fed: torch.Tensor) -> torch.Tensor:
        """The fed ids as the rule reads them: --exact marks the padding past the draft -1 (never kept)."""
        if not self.exact:
            return ids
        rows = torch.arange(ids.shape[0], device=ids.device)
        return torch.where(rows <= n_fed, ids, -1)

    def proposal(self, nxt: Next, n: int) -> torch.Tensor:
        """The drafter's argmax chain from the root, +2..+k (for head accuracy); -1 past the tree's chain."""
        rows = self.tree.chain_rows
        if rows >= n:
            return nxt.draft[:n]
        return torch.cat([nxt.draft[:rows], nxt.draft.new_full((n - rows,), -1)])

    def draft(self, at: At, kit: Kit):
        return kit.drafter.propose(at.drafts, h=at.h, root=at.root, head_logits=at.heads, pos=at.pos,
                                   attn_len=at.attn_len)


@dataclass(frozen=True)
class Lossless(Rule):
    """Feeds a draft and keeps the longest path the backbone agrees with (sampling: speculative sampling)."""
    lossless = True

    def accept(self, own, ids, t, probs=None, u=None) -> tuple[Kept, torch.Tensor]:
        zero = torch.zeros((), dtype=torch.long, device=ids.device)
        if probs is not None:
            return sampled_accepted(probs, ids, t, u[:-1]), zero
        return longest_accepted(own, ids, t), zero

    def emit(self, ids, kept: Kept, nxt: Next, feed) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept path, then the backbone's token after it."""
        path = torch.cat([ids.index_select(0, kept.path), nxt.root.view(1)])
        at_end = torch.arange(path.shape[0], device=ids.device) == kept.count
        return torch.where(at_end, nxt.root, path), kept.count + 1

    def ahead(self, width: int) -> int:
        """Slots a step of this width writes past the context: its draft."""
        return width - 1

    def account(self, stats, res, fed: int) -> None:
        stats.steps += 1
        stats.drafted += fed
        stats.draft_accepted += res.kept

    def record(self, n_out: int, emitted: list[int], res) -> tuple[int, list[int]] | None:
        """(index of the new root in the answer, the heads' chain from it), for head accuracy."""
        return n_out + len(emitted) - 1, res.proposal[: res.next_width - 1]


@dataclass(frozen=True)
class Ar(Lossless):
    name = "ar"
    options = COMMON | {"exact", "exact_width"}
    drafts = False

    @classmethod
    def check_bundle(cls, cfg, bundle) -> None:
        pass

    @classmethod
    def build(cls, cfg, drafter, threshold):
        return cls(DraftTree(()), exact=exact_rows(cfg, DraftTree(())), **sampling(cfg))

    def next(self, at: At, kit: Kit) -> Next:
        zero = torch.zeros((), dtype=torch.long, device=at.root.device)
        return Next(at.root, zero[None][:0], zero, zero)

    def proposal(self, nxt, n):
        return nxt.draft

    def record(self, n_out, emitted, res):
        return None


@dataclass(frozen=True)
class Verify(Lossless):
    name = "verify"
    options = COMMON | {"exact", "exact_width", "candidates", "tree_size", "tree_depth"}

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.tree_size and cfg.candidates > 1:
            raise DecodeError("--tree-size applies to mode 'verify' without --adaptive or --candidates only")
        if cfg.tree_depth is not None and (cfg.tree_depth < 1 or not cfg.tree_size):
            raise DecodeError(f"--tree-depth (>= 1) limits a --tree-size tree; got depth {cfg.tree_depth} "
                              f"with tree size {cfg.tree_size}")
        if cfg.exact:
            check_exact_fits(cfg, cfg.tree_size or 0)

    @classmethod
    def build(cls, cfg, drafter, threshold):
        tree = drafter.tree(candidates=cfg.candidates, nodes=cfg.tree_size or 0, depth=cfg.tree_depth)
        return cls(tree, exact=exact_rows(cfg, tree), **sampling(cfg))

    def next(self, at: At, kit: Kit) -> Next:
        zero = torch.zeros((), dtype=torch.long, device=at.root.device)
        return Next(at.root, self.draft(at, kit).tokens, zero + self.tree.n, zero)


@dataclass(frozen=True)
class ClpRule(Rule):
    """A rule that the CLP sizes: which of the bundle's CLPs, and whether it takes its argmax."""
    clp_argmax: bool = False  # no threshold: the CLP's likeliest length
    clp_features: str | None = None  # which of the bundle's CLPs (None: its default)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.argmax and (cfg.threshold is not None or cfg.max_wrong is not None):
            raise DecodeError("--argmax is CLP's rule (mode 'clp' or verify --adaptive), without --threshold "
                              "or --max-wrong")

    @classmethod
    def check_bundle(cls, cfg, bundle) -> None:
        super().check_bundle(cfg, bundle)
        bundle.clp_for(cfg.clp_features)  # a CLP this bundle lacks: a BundleError before any step

    @classmethod
    def build(cls, cfg, drafter, threshold):
        tree = drafter.tree()
        return cls(tree, exact=exact_rows(cfg, tree), clp_argmax=threshold is None, clp_features=cfg.clp_features,
                   **sampling(cfg))

    def next(self, at: At, kit: Kit) -> Next:
        """The draft, and as many of its tokens as the CLP takes."""
        draft = self.draft(at, kit)
        clp = kit.bundle.clp_for(self.clp_features)
        n = clp.accept(at.h, draft.chain_logits, threshold=None if self.clp_argmax else kit.threshold)
        return Next(at.root, draft.tokens, n, torch.zeros_like(n))


@dataclass(frozen=True)
class AdaptiveVerify(ClpRule, Lossless):
    """verify --adaptive: the CLP chooses how many drafts to feed; the backbone still checks them."""
    name = "verify"
    options = COMMON | {"exact", "exact_width", "adaptive", "threshold", "argmax", "clp_features"}
    fixed = False


@dataclass(frozen=True)
class Unverified(Rule):
    """Emits the root and the head tokens its rule takes at once; the next step feeds them, and the
    backbone's argmax there says, for the record, how many it would not have written."""
    lossless = False
    any_root = False  # every fed row is kept: the next root follows the last one
    fixed = False

    def accept(self, own, ids, t, probs=None, u=None) -> tuple[Kept, torch.Tensor]:
        last = torch.full((), ids.shape[0] - 1, device=ids.device)
        kept = Kept(last, last, torch.arange(1, ids.shape[0], device=ids.device))
        return kept, (own[t.parents] != ids[1:]).sum()

    def emit(self, ids, kept, nxt: Next, feed) -> tuple[torch.Tensor, torch.Tensor]:
        return feed, nxt.n + 1

    def ahead(self, width: int) -> int:
        return 0  # it feeds what it emitted already

    def account(self, stats, res, fed: int) -> None:
        stats.steps += 1
        stats.head_checked += fed + res.overrides
        stats.head_wrong += res.wrong + res.overrides
        stats.head_accepted += res.n_emitted - 1 + res.overrides

    def record(self, n_out: int, emitted: list[int], res) -> tuple[int, list[int]]:
        return n_out, res.proposal


@dataclass(frozen=True)
class Clp(ClpRule, Unverified):
    """The paper's CLP: the span it predicts is emitted unchecked."""
    name = "clp"
    options = COMMON | {"threshold", "max_wrong", "argmax", "clp_features"}

    @classmethod
    def threshold(cls, cfg, bundle) -> float | None:
        """Given, or read from the bundle's held-out calibration (--max-wrong, or by default the share
        CLP_DEFAULT_MAX_WRONG); None: the CLP's argmax (--argmax, or a bundle with no calibration)."""
        if cfg.max_wrong is not None:
            return bundle.threshold_for(cfg.max_wrong, cfg.clp_features)
        if cfg.threshold is None and not cfg.argmax:
            return bundle.safe_threshold(CLP_DEFAULT_MAX_WRONG, cfg.clp_features)
        return cfg.threshold

    @classmethod
    def calibrated_share(cls, cfg) -> float | None:
        return cfg.max_wrong or CLP_DEFAULT_MAX_WRONG if cfg.threshold is None and not cfg.argmax else None

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.max_wrong is not None and cfg.threshold is not None:
            raise DecodeError("--max-wrong picks clp's threshold: mode 'clp', without --threshold")


@dataclass(frozen=True)
class Gate(Unverified):
    """The gate baseline: head tokens one by one until the first gate under the threshold."""
    name = "gate"
    options = COMMON | {"threshold"}

    @classmethod
    def check_bundle(cls, cfg, bundle) -> None:
        super().check_bundle(cfg, bundle)
        if bundle.gates is None:
            raise DecodeError(f"mode '{cls.name}' needs gates, and this bundle has none (train with --gates)")

    def next(self, at: At, kit: Kit) -> Next:
        tokens = self.draft(at, kit).tokens
        n = kit.bundle.gates.accept(at.h, threshold=kit.threshold, last=tokens.shape[0])
        return Next(at.root, tokens, n, torch.zeros_like(n))


@dataclass(frozen=True)
class Compete(Gate):
    """Head competition: a +1 head may replace the backbone's token when its gate says so."""
    name = "compete"
    plus_one = True

    @classmethod
    def check_bundle(cls, cfg, bundle) -> None:
        super().check_bundle(cfg, bundle)
        if not bundle.heads.compete:
            raise DecodeError("mode 'compete' needs a bundle trained with a +1 head (collocate train --compete)")

    def next(self, at: At, kit: Kit) -> Next:
        tokens = pick(at.heads)  # the +1 head's token, then the others'
        first, n, overrides = compete(at.root, tokens, kit.bundle.gates.probs(at.h), kit.threshold)
        return Next(first, tokens[1:], n, overrides)

    def proposal(self, nxt, n):
        return nxt.draft[:n]


RULES = {"ar": Ar, "clp": Clp, "gate": Gate, "compete": Compete, "verify": Verify}
MODES = tuple(RULES)


def rule_class(cfg) -> type[Rule]:
    """The rule of a config's mode (verify --adaptive: AdaptiveVerify)."""
    if cfg.mode not in RULES:
        raise DecodeError(f"unknown mode '{cfg.mode}'; choose one of {', '.join(MODES)}")
    return AdaptiveVerify if cfg.mode == "verify" and cfg.adaptive else RULES[cfg.mode]


def sampling(cfg) -> dict:
    sample = cfg.temperature > 0
    return dict(sample=sample, top_k=sample and cfg.top_k > 0, top_p=sample and cfg.top_p < 1)

