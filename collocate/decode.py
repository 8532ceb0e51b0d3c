"""The decode loop: one host loop over a backend, with a drafter and an acceptance rule per mode.

    dec = build_decoder(model, tokenizer, bundle)        # collocate.engine: the eager or the fast backend
    result = dec.generate(prompt_ids, DecodeConfig(mode="verify", max_new_tokens=128))
    for tokens in dec.stream(prompt_ids, cfg): ...        # the same loop, a chunk of new tokens per step

A step feeds the root (the backbone's newest token) and a draft after it, and then, all on the device:
  1. checks the fed draft against the backbone's own argmax: `verify` keeps the longest agreeing path
     (rules.longest_accepted); the unverified modes fed head tokens they had emitted already, and count
     the ones the backbone disagrees with, for free;
  2. takes the backbone's argmax after the last kept row as the next root (Backbone-as-Architect;
     `compete` lets a +1 head replace it);
  3. has the drafter propose the next draft from that row's heads, and the mode's rule say how many of
     its tokens to feed (verify: all, or CLP's count with --adaptive) or to emit unchecked (clp, gate,
     compete).
The host reads one small StepResult a step (ar and plain verify: while the next step runs, `overlap`)
and keeps the books: budget, EOS, stop strings, stats, streaming. Backends (backend.HFBackend, fast.StaticBackend) only run the forward and keep or drop
what it wrote.
"""
from __future__ import annotations

import functools
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, NamedTuple

import torch

from .clp import CLP_FEATURES, GATE_THRESHOLD
from .draft import MAX_TREE, DraftTree, HeadDrafter, TokenDrafter, TreeTensors
from .rules import (Kept, Sampling, compete, filtered_probs, leading_true, longest_accepted, pick, residual_draw,
                    sampled_accepted, span_at_threshold, uniforms)

MODES = ("ar", "clp", "gate", "compete", "verify")
UNVERIFIED = ("clp", "gate", "compete")
MAX_CANDIDATES = 8
# `clp` with neither --threshold nor --max-wrong nor --argmax: the calibrated threshold whose held-out wrong
# share is at most this (or the bundle's most cautious one, where none is that low); bench/README.md (the
# whole-suite frontier) says why this value
CLP_DEFAULT_MAX_WRONG = 0.01
# --exact feeds every step this many rows, ar included, so that no row's arithmetic depends on the step's
# width (matmul kernels are chosen by shape); 16 rows cost ~1.07x a 1-row step on the H200 (bench/README.md)
EXACT_WIDTH = 16


class DecodeError(ValueError):
    """Bad input to the decoder: empty or too-long prompt, a mode the bundle cannot run."""


