"""The decode loop: one host loop over a step runner, for every mode.

    dec = build_decoder(model, tokenizer, bundle)        # collocate.engine: the eager or the fast backend
    result = dec.generate(prompt_ids, DecodeConfig(mode="verify", max_new_tokens=128))
    for tokens in dec.stream(prompt_ids, cfg): ...        # the same loop, a chunk of new tokens per step

The split (docs/engine.md): the options (options.DecodeConfig) pick a mode's rule (modes.py: what a step
keeps, what it feeds next, its widths); a drafter (draft.py) proposes drafts; the step runner (step.py)
runs one step on the device, with its graphs, warm-up and buckets; a backend (backend.py, fast.py) runs
the forward and keeps or drops what it wrote. This loop reads one small StepResult a step (ar and plain
verify: while the next step runs, `overlap`) and keeps the books: budget, EOS, stop strings, stats,
streaming.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from .errors import DecodeError
from .modes import CLP_DEFAULT_MAX_WRONG, EXACT_WIDTH, MODES, Rule  # noqa: F401  (the public names)
from .options import DecodeConfig
from .step import StepRunner


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


class Decoder:
    """The host loop over a step runner (the HF model with its cache, or the static cache with graphs)."""

    def __init__(self, backend, tokenizer=None, bundle=None, *, eos_token_ids: list[int] | None = None,
                 overlap: bool | None = None):
        """overlap: a rule of one step width queues each step before the host reads the one before it, so the
        device never waits for the host's bookkeeping (None: on CUDA; a finished answer wastes one step)."""
        self.backend, self.tokenizer, self.bundle = backend, tokenizer, bundle
        self.model = backend.model
        self.runner = StepRunner(backend, bundle)
        self.lm_head, self.device, self.drafter = self.runner.lm_head, self.runner.device, self.runner.drafter
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self.eos = set(eos_token_ids if eos_token_ids is not None else eos_ids(self.model, tokenizer))

    def threshold_of(self, cfg: DecodeConfig) -> float | None:
        """The rule's threshold: given, or read from the bundle's calibration (None: CLP's argmax)."""
        return cfg.rule.threshold(cfg, self.bundle)

    def rule_for(self, cfg: DecodeConfig) -> Rule:
        return cfg.rule.build(cfg, self.drafter, self.threshold_of(cfg))

    def validate(self, prompt_ids: list[int], cfg: DecodeConfig) -> None:
        if len(prompt_ids) == 0:
            raise DecodeError("empty prompt: give at least one token")
        self.backend.check_fits(len(prompt_ids))
        cfg.rule.check_bundle(cfg, self.bundle)
        if cfg.exact and not self.backend.fixed_rows:
            raise DecodeError("--exact needs the fast engine's static cache (--engine fast): the eager one's "
                              "attention length changes with every step")

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], cfg: DecodeConfig | None = None) -> Iterator[list[int]]:
        """Yield each step's new tokens; the generator's return value is the DecodeResult."""
        cfg, prompt_ids, run = cfg or DecodeConfig(), list(prompt_ids), self.runner
        self.validate(prompt_ids, cfg)
        rule = self.rule_for(cfg)
        run.set_request(cfg, self.threshold_of(cfg))
        n_prompt = len(prompt_ids)
        # the answer may fill the context, no more (--exact: less the padding rows every step writes)
        budget = min(cfg.max_new_tokens, self.backend.capacity - n_prompt - max(rule.exact - 1, 0))
        if budget < 1:
            raise DecodeError(f"prompt of {n_prompt} tokens leaves no room for --exact's {rule.exact}-row steps "
                              f"in a context of {self.backend.capacity}")
        if rule.exact:
            run.exact_bound(n_prompt + budget + rule.exact)
        run.warm_up(rule, prompt_ids, n_prompt + budget + max(rule.widths))
        stats, out, proposals = DecodeStats(), [], []
        start = time.perf_counter()
        run.reset()
        res = run.run_prompt(prompt_ids, rule).read()
        stats.prefill_seconds = time.perf_counter() - start
        fed = 0  # draft tokens fed in the step just read
        queued: deque = deque()  # steps run or running, not read yet, with their draft rows
        while True:
            rule.account(stats, res, fed)
            emitted = res.emitted[: res.n_emitted]
            if (proposal := rule.record(len(out), emitted, res)) is not None:
                proposals.append(proposal)
            emitted, finish = self.cut(emitted, out, budget, cfg)
            out += emitted
            if emitted:
                yield emitted
            if finish != "continue":
                break  # (a step queued ahead has run for nothing)
            if not queued:  # (near the end of the context there is no room for a draft: the root alone)
                context = n_prompt + len(out)
                self.queue(queued, rule, context, res.next_width if self.fits(rule, context, res.next_width) else 1)
            if self.overlap and len(queued) == 1:
                self.queue_ahead(queued, rule, n_prompt, len(out), budget)
            packed, fed = queued.popleft()
            res = packed.read()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.seconds, stats.new_tokens = time.perf_counter() - start, len(out)
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer else ""
        return DecodeResult(out, cut_at_stop(text, cfg.stop) if finish == "stop" else text, stats, finish, proposals)

    def queue(self, queued: deque, rule: Rule, context: int, width: int) -> None:
        """Run a step of this width after `context` tokens; queued with its draft rows, not read yet."""
        queued.append((self.runner.run_step(width, rule, context + rule.ahead(width)), width - 1))

    def fits(self, rule: Rule, context: int, width: int) -> bool:
        """Whether a step of this width fits after `context` tokens (--exact's budget leaves room already)."""
        return rule.exact or context + rule.ahead(width) <= self.backend.capacity

    def queue_ahead(self, queued: deque, rule: Rule, n_prompt: int, n_out: int, budget: int) -> None:
        """Run the step after the queued one before its result is read, where the loop would run that very
        step whatever the result: a rule of one width, an answer that may go on (each step emits at least
        a token) and room for the widest draft. The result is only known to be at most `most_emitted`
        tokens longer, so attention reads up to that bound (the mask hides the slots not written yet)."""
        width = rule.fixed_width
        if width is None or n_out + len(queued) >= budget:
            return
        context = n_prompt + min(n_out + len(queued) * rule.most_emitted, budget - 1)
        if self.fits(rule, context, width):
            self.queue(queued, rule, context, width)

    def prepare(self, cfg: DecodeConfig) -> None:
        """Capture every graph this config's mode can need, at every prompt and context length the cache
        holds, so that no request of it captures one (a server does this before it serves)."""
        self.runner.capture_all(self.rule_for(cfg))

    def generate(self, prompt_ids: list[int], cfg: DecodeConfig | None = None, *,
                 on_tokens: Callable[[list[int]], None] | None = None) -> DecodeResult:
        return drain(self.stream(prompt_ids, cfg), on_tokens)

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
