"""The step runner: one decode step on the device, and what running it fast needs (graph keys, warm-up,
attention-length buckets, prompt widths), between the host loop (decode.Decoder) and a backend.

    runner = StepRunner(backend, bundle)
    runner.set_request(cfg, threshold)
    out = runner.run_prompt(prompt_ids, rule).read()    # the prompt's pass: a StepResult
    out = runner.run_step(width, rule, end).read()      # a step of this feed width, writing before slot `end`

A step feeds the root (the backbone's newest token) and a draft after it, and then, all on the device:
  1. the backbone's own token after every fed row (and, for independent heads, their logits, in the same
     LM-head matmul);
  2. the rule's `accept`: which fed rows stay (verify: the longest path the backbone agrees with;
     unverified modes keep what they emitted and count the tokens the backbone disagrees with);
  3. the backbone's token after the last kept row is the next root (Backbone-as-Architect), and the rule's
     `next` has the drafter propose the draft after it and says how much of it to feed;
  4. the rule's `emit`: the tokens the step gives the host.
The fast backend captures this whole function once per (rule, width, attention length) and replays it;
the host reads one small StepResult a step.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import torch

from .clp import GATE_THRESHOLD
from .draft import MAX_TREE, BlockDrafter, DraftTree, HeadDrafter, TokenDrafter, TreeTensors
from .modes import EXACT_WIDTHS, MAX_CANDIDATES, At, Kit, Rule
from .rules import Kept, Sampling, filtered_probs, pick, residual_draw, uniforms


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
    """What a step's forward decided (StepRunner.settle), before the step's state is updated."""
    out: StepOut
    kept: Kept  # the fed rows that stay: the backend keeps their K/V
    feed: torch.Tensor  # the next step's feed: its root and draft


class StepResult(NamedTuple):
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


def drafter_for(bundle, model):
    """The drafter a bundle's heads make."""
    if bundle.config.drafter == "block":
        return BlockDrafter(bundle, model.get_output_embeddings(), model.get_input_embeddings())
    if bundle.token_conditioned:
        return TokenDrafter(bundle, model.get_output_embeddings(), model.get_input_embeddings())
    return HeadDrafter(bundle)