@dataclass
class DecodeConfig:
    mode: str = "ar"
    max_new_tokens: int = 256
    threshold: float | None = None  # CLP tau (threshold rule) or gate threshold; None: clp calibrated, gate 0.5
    max_wrong: float | None = None  # clp: the threshold whose held-out wrong share is at most this
    argmax: bool = False  # clp (and verify --adaptive): the CLP's likeliest length, the paper's reading
    clp_features: str | None = None  # which of the bundle's CLPs (None: its default)
    adaptive: bool = False  # verify: CLP picks the draft length instead of always k-1
    candidates: int = 1  # verify: also check the +2 head's next best tokens, side by side
    tree_size: int | None = None  # verify: draft the bundle's best tree of this many nodes
    tree_depth: int | None = None  # with tree_size: the best tree whose paths are at most this deep
    exact: bool = False  # every step at one width (EXACT_WIDTH rows): verify bitwise equal to ar in any dtype
    temperature: float = 0.0  # 0: greedy; > 0: sample (verify: speculative sampling, ar's distribution)
    top_k: int = 0  # sampling: keep the k likeliest tokens (0: all)
    top_p: float = 1.0  # sampling: keep the smallest set of tokens whose mass reaches top_p
    seed: int | None = None  # sampling: the same seed gives the same answer (None: a fresh one)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise DecodeError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise DecodeError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.max_wrong is not None:
            if not 0.0 < self.max_wrong < 1.0:
                raise DecodeError(f"max_wrong is a share of head tokens and must lie in (0, 1), got {self.max_wrong}")
            if self.mode != "clp" or self.threshold is not None:
                raise DecodeError("--max-wrong picks clp's threshold: mode 'clp', without --threshold")
        clp_rule = self.mode == "clp" or self.adaptive
        if self.argmax and (not clp_rule or self.threshold is not None or self.max_wrong is not None):
            raise DecodeError("--argmax is CLP's rule (mode 'clp' or verify --adaptive), without --threshold "
                              "or --max-wrong")
        if self.clp_features is not None:
            if self.clp_features not in CLP_FEATURES:
                raise DecodeError(f"unknown CLP features '{self.clp_features}'; choose {', '.join(CLP_FEATURES)}")
            if not clp_rule:
                raise DecodeError("--clp-features picks the CLP: mode 'clp' or verify --adaptive")
        if self.adaptive and self.mode != "verify":
            raise DecodeError("--adaptive applies to mode 'verify' only")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise DecodeError(f"candidates must lie in 1..{MAX_CANDIDATES}, got {self.candidates}")
        if self.candidates > 1 and (self.mode != "verify" or self.adaptive):
            raise DecodeError("--candidates applies to mode 'verify' without --adaptive only")
        if self.tree_size is not None and not 1 <= self.tree_size <= MAX_TREE:
            raise DecodeError(f"tree size counts draft nodes and must lie in 1..{MAX_TREE}, got {self.tree_size}")
        if self.tree_size and (self.mode != "verify" or self.adaptive or self.candidates > 1):
            raise DecodeError("--tree-size applies to mode 'verify' without --adaptive or --candidates only")
        if self.tree_depth is not None and (self.tree_depth < 1 or not self.tree_size):
            raise DecodeError(f"--tree-depth (>= 1) limits a --tree-size tree; got depth {self.tree_depth} "
                              f"with tree size {self.tree_size}")
        if self.exact and self.mode not in ("ar", "verify"):
            raise DecodeError("--exact applies to the lossless modes, ar and verify")
        if not 0.0 <= self.temperature <= 100.0:
            raise DecodeError(f"temperature must lie in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise DecodeError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DecodeError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise DecodeError(f"seed must lie in [0, 2^63), got {self.seed}")
        if self.exact and (self.tree_size or 0) + 1 > EXACT_WIDTH:
            raise DecodeError(f"--exact feeds {EXACT_WIDTH} rows a step: a tree of at most {EXACT_WIDTH - 1} nodes")
        self.stop = tuple(self.stop)


@dataclass
class DecodeStats:
    new_tokens: int = 0
    steps: int = 0  # backbone forward passes, prefill included
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # of which the prompt's pass, until its first token was on the host
    head_accepted: int = 0  # unverified modes: head tokens emitted without a check
    head_wrong: int = 0  # ... of which the backbone's own argmax disagreed (read from the next pass)
    head_checked: int = 0
    drafted: int = 0  # verify: draft tokens fed for checking
    draft_accepted: int = 0

    def counts(self) -> "DecodeStats":
        """The same stats with the times zeroed: what two runs of the same decode must agree on."""
        return replace(self, seconds=0.0, prefill_seconds=0.0)

    @property
    def tau(self) -> float:
        """Tokens per backbone forward pass."""
        return self.new_tokens / max(self.steps, 1)

    @property
    def tok_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    @property
    def wrong_share(self) -> float:
        return self.head_wrong / max(self.head_checked, 1)

    @property
    def draft_acceptance(self) -> float:
        return self.draft_accepted / max(self.drafted, 1)


@dataclass
class DecodeResult:
    tokens: list[int]  # the new tokens only
    text: str
    stats: DecodeStats
    finish_reason: str  # eos | length | stop
    proposals: list[tuple[int, list[int]]] = field(default_factory=list)  # (index of the root, head tokens)


@dataclass(frozen=True)
class Plan:
    """What every step of one generation does. Graphs are keyed by it and the feed width, never by a
    threshold's value (that lives in a device tensor)."""
    mode: str
    tree: DraftTree  # the draft fed after the root (unverified modes: the head tokens they may take)
    adaptive: bool = False
    clp_argmax: bool = False  # CLP without a threshold takes its argmax
    clp_features: str | None = None  # which of the bundle's CLPs (None: its default)
    exact: bool = False  # every step feeds EXACT_WIDTH rows; those past the draft are padding, never kept
    sample: bool = False  # temperature > 0 (the values live in Decoder.sampling)
    top_k: bool = False  # sampling filters in use
    top_p: bool = False

    @property
    def verify(self) -> bool:
        return self.mode == "verify"

    @property
    def fixed_width(self) -> int | None:
        """The width of every step (the root and the draft fed), where no step's result decides it: ar and
        plain verify (the context's edge aside). None: the rule decides it each step."""
        return 1 + self.tree.n if self.mode == "ar" or (self.verify and not self.adaptive) else None

    @property
    def most_emitted(self) -> int:
        """ar and verify: the most tokens one step can emit, the longest path of the draft and the root."""
        return self.tree.max_depth + 1

    @property
    def widths(self) -> tuple[int, ...]:
        """Every feed width a step of this plan can have (the context edge adds width 1)."""
        if self.exact:
            return (EXACT_WIDTH,)
        if self.verify and not self.adaptive:
            return (1 + self.tree.n,)
        return tuple(range(1, self.tree.n + 2))

    @functools.lru_cache(maxsize=None)  # (the host asks every step; a plan has a few widths)
    def fed(self, width: int) -> DraftTree:
        """The tree a step of this width feeds after the root: a prefix of the draft, or (exact) the whole
        draft padded to EXACT_WIDTH - 1 nodes (a chain stays a chain, so it keeps the causal mask)."""
        if not self.exact:
            return self.tree.first(width - 1)
        pad = EXACT_WIDTH - 1 - self.tree.n
        if self.tree.is_chain:
            return DraftTree.chain(EXACT_WIDTH - 1)
        return DraftTree(self.tree.parents + (0,) * pad, self.tree.ranks + (0,) * pad)


class StepOut(NamedTuple):
    """One step's result, on the device."""
    emitted: torch.Tensor  # tokens to emit now; the first n_emitted count
    n_emitted: torch.Tensor  # ()
    next_width: torch.Tensor  # () rows the next step feeds: the root and next_width - 1 draft tokens
    kept: torch.Tensor  # () fed drafts kept (verify: those the backbone agreed with; else all)
    wrong: torch.Tensor  # () unverified: fed head tokens the backbone's argmax disagrees with
    overrides: torch.Tensor  # () compete: +1 head tokens emitted over the backbone's own
    proposal: torch.Tensor  # (k-1,) the +2..+k heads' argmax from the new root's row


class Settled(NamedTuple):
    """What a step's forward decided (Decoder.settle), before the step's state is updated."""
    out: StepOut
    kept: Kept  # the fed rows that stay: the backend keeps their K/V
    feed: torch.Tensor  # the next step's feed: its root and draft


class Next(NamedTuple):
    """What follows a step's new root, on the device."""
    root: torch.Tensor  # () the root token (the backbone's own; `compete`: maybe the +1 head's)
    draft: torch.Tensor  # (n,) draft tokens from the root's heads
    n: torch.Tensor  # () how many of them the next step feeds (unverified modes: emitted now, unchecked)
    overrides: torch.Tensor  # () compete: 1 when the +1 head replaced the backbone's token


@dataclass
class StepResult:
    """StepOut on the host."""
    emitted: list[int]
    n_emitted: int
    next_width: int
    kept: int
    wrong: int
    overrides: int
    proposal: list[int]


class Packed(NamedTuple):
    """A StepOut as one tensor, so the host reads a step with one copy; `read` names the fields again."""
    flat: torch.Tensor
    shapes: tuple[tuple[int, ...], ...]  # each field's shape, in StepOut's order
    copied: torch.cuda.Event | None = None  # to_host: recorded after the copy; read waits for it

    @staticmethod
    def of(out: StepOut) -> "Packed":
        return Packed(torch.cat([t.reshape(-1).long() for t in out]), tuple(tuple(t.shape) for t in out))

    def to_host(self) -> "Packed":
        """Start the copy to the host without waiting for it: the device may run the next step before the
        host reads this one (a graph's next replay overwrites its output, not this copy)."""
        if self.flat.device.type != "cuda":
            return self
        host = torch.empty(self.flat.shape, dtype=self.flat.dtype, pin_memory=True)
        host.copy_(self.flat, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return Packed(host, self.shapes, copied)

    def read(self) -> StepResult:
        if self.copied is not None:
            self.copied.synchronize()
        values, start, named = self.flat.tolist(), 0, {}  # the one host sync of a step
        for name, shape in zip(StepOut._fields, self.shapes):
            size = shape[0] if shape else 1
            named[name] = values[start:start + size] if shape else values[start]
            start += size
        return StepResult(**named)


class Decoder:
    """The decode loop over a backend (the HF model with its cache, or the static cache with graphs)."""

    def __init__(self, backend, tokenizer=None, bundle=None, *, eos_token_ids: list[int] | None = None,
                 overlap: bool | None = None):
        """overlap: a plan of one step width queues each step before the host reads the one before it, so the
        device never waits for the host's bookkeeping (None: on CUDA; a finished answer wastes one step)."""
        self.backend, self.tokenizer, self.bundle = backend, tokenizer, bundle
        self.model = backend.model
        self.lm_head = self.model.get_output_embeddings()
        self.device = self.lm_head.weight.device
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        if bundle is not None:  # in the backbone's dtype: float32 heads would run as slow float32 GEMVs
            bundle.to(self.device, self.lm_head.weight.dtype)
            self.drafter = TokenDrafter(bundle, self.lm_head, self.model.get_input_embeddings()) \
                if bundle.token_conditioned else HeadDrafter(bundle)
        self.eos = set(eos_token_ids if eos_token_ids is not None else eos_ids(self.model, tokenizer))
        width = max(EXACT_WIDTH, 1 + (max(bundle.k - 1 + MAX_CANDIDATES - 1, MAX_TREE) if bundle is not None else 0))
        self.feed = torch.zeros(width, dtype=torch.long, device=self.device)  # the next step's tokens
        self.pos0 = torch.zeros((), dtype=torch.long, device=self.device)  # position of feed[0]
        self.n_fed = torch.zeros((), dtype=torch.long, device=self.device)  # draft rows of the feed (--exact)
        # the prompt (then padding: the backend's prompt width), and its length
        self.prompt = torch.zeros(backend.capacity, dtype=torch.long, device=self.device)
        self.n_prompt = torch.zeros((), dtype=torch.long, device=self.device)
        self.threshold = torch.full((), GATE_THRESHOLD, device=self.device)  # per request, read by graphs
        long = dict(dtype=torch.long, device=self.device)
        self.warmed: set = set()  # (plan, width, attention length) steps run once already (warm_up)
        # compiled on first use by the compiling backend, once per plan and width (Decoder.step)
        self.settle_compiled = torch.compile(self.settle, fullgraph=True, dynamic=False)
        self.sampling = Sampling(torch.ones((), device=self.device), torch.zeros((), **long),
                                 torch.ones((), device=self.device), torch.zeros((), **long), torch.zeros((), **long))

    # -- one step: tensor work only (the fast backend captures it) ----------------------------------
    def step(self, ids: torch.Tensor, plan: Plan, tree: DraftTree | None, attn_len: int | None = None) -> StepOut:
        """Feed ids = [root, draft nodes of `tree`] (tree None: a prompt of n_prompt tokens, all committed,
        maybe then padding); attention reads the first attn_len cache slots (the backend's choice, None: all)."""
        h = self.backend.forward(ids, self.pos0, tree, attn_len)  # (m, d); K/V written at slots pos0..pos0+m-1
        prefill = tree is None
        if prefill:  # only the prompt's last row matters
            last = (self.n_prompt - 1).view(1)
            advance = self.n_prompt
            h, ids, tree = h.index_select(0, last), ids.index_select(0, last), DraftTree(())
        # the compiling backend runs the rest of a step as one compiled graph, so inductor fuses its many small
        # ops (accept rule, drafting, next feed) into a few kernels; a prompt's, once per answer, runs plain
        settle = self.settle_compiled if self.backend.compile_on and not prefill else self.settle
        s = settle(h, ids, plan, tree.tensors(self.device), plan.tree.tensors(self.device))
        if plan.sample:
            self.sampling.counter.add_(1)
        if not prefill:  # (a prompt keeps all it wrote)
            self.backend.keep(self.pos0, s.kept, tree)
            advance = 1 + s.kept.count
        self.feed[: s.feed.shape[0]].copy_(s.feed)
        self.n_fed.copy_(s.out.next_width - 1)
        self.pos0.add_(advance)
        return s.out

    def settle(self, h: torch.Tensor, ids: torch.Tensor, plan: Plan, t: TreeTensors, drafts: TreeTensors) -> "Settled":
        """What a step's forward output h decides, as a pure function of it: the backbone's tokens, which
        fed rows (tree t) stay, the next root and draft (tree `drafts`, the plan's), what to emit."""
        own_logits, heads = self.logits(h, plan)
        own = pick(own_logits)  # (m,) the backbone's token after each fed row
        if plan.exact:  # padding never matches, nor a node off the leading chain (see check)
            rows = torch.arange(ids.shape[0], device=self.device)
            ids = torch.where(rows <= self.n_fed.clamp(max=t.chain_rows), ids, -1)
        probs, u = None, None
        if plan.sample:  # the backbone's distribution after every row, and a uniform per node and the root
            probs = filtered_probs(own_logits, self.sampling, use_top_k=plan.top_k, use_top_p=plan.top_p)
            u = uniforms(self.sampling, ids.shape[0])
        kept, wrong = self.check(own, ids, t, plan, probs, u)
        if heads is not None:  # (n_heads, V) from the root's row
            heads = heads.index_select(0, kept.row.view(1))[0] if plan.verify else heads[0]
        row = kept.row.view(1)
        root = own.index_select(0, row)[0] if probs is None else residual_draw(probs, ids, t, row, u[-1])
        nxt = self.next_draft(plan, drafts, h, row, root, heads)
        fed_next = torch.cat([nxt.root.view(1), nxt.draft])  # the next step's feed
        if plan.verify:  # emit the kept path, then the backbone's token after it
            path_tokens = torch.cat([ids.index_select(0, kept.path), nxt.root.view(1)])
            emitted = torch.where(torch.arange(path_tokens.shape[0], device=self.device) == kept.count,
                                  nxt.root, path_tokens)
            n_emitted = kept.count + 1
        else:  # emit the root and the head tokens the rule takes; the next step feeds (checks) them
            emitted, n_emitted = fed_next, nxt.n + 1
        out = StepOut(emitted, n_emitted, nxt.n + 1, kept.count, wrong, nxt.overrides, self.proposal(plan, nxt))
        return Settled(out, kept, fed_next)

    def proposal(self, plan: Plan, nxt: "Next") -> torch.Tensor:
        """The drafter's argmax chain from the root, +2..+k (for head accuracy); -1 past the tree's chain."""
        n = self.bundle.k - 1 if self.bundle is not None else 0
        chain_rows = plan.tree.chain_rows
        if plan.mode == "ar":
            return nxt.draft
        if plan.mode == "compete" or chain_rows >= n:
            return nxt.draft[:n]
        return torch.cat([nxt.draft[:chain_rows], nxt.draft.new_full((n - chain_rows,), -1)])

    def check(self, own: torch.Tensor, ids: torch.Tensor, tree, plan: Plan, probs=None,
              u=None) -> tuple[Kept, torch.Tensor]:
        """Which fed rows stay, and (unverified modes) how many fed head tokens the backbone disagrees with.
        Sampling keeps drafts by speculative sampling (rules.sampled_accepted). --exact keeps a tree's
        leading chain only: a node off it attends to ancestors at other slots than ar would, so its result
        may differ in the last bit."""
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        if (plan.verify or plan.exact) and probs is not None:
            return sampled_accepted(probs, ids, tree, u[:-1]), zero
        if plan.verify or plan.exact:
            return longest_accepted(own, ids, tree), zero
        # the fed head tokens were emitted already: keep them all, count the wrong ones
        last = torch.full((), ids.shape[0] - 1, device=self.device)
        kept = Kept(last, last, torch.arange(1, ids.shape[0], device=self.device))
        return kept, (own[tree.parents] != ids[1:]).sum()

    def logits(self, h: torch.Tensor, plan: Plan):
        """Own-token logits of every row (m, V) and, for independent heads, the heads' logits
        (r, n_heads, V) of every row that can become the next root (verify: any; else the last), in one
        LM-head matmul (--exact: two, so the own logits' matmul has the same shape in every mode).
        Token-conditioned heads draft after the root is known (TokenDrafter.propose)."""
        if plan.mode == "ar" or not self.drafter.fused:
            return self.lm_head(h), None
        roots = h if plan.verify else h[-1:]
        states = self.bundle.heads(roots, with_first=plan.mode == "compete").to(h.dtype)  # (r, n_heads, d)
        if plan.exact:
            return self.lm_head(h), self.lm_head(states)
        logits = self.lm_head(torch.cat([h, states.flatten(0, 1)]))
        return logits[: h.shape[0]], logits[h.shape[0]:].view(*states.shape[:2], -1)

    def next_draft(self, plan: Plan, tree: TreeTensors, h: torch.Tensor, row: torch.Tensor, own: torch.Tensor,
                   heads: torch.Tensor | None) -> "Next":
        """The mode's rule at the new root (feed row `row`, shape (1,): index_select, since indexing by a
        0-d tensor reads it on the host), from its hidden row, the backbone's token `own` there and the
        heads' logits; the drafter fills `tree`."""
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        if plan.mode == "ar":
            return Next(own, zero[None][:0], zero, zero)
        h_root = h.index_select(0, row)[0]
        threshold = None if plan.clp_argmax else self.threshold
        clp = self.bundle.clp_for(plan.clp_features)
        if plan.mode == "compete":  # the +1 head's token and then the others': independent heads only
            tokens = pick(heads)
        else:
            draft = self.drafter.propose(tree, h=h_root, root=own, head_logits=heads)
            tokens = draft.tokens
        if plan.verify:
            if plan.adaptive:
                length = span_at_threshold(clp(h_root, draft.chain_logits), threshold)
                return Next(own, tokens, length, zero)
            return Next(own, tokens, torch.full((), plan.tree.n, device=self.device), zero)
        if plan.mode == "clp":
            return Next(own, tokens, span_at_threshold(clp(h_root, draft.chain_logits), threshold), zero)
        gate_p = self.bundle.gates(h_root).float().sigmoid()
        if plan.mode == "gate":
            return Next(own, tokens, leading_true(gate_p[-tokens.shape[0]:] >= threshold), zero)
        first, n, overrides = compete(own, tokens, gate_p, threshold)
        return Next(first, tokens[1:], n, overrides)

    def run_step(self, width: int, plan: Plan, end: int | None = None) -> Packed:
        """A step of this width from the feed buffer, writing no slot at or past `end` (None: anywhere);
        the fast backend replays the graph of its width and attention length."""
        fed = plan.fed(width)
        attn_len = self.attn_len(plan, end)

        def step() -> Packed:
            return Packed.of(self.step(self.feed[: fed.n + 1], plan, fed, attn_len))

        return self.backend.run((plan, fed.n + 1, attn_len), step, state=self.state).to_host()

    def run_prompt(self, prompt_ids: list[int], plan: Plan) -> Packed:
        """The prompt's pass, fed as the backend's prompt width (the fast backend replays a graph per width)."""
        n = len(prompt_ids)
        width = self.backend.prompt_width(n)
        self.prompt[:n].copy_(torch.tensor(prompt_ids))
        self.n_prompt.fill_(n)
        attn_len = self.attn_len(plan, width)

        def step() -> Packed:
            return Packed.of(self.step(self.prompt[:width], plan, None, attn_len))

        return self.backend.run((plan, "prompt", width, attn_len), step, state=self.state).to_host()

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        """What a step updates in place."""
        return self.feed, self.pos0, self.n_fed, self.sampling.counter

    # -- the loop ---------------------------------------------------------------------------------
    def plan(self, cfg: DecodeConfig) -> Plan:
        sample = dict(sample=cfg.temperature > 0, top_k=cfg.temperature > 0 and cfg.top_k > 0,
                      top_p=cfg.temperature > 0 and cfg.top_p < 1)
        if cfg.mode == "ar":
            return Plan("ar", DraftTree(()), exact=cfg.exact, **sample)
        tree = self.drafter.tree(candidates=cfg.candidates, nodes=cfg.tree_size or 0, depth=cfg.tree_depth)
        clp_rule = cfg.mode == "clp" or cfg.adaptive
        return Plan(cfg.mode, tree, adaptive=cfg.adaptive, clp_argmax=clp_rule and self.threshold_of(cfg) is None,
                    clp_features=cfg.clp_features if clp_rule else None,
                    exact=cfg.exact, **sample)

    def validate(self, prompt_ids: list[int], cfg: DecodeConfig) -> None:
        if len(prompt_ids) == 0:
            raise DecodeError("empty prompt: give at least one token")
        self.backend.check_fits(len(prompt_ids))
        if cfg.mode != "ar" and self.bundle is None:
            raise DecodeError(f"mode '{cfg.mode}' needs an MTP bundle (--heads DIR)")
        if cfg.mode in ("gate", "compete") and self.bundle.gates is None:
            raise DecodeError(f"mode '{cfg.mode}' needs gates, and this bundle has none (train with --gates)")
        if cfg.clp_features is not None:
            self.bundle.clp_for(cfg.clp_features)  # a CLP this bundle lacks: a BundleError before any step
        if cfg.mode == "compete" and not self.bundle.heads.compete:
            raise DecodeError("mode 'compete' needs a bundle trained with a +1 head (collocate train --compete)")
        if cfg.exact and not getattr(self.backend, "fixed_rows", False):
            raise DecodeError("--exact needs the fast engine's static cache (--engine fast): the eager one's "
                              "attention length changes with every step")

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], cfg: DecodeConfig | None = None) -> Iterator[list[int]]:
        """Yield each step's new tokens; the generator's return value is the DecodeResult."""
        cfg = cfg or DecodeConfig()
        prompt_ids = list(prompt_ids)
        self.validate(prompt_ids, cfg)
        plan = self.plan(cfg)
        threshold = self.threshold_of(cfg)
        self.threshold.fill_(GATE_THRESHOLD if threshold is None else threshold)
        self.set_sampling(cfg)
        capacity, n_prompt = self.backend.capacity, len(prompt_ids)
        # the answer may fill the context, no more (--exact: less the padding rows every step writes)
        budget = min(cfg.max_new_tokens, capacity - n_prompt - (EXACT_WIDTH - 1 if cfg.exact else 0))
        if budget < 1:
            raise DecodeError(f"prompt of {n_prompt} tokens leaves no room for --exact's {EXACT_WIDTH}-row steps "
                              f"in a context of {capacity}")
        if self.backend.captures:
            self.warm_up(plan, prompt_ids, n_prompt + budget + max(plan.widths))
        stats, out, proposals = DecodeStats(), [], []
        start = time.perf_counter()
        self.backend.reset()
        self.pos0.zero_()
        self.sampling.counter.zero_()
        res = self.run_prompt(prompt_ids, plan).read()
        stats.prefill_seconds = time.perf_counter() - start
        fed = 0  # draft tokens fed in the step just read
        queued: deque[tuple[Packed, int]] = deque()  # steps run or running, not read yet, with their draft rows
        while True:
            account(stats, res, fed, plan)
            emitted = res.emitted[: res.n_emitted]
            if plan.mode != "ar":
                root = len(out) + (len(emitted) - 1 if plan.verify else 0)
                proposals.append((root, res.proposal[: res.next_width - 1] if plan.verify else res.proposal))
            emitted, finish = self.cut(emitted, out, budget, cfg)
            out += emitted
            if emitted:
                yield emitted
            if finish != "continue":
                break  # (a step queued ahead has run for nothing)
            if not queued:
                width = res.next_width
                if not self.draft_fits(plan, n_prompt + len(out), width):
                    width = 1  # near the end of the context there is no room for a draft
                queued.append((self.run_step(width, plan, self.step_end(plan, n_prompt + len(out), width)), width - 1))
            if self.overlap and len(queued) == 1:
                self.queue_ahead(queued, plan, n_prompt, len(out), budget)
            packed, fed = queued.popleft()
            res = packed.read()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = len(out)
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer else ""
        if finish == "stop":
            text = cut_at_stop(text, cfg.stop)
        return DecodeResult(out, text, stats, finish, proposals)

    def draft_fits(self, plan: Plan, context: int, width: int) -> bool:
        """Whether a step of this width fits after `context` tokens (verify writes its draft past them;
        --exact's budget leaves room for its rows already)."""
        return not (plan.verify and not plan.exact) or context + width - 1 <= self.backend.capacity

    def step_end(self, plan: Plan, context: int, width: int) -> int:
        """The end of the slots a step writes when `context` tokens are in: its feed starts at the last of
        them (verify) or ends there (the rest emit what they feed)."""
        return context + (width - 1 if plan.verify else 0)

    def queue_ahead(self, queued: deque, plan: Plan, n_prompt: int, n_out: int, budget: int) -> None:
        """Run the step after the queued one before its result is read, where the loop would run that very
        step whatever the result: a plan of one width, an answer that may go on (each step emits at least
        a token) and room for the widest draft. The result is only known to be at most `most_emitted`
        tokens longer, so attention reads up to that bound (the mask hides the slots not written yet)."""
        width = plan.fixed_width
        if width is None or n_out + len(queued) >= budget:
            return
        context = n_prompt + min(n_out + len(queued) * plan.most_emitted, budget - 1)
        if not self.draft_fits(plan, context, width):
            return
        queued.append((self.run_step(width, plan, self.step_end(plan, context, width)), width - 1))

    def generate(self, prompt_ids: list[int], cfg: DecodeConfig | None = None, *,
                 on_tokens: Callable[[list[int]], None] | None = None) -> DecodeResult:
        return drain(self.stream(prompt_ids, cfg), on_tokens)

    def threshold_of(self, cfg: DecodeConfig) -> float | None:
        """The rule's threshold: given, or (--max-wrong) read from the bundle's held-out calibration; None:
        CLP's argmax (--argmax, verify --adaptive without a threshold, a bundle with no calibration)."""
        if cfg.max_wrong is not None:
            return self.bundle.threshold_for(cfg.max_wrong, cfg.clp_features)
        if cfg.mode == "clp" and cfg.threshold is None and not cfg.argmax:
            return self.bundle.safe_threshold(CLP_DEFAULT_MAX_WRONG, cfg.clp_features)
        return cfg.threshold

    def set_sampling(self, cfg: DecodeConfig) -> None:
        s = self.sampling
        s.temperature.fill_(cfg.temperature or 1.0)
        s.top_k.fill_(cfg.top_k)
        s.top_p.fill_(cfg.top_p)
        s.seed.fill_(cfg.seed if cfg.seed is not None else random.getrandbits(63))

    def attn_len(self, plan: Plan, end: int | None) -> int | None:
        """The attention length the backend reads for a step writing slots before `end` (--exact: every
        slot, so no row's arithmetic depends on the context's length)."""
        return self.backend.attn_len(None if plan.exact else end)

    def warm_up(self, plan: Plan, prompt_ids: list[int], last: int) -> None:
        """Capture, before anything is timed, this prompt's pass and every width this plan uses at every
        attention length that steps writing up to slot len(prompt_ids) + 1..`last` (exclusive ends) read."""
        width = self.backend.prompt_width(len(prompt_ids))
        if (plan, "prompt", width) not in self.warmed:
            self.run_prompt(prompt_ids, plan)
            self.warmed.add((plan, "prompt", width))
        lo, hi = self.attn_len(plan, len(prompt_ids) + 1), self.attn_len(plan, last)
        for attn_len in (n for n in self.backend.attn_lens if lo <= n <= hi):
            for width in plan.widths:
                if (plan, width, attn_len) not in self.warmed:
                    self.run_step(width, plan, attn_len)
                    self.warmed.add((plan, width, attn_len))
        self.pos0.zero_()

    def cut(self, emitted: list[int], out: list[int], budget: int, cfg: DecodeConfig) -> tuple[list[int], str]:
        """A step's tokens up to the first EOS (kept), stop string or the budget, whichever comes first."""
        for i, t in enumerate(emitted):
            n = i + 1
            if t in self.eos:
                return emitted[:n], "eos"
            if cfg.stop and self.tokenizer is not None:
                tail = self.tokenizer.decode((out + emitted[:n])[-64:], skip_special_tokens=True)
                if any(s in tail for s in cfg.stop):
                    return emitted[:n], "stop"
            if len(out) + n >= budget:
                return emitted[:n], "length"
        return emitted, "continue"


def drain(steps: Iterator, each: Callable | None = None):
    """Run a stream to its end, handing each chunk to `each`; returns the stream's return value (the result)."""
    while True:
        try:
            chunk = next(steps)
        except StopIteration as done:
            return done.value
        if each:
            each(chunk)


def account(stats: DecodeStats, res: StepResult, fed: int, plan: Plan) -> None:
    stats.steps += 1
    if plan.verify:
        stats.drafted += fed
        stats.draft_accepted += res.kept
    else:
        stats.head_checked += fed + res.overrides
        stats.head_wrong += res.wrong + res.overrides
        stats.head_accepted += res.n_emitted - 1 + res.overrides


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


def eos_ids(model, tokenizer) -> list[int]:
    """Every id the model or tokenizer treats as end of sequence."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return sorted(ids)
