"""The decoding engine: one loop, five modes, batch 1, greedy.

    dec = Decoder(model, tokenizer, bundle)
    result = dec.generate(prompt_ids, DecodeConfig(mode="verify", max_new_tokens=128))
    print(result.text, result.stats.tau)

Every step feeds the tokens of the previous step, reads the backbone's hidden states, and
  1. checks the fed tail against the backbone's own argmax (verify: keeps the agreeing prefix;
     unverified modes: counts wrong head tokens, for free);
  2. takes the backbone's argmax as token t+1 (Backbone-as-Architect) and the heads for t+2..t+k;
  3. asks the mode how many head tokens to take.
Modes: ar (plain greedy), clp, gate, compete (unverified), verify (lossless, drafts checked next pass).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .clp import leading_passes

MODES = ("ar", "clp", "gate", "compete", "verify")
UNVERIFIED = ("clp", "gate", "compete")


class DecodeError(ValueError):
    """Bad input to the decoder: empty or too-long prompt, a mode the bundle cannot run."""


MAX_CANDIDATES = 8  # the fast engine keeps this many spare cache slots for side-by-side candidates


@dataclass
class DecodeConfig:
    mode: str = "ar"
    max_new_tokens: int = 256
    threshold: float | None = None  # CLP tau (threshold rule) or gate threshold; None = argmax / 0.5
    adaptive: bool = False  # verify: CLP picks the draft length instead of always k-1
    candidates: int = 1  # verify: also check the +2 head's next best tokens, side by side (fast engine)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise DecodeError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise DecodeError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.adaptive and self.mode != "verify":
            raise DecodeError("--adaptive applies to mode 'verify' only")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise DecodeError(f"candidates must lie in 1..{MAX_CANDIDATES}, got {self.candidates}")
        if self.candidates > 1 and (self.mode != "verify" or self.adaptive):
            raise DecodeError("--candidates applies to mode 'verify' without --adaptive only")
        self.stop = tuple(self.stop)


@dataclass
class DecodeStats:
    new_tokens: int = 0
    steps: int = 0  # backbone forward passes, prefill included
    seconds: float = 0.0
    head_accepted: int = 0  # unverified modes: head tokens emitted without a check
    head_wrong: int = 0  # ... of which the backbone's own argmax disagreed (read from the next pass)
    head_checked: int = 0
    drafted: int = 0  # verify: draft tokens fed for checking
    draft_accepted: int = 0

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
    proposals: list[tuple[int, list[int]]] = field(default_factory=list)  # (index of t+1, head tokens)


@dataclass
class Proposal:
    emitted: list[int]  # tokens to emit now: t+1, then any accepted head tokens
    unchecked: int  # trailing head tokens of `emitted` the next pass will check
    drafts: list[int]  # every head proposal for t+2..t+k (verify feeds these)
    overrides: int = 0  # compete: +1 head tokens emitted over the backbone's own choice


def accept(bundle, cfg: DecodeConfig, h, own, heads_tok, head_logits):
    """The acceptance rules of the unverified modes, in tensor ops only (the fast engine runs them inside
    a CUDA graph). Returns (tokens: t+1 then the head tokens, how many head tokens to take, overrides)."""
    zero = torch.zeros((), dtype=torch.long, device=own.device)
    if cfg.mode == "clp":  # one span decision
        return torch.cat([own.view(1), heads_tok]), bundle.clp.accept(h, head_logits, threshold=cfg.threshold), zero
    p = bundle.gates(h).float().sigmoid()
    if cfg.mode == "gate":  # one by one until the first gate below the threshold
        return torch.cat([own.view(1), heads_tok]), leading_passes(p[-heads_tok.shape[0]:], cfg.threshold), zero
    # compete: the +1 head replaces the backbone's token when its gate agrees; the rest as gates
    override = (leading_passes(p[:1], cfg.threshold) == 1) & (heads_tok[0] != own)
    first = torch.where(override, heads_tok[0], own)
    return torch.cat([first.view(1), heads_tok[1:]]), leading_passes(p[1:], cfg.threshold), override.long()


def pick(logits: torch.Tensor) -> torch.Tensor:
    """The one token-choice rule of every mode: greedy."""
    return logits.argmax(-1)


def leading_true(mask: torch.Tensor) -> int:
    """Length of the all-true prefix of a 1-D bool tensor."""
    return int(mask.long().cumprod(0).sum())


def check_supported(model) -> None:
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise DecodeError(f"{cfg.model_type} applies {attr} to its logits; collocate decodes through the "
                              "plain LM head and does not support it yet")


class Decoder:
    """Eager reference engine over any HF causal LM (DynamicCache); the fast engine is tested against it."""

    checks_candidates = False  # verify --candidates: the fast engine only (side-by-side cache slots)

    def __init__(self, model, tokenizer=None, bundle=None, *, eos_token_ids: list[int] | None = None):
        check_supported(model)
        self.model, self.tokenizer, self.bundle = model, tokenizer, bundle
        self.body = model.base_model  # the transformer without its LM head: gives hidden states
        self.lm_head = model.get_output_embeddings()
        self.device = self.lm_head.weight.device
        if bundle is not None:
            bundle.to(self.device)
        self.eos = set(eos_token_ids if eos_token_ids is not None else eos_ids(model, tokenizer))
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.cache_kw = cache_keyword(self.body)

    # -- the pieces every mode shares -------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, ids: list[int], cache) -> torch.Tensor:
        """Feed ids after what the cache holds; (m, d) last-layer hidden states."""
        x = torch.tensor([ids], device=self.device)
        return self.body(input_ids=x, use_cache=True, **{self.cache_kw: cache}).last_hidden_state[0]

    def head_tokens(self, h: torch.Tensor, *, with_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Head argmax tokens and logits from one hidden row: offsets 2..k (and +1 if with_first)."""
        states = self.bundle.heads(h, with_first=with_first)
        logits = self.lm_head(states.to(self.lm_head.weight.dtype))  # one matmul for all heads
        return pick(logits), logits

    # -- the acceptance rules ---------------------------------------------------------------------
    def propose(self, h: torch.Tensor, own: int, cfg: DecodeConfig) -> Proposal:
        """What to emit after the newest token, from its hidden row and the backbone's own choice."""
        if cfg.mode == "ar":
            return Proposal([own], 0, [])
        tokens, logits = self.head_tokens(h, with_first=cfg.mode == "compete")
        if cfg.mode == "verify":
            n = int(self.bundle.clp.accept(h, logits, threshold=cfg.threshold)) if cfg.adaptive else len(tokens)
            return Proposal([own], 0, tokens.tolist()[:n])
        emitted, n, overrides = accept(self.bundle, cfg, h, torch.tensor(own, device=self.device), tokens, logits)
        n = int(n)
        drafts = tokens.tolist()[1:] if cfg.mode == "compete" else tokens.tolist()
        return Proposal(emitted.tolist()[: 1 + n], n, drafts, overrides=int(overrides))

    # -- the loop ---------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], cfg: DecodeConfig) -> None:
        if len(prompt_ids) == 0:
            raise DecodeError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.context:
            raise DecodeError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context of "
                              f"{self.context} tokens")
        if cfg.candidates > 1 and not self.checks_candidates:
            raise DecodeError("--candidates needs the fast engine (--engine fast; on a GPU, the default)")
        if cfg.mode != "ar" and self.bundle is None:
            raise DecodeError(f"mode '{cfg.mode}' needs an MTP bundle (--heads DIR)")
        if cfg.mode in ("gate", "compete") and self.bundle.gates is None:
            raise DecodeError(f"mode '{cfg.mode}' needs gates, and this bundle has none (train with --gates)")
        if cfg.mode == "compete" and not self.bundle.heads.compete:
            raise DecodeError("mode 'compete' needs a bundle trained with a +1 head (collocate train --compete)")

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], cfg: DecodeConfig | None = None, *,
                 on_tokens: Callable[[list[int]], None] | None = None,
                 on_step: Callable[[object, list[int]], None] | None = None) -> DecodeResult:
        cfg = cfg or DecodeConfig()
        prompt_ids = list(prompt_ids)
        self.validate(prompt_ids, cfg)
        budget = min(cfg.max_new_tokens, self.context - len(prompt_ids) - (self.bundle.k if self.bundle else 1))
        stats, out, proposals = DecodeStats(), [], []
        cache, feed, n_tail = self.new_cache(), prompt_ids, 0  # n_tail: unchecked tokens at the end of feed
        finish = "length"
        start = time.perf_counter()
        while True:
            h = self.forward(feed, cache)[-(n_tail + 1):]  # (n_tail+1, d): the rows we need
            stats.steps += 1
            own = pick(self.lm_head(h)).tolist()  # own[i]: the backbone's token after tail row i
            agree = torch.tensor(own[:-1]) == torch.tensor(feed[len(feed) - n_tail:], dtype=torch.long)
            if cfg.mode == "verify":
                a = leading_true(agree)
                if n_tail > a:
                    cache.crop(-(n_tail - a))  # drop the rejected drafts: exact rollback
                emitted = feed[len(feed) - n_tail:][:a] + [own[a]]
                stats.drafted, stats.draft_accepted = stats.drafted + n_tail, stats.draft_accepted + a
                drafts = self.propose(h[a], own[a], cfg).drafts
                feed, n_tail, new_head = [own[a]] + drafts, len(drafts), drafts
                base = len(out) + len(emitted) - 1  # index in out of the token the heads continue
            else:
                stats.head_checked += n_tail
                stats.head_wrong += int((~agree).sum())
                prop = self.propose(h[-1], own[-1], cfg)
                feed, emitted, n_tail, new_head = prop.emitted, prop.emitted, prop.unchecked, prop.drafts
                stats.head_accepted += n_tail + prop.overrides
                stats.head_checked += prop.overrides
                stats.head_wrong += prop.overrides
                base = len(out)
            proposals.append((base, new_head))
            emitted, finish = self.cut(emitted, out, budget, cfg)
            out += emitted
            if on_tokens and emitted:
                on_tokens(emitted)
            if on_step:
                on_step(cache, prompt_ids + out)
            if finish != "continue":
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = len(out)
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer else ""
        if finish == "stop":
            text = cut_at_stop(text, cfg.stop)
        return DecodeResult(out, text, stats, finish, proposals)

    def cut(self, emitted: list[int], out: list[int], budget: int, cfg: DecodeConfig) -> tuple[list[int], str]:
        """Honour EOS (kept, then stop), max_new_tokens and stop strings within a multi-token step."""
        for i, t in enumerate(emitted):
            if t in self.eos:
                return emitted[: i + 1][: budget - len(out)], "eos"
        if len(out) + len(emitted) >= budget:
            return emitted[: budget - len(out)], "length"
        if cfg.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode((out + emitted)[-64:], skip_special_tokens=True)
            if any(s in tail for s in cfg.stop):
                return emitted, "stop"
        return emitted, "continue"


def cache_keyword(body) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; speak whichever this one knows."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def load_decoder(model: str, *, heads: str | None = None, need_heads: bool = True, device: str = "auto",
                 dtype: str = "auto", engine: str = "auto"):
    """Backbone + its bundle (checked against each other) + a decoder, from names as the CLI takes them.
    heads=None picks the bundle shipped for the model, if any, when need_heads; device "auto" is the GPU
    where there is one, as in the CLI."""
    from .bundle import MTPBundle, default_bundle_for
    from .zoo import load_backbone

    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    backbone, tokenizer = load_backbone(model, dtype=dtypes[dtype], device=device)
    heads = heads or (default_bundle_for(model) if need_heads else None)
    bundle = MTPBundle.from_pretrained(heads, backbone=backbone, backbone_name=model) if heads else None
    if engine == "eager":
        return Decoder(backbone, tokenizer, bundle)
    from .fast import FastDecoder, fast_or_eager

    if engine == "fast":  # even where it cannot use graphs (a CPU): for tests and comparisons
        return FastDecoder(backbone, tokenizer, bundle)
    if engine != "auto":
        raise ValueError(f"engine must be auto, eager or fast, not {engine!r}")
    return fast_or_eager(backbone, tokenizer, bundle)


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