class StepRunner:
    """A step over a backend's forward, with the buffers its graphs read and write in place."""

    def __init__(self, backend, bundle=None):
        self.backend, self.bundle = backend, bundle
        model = backend.model
        self.lm_head = model.get_output_embeddings()
        self.device = self.lm_head.weight.device
        if bundle is not None:  # in the backbone's dtype: float32 heads would run as slow float32 GEMVs
            bundle.to(self.device, self.lm_head.weight.dtype)
        self.drafter = drafter_for(bundle, model) if bundle is not None else None
        # backbone layers whose outputs the drafter reads as its context (a block drafter's), kept per position
        self.taps = self.drafter.taps if self.drafter is not None else ()
        width = max(max(EXACT_WIDTHS), 1 + (max(bundle.k - 1 + MAX_CANDIDATES - 1, MAX_TREE) if bundle is not None else 0))
        long = dict(dtype=torch.long, device=self.device)
        self.feed = torch.zeros(width, **long)  # the next step's tokens
        self.pos0 = torch.zeros((), **long)  # position of feed[0]
        self.n_fed = torch.zeros((), **long)  # draft rows of the feed (--exact)
        self.prompt = torch.zeros(backend.slots, **long)  # the prompt (and a last piece's padding past it)
        self.piece = torch.zeros(max(w for _, w in backend.prompt_pieces(backend.capacity)), **long)  # one piece of it
        self.n_prompt = torch.zeros((), **long)
        if self.taps:  # the drafter's context cache: a row per slot the backbone's cache has
            self.drafter.allocate(backend.slots, self.device, self.lm_head.weight.dtype)
        self.threshold = torch.full((), GATE_THRESHOLD, device=self.device)  # per request, read by graphs
        self.sampling = Sampling(torch.ones((), device=self.device), torch.zeros((), **long),
                                 torch.ones((), device=self.device), torch.zeros((), **long), torch.zeros((), **long))
        # what warm_up ran once already: (rule, width, attention length) steps and prompt pieces (prompt_keys)
        self.warmed: set = set()
        # --exact: the one attention length every step of the request reads (exact_bound), so that no row's
        # arithmetic depends on the step's width or the mode
        self.exact_len: int | None = None
        self.settle_step = backend.compiled(self.settle)  # a step's tail: one graph where the backend compiles

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        """What a step updates in place."""
        return self.feed, self.pos0, self.n_fed, self.sampling.counter

    def set_request(self, cfg, threshold: float | None) -> None:
        """The per-request knobs the graphs read: the threshold and the sampling settings."""
        self.threshold.fill_(GATE_THRESHOLD if threshold is None else threshold)
        s = self.sampling
        s.temperature.fill_(cfg.temperature or 1.0)
        s.top_k.fill_(cfg.top_k)
        s.top_p.fill_(cfg.top_p)
        s.seed.fill_(cfg.seed if cfg.seed is not None else random.getrandbits(63))

    def exact_bound(self, end: int) -> None:
        """--exact: every step of this request reads the attention length that covers the slots before
        `end` (the furthest a step of it may write): the same for every mode given the same prompt and
        budget, and no longer than the request needs."""
        self.exact_len = self.backend.attn_len(min(end, self.backend.capacity))

    def reset(self) -> None:
        self.backend.reset()
        self.pos0.zero_()
        self.sampling.counter.zero_()

    # -- the step: tensor work only (the fast backend captures it) ------------------------------------
    def step(self, ids: torch.Tensor, rule: Rule, tree: DraftTree | None, attn_len: int | None = None) -> StepOut:
        """Feed ids = [root, draft nodes of `tree`] (tree None: the prompt's last piece, from slot pos0 to
        n_prompt, maybe then padding); attention reads the first attn_len cache slots (the backend's choice,
        None: all)."""
        out = self.backend.forward(ids, self.pos0, tree, attn_len, taps=self.taps,  # K/V at slots pos0..pos0+m-1
                                   exact=rule.exact and tree is not None)
        h, taps, first = out.last, out.taps, self.pos0  # (m, d), (m, n_taps * d), position of row 0
        prefill = tree is None
        if prefill:  # only the prompt's last row matters, and it keeps all it wrote
            self.remember(taps, self.pos0)
            last = (self.n_prompt - 1 - self.pos0).view(1)
            h, ids, taps, tree = h.index_select(0, last), ids.index_select(0, last), taps.index_select(0, last), DraftTree(())
            first = self.n_prompt - 1
        # a prompt's tail, once per answer, runs plain; a step's runs as one graph where the backend compiles
        settle = self.settle if prefill else self.settle_step
        s = settle(h, taps, ids, first, rule, tree.tensors(self.device), rule.tree.tensors(self.device),
                   attn_len if self.taps else None)  # (a compiled settle specialises on it: only where read)
        if rule.sample:
            self.sampling.counter.add_(1)
        if not prefill:
            self.backend.keep(self.pos0, s.kept, tree)
        self.feed[: s.feed.shape[0]].copy_(s.feed)
        self.n_fed.copy_(s.out.next_width - 1)
        if prefill:
            self.pos0.copy_(self.n_prompt)
        else:
            self.pos0.add_(1 + s.kept.count)
        return s.out

    def settle(self, h: torch.Tensor, taps: torch.Tensor, ids: torch.Tensor, first: torch.Tensor, rule: Rule,
               t: TreeTensors, drafts: TreeTensors, attn_len: int | None = None) -> Settled:
        """What a step's forward output decides, as a pure function of it (h, and the tapped layers' rows
        taps; fed row 0 at position `first`): the backbone's tokens, which fed rows (tree t) stay, the next
        root and draft (tree `drafts`, the rule's), what to emit. A drafter that reads the backbone's states
        as context has the kept rows' written first; attention over them reads attn_len slots."""
        own_logits, heads = self.logits(h, rule)
        own = pick(own_logits)  # (m,) the backbone's token after each fed row
        ids = rule.seen(ids, self.n_fed)
        probs, u = None, None
        if rule.sample:  # the backbone's distribution after every row, and a uniform per node and the root
            probs = filtered_probs(own_logits, self.sampling, use_top_k=rule.top_k, use_top_p=rule.top_p)
            u = uniforms(self.sampling, ids.shape[0])
        kept, wrong = rule.accept(own, ids, t, probs, u)
        row = kept.row.view(1)
        if self.taps:  # the drafter's context: the states of the root and the kept path
            self.remember(taps.index_select(0, torch.cat([row.new_zeros(1), kept.path])), first)
        if heads is not None:  # (n_heads, V) at the new root's row
            heads = heads.index_select(0, row)[0] if rule.any_root else heads[0]
        root = own.index_select(0, row)[0] if probs is None else residual_draw(probs, ids, t, row, u[-1])
        h_root = h.index_select(0, row)[0]
        at = At(h_root, root, heads, drafts, first + 1 + kept.count, attn_len)
        nxt = rule.next(at, Kit(self.drafter, self.bundle, self.threshold))
        feed = torch.cat([nxt.root.view(1), nxt.draft])  # the next step's feed
        emitted, n_emitted = rule.emit(ids, kept, nxt, feed)
        proposal = rule.proposal(nxt, self.bundle.k - 1 if self.bundle is not None else 0)
        return Settled(StepOut(emitted, n_emitted, nxt.n + 1, kept.count, wrong, nxt.overrides, proposal), kept, feed)

    def remember(self, taps: torch.Tensor, first: torch.Tensor) -> None:
        """The tapped states of rows at positions first, first + 1, ... into the drafter's context cache
        (rows past what stays are overwritten before any draft reads them: a draft reads the slots before
        its root)."""
        if self.taps:
            self.drafter.remember(taps, first + torch.arange(taps.shape[0], device=taps.device))

    def logits(self, h: torch.Tensor, rule: Rule) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Own-token logits of every row (m, V) and, for independent heads, the heads' logits
        (r, n_heads, V) of every row that can become the next root, in one LM-head matmul (--exact: two,
        so the own logits' matmul has the same shape in every mode). Token-conditioned heads draft after
        the root is known (TokenDrafter.propose)."""
        if not rule.drafts or not self.drafter.fused:
            return self.lm_head(h), None
        roots = h if rule.any_root else h[-1:]
        states = self.bundle.heads(roots, with_first=rule.plus_one).to(h.dtype)  # (r, n_heads, d)
        if rule.exact:
            return self.lm_head(h), self.lm_head(states)
        logits = self.lm_head(torch.cat([h, states.flatten(0, 1)]))
        return logits[: h.shape[0]], logits[h.shape[0]:].view(*states.shape[:2], -1)

    # -- running it: graphs keyed by (rule, width, attention length) --------------------------------
    def attn_len(self, rule: Rule, end: int | None) -> int | None:
        """The attention length the backend reads for a step writing slots before `end` (--exact: the
        request's one length, or more for a prompt piece padded past it; unbounded: every slot)."""
        if rule.exact:
            return self.backend.attn_len(None) if self.exact_len is None else max(self.exact_len, self.backend.attn_len(end))
        return self.backend.attn_len(end)

    def run_step(self, width: int, rule: Rule, end: int | None = None) -> Packed:
        """A step of this width from the feed buffer, writing no slot at or past `end` (None: anywhere);
        the fast backend replays the graph of its width and attention length."""
        fed = rule.fed(width)
        attn_len = self.attn_len(rule, end)

        def step() -> Packed:
            return Packed.of(self.step(self.feed[: fed.n + 1], rule, fed, attn_len))

        return self.backend.run((rule, fed.n + 1, attn_len), step, state=self.state).to_host()

    def prompt_keys(self, rule: Rule, n: int) -> list[tuple]:
        """The graph key of each piece a prompt of n tokens is fed as: ("piece", width, attention length)
        for those that only write their K/V, (rule, "prompt", width, attention length) for the last."""
        pieces = self.backend.prompt_pieces(n)
        return [(rule, "prompt", w, self.attn_len(rule, s + w)) if i == len(pieces) - 1 else
                ("piece", w, self.attn_len(rule, s + w)) for i, (s, w) in enumerate(pieces)]

    def run_prompt(self, prompt_ids: list[int], rule: Rule) -> Packed:
        """The prompt's pass, piece by piece (the backend's prompt_pieces): each but the last only writes its
        K/V; the last is a step that gives the first token. The fast backend replays a graph per piece width
        and attention length; every piece is read from one buffer, so a graph serves any piece of its shape."""
        n = len(prompt_ids)
        self.prompt[:n].copy_(torch.tensor(prompt_ids))
        self.n_prompt.fill_(n)
        for (start, width), key in zip(self.backend.prompt_pieces(n), self.prompt_keys(rule, n)):
            self.piece[:width].copy_(self.prompt[start:start + width])  # (past the prompt: padding, never read)
            self.pos0.fill_(start)
            attn_len = key[-1]
            if key[0] == "piece":
                self.backend.run(key, lambda: self.fill(width, attn_len), state=self.state)
        return self.backend.run(key, lambda: Packed.of(self.step(self.piece[:width], rule, None, attn_len)),
                                state=self.state).to_host()

    def fill(self, width: int, attn_len: int | None) -> None:
        """A piece of the prompt before its last: its K/V written, nothing read."""
        self.remember(self.backend.forward(self.piece[:width], self.pos0, None, attn_len, taps=self.taps).taps, self.pos0)

    def warm_up(self, rule: Rule, prompt_ids: list[int], last: int) -> None:
        """Capture, before anything is timed, this prompt's pieces and every width this rule uses at every
        attention length that steps writing up to slot len(prompt_ids) + 1..`last` (exclusive ends) read."""
        if not self.backend.captures:
            return
        self.pos0.zero_()
        pieces = set(self.prompt_keys(rule, len(prompt_ids)))
        if not pieces <= self.warmed:
            self.run_prompt(prompt_ids, rule)
            self.warmed |= pieces
        self.pos0.fill_(max(0, min(len(prompt_ids), self.backend.capacity - max(rule.widths))))  # (inside the cache)
        lo, hi = self.attn_len(rule, len(prompt_ids) + 1), self.attn_len(rule, last)
        # near the cache's end a draft may not fit: the step feeds the root alone (Decoder.fits)
        edge = self.attn_len(rule, self.backend.capacity - max(rule.widths) + 2)
        for attn_len in (n for n in self.backend.attn_lens if lo <= n <= hi):
            widths = rule.widths if rule.exact or attn_len < edge else sorted({1, *rule.widths})
            for width in widths:
                if (rule, width, attn_len) not in self.warmed:
                    self.run_step(width, rule, attn_len)
                    self.warmed.add((rule, width, attn_len))
        self.pos0.zero_()

    def capture_all(self, rule: Rule) -> None:
        """Capture every graph this rule can need, at every prompt length and attention length up to the
        cache's end, so that no request captures one (a server does this before it serves)."""
        if not rule.exact:
            return self.capture_upto(rule, self.backend.capacity)
        for self.exact_len in self.backend.attn_lens:  # --exact: a request reads any one of them throughout
            self.capture_upto(rule, min(self.exact_len, self.backend.capacity))
        self.exact_len = None

    def capture_upto(self, rule: Rule, capacity: int) -> None:
        """capture_all's graphs for requests that write no slot at or past `capacity`."""
        lone = {self.backend.prompt_pieces(n)[0][1] for n in range(1, min(capacity, self.piece.shape[0] + 1))}
        for width in sorted(w for w in lone if w < self.backend.capacity):
            self.warm_up(rule, [0] * width, width + 1)  # a lone piece of each width
        self.warm_up(rule, [0], capacity)  # a step at every attention length
        piece = self.piece.shape[0]
        for start in range(piece, capacity - 1, piece):  # a prompt's last piece (and the pieces before) at every
            self.warm_up(rule, [0] * (start + 1), start + 2)  # attention length (warm_up skips those it has)
