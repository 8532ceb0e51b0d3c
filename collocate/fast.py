"""The fast engine: static KV cache, one CUDA graph per step width, the whole decision on the GPU.

    dec = FastDecoder(model, tokenizer, bundle)           # CUDA; Llama/Qwen2-style models
    dec.generate(prompt_ids, DecodeConfig(mode="verify"))  # same API and tokens as decode.Decoder
    dec = fast_or_eager(model, tokenizer, bundle)          # FastDecoder on CUDA, Decoder elsewhere

A step replays one graph: the transformer over the fed tokens (written into the cache by position),
the LM head on those rows and on every head in one matmul, the acceptance rule (verify / CLP /
gates), and the next step's input tokens and position, written in place on the device. The host
reads one small tensor per step (the accepted count picks the next graph's width). A rejected draft
costs nothing to roll back: the position does not advance past it and later writes overwrite it.

The forward is ours, and small: pre-norm decoder layers with q/k/v/o projections, rotary
embeddings and a gated MLP, which covers Llama, Qwen2 and Mistral. It reuses the HF modules'
weights and rotary embedding; no modeling file is copied. Prefill runs the same forward eagerly,
so no prompt length ever triggers a recompile.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from .decode import DecodeConfig, DecodeResult, DecodeStats, Decoder, accept, cut_at_stop, pick

SUPPORTED = ("llama", "qwen2", "mistral")


def fast_or_eager(model, tokenizer=None, bundle=None, **kwargs):
    """The fast engine where it can run (CUDA, a supported architecture), else the eager decoder."""
    if model.device.type == "cuda" and model.config.model_type in SUPPORTED:
        return FastDecoder(model, tokenizer, bundle, **kwargs)
    return Decoder(model, tokenizer, bundle)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class StaticLM:
    """A general forward for pre-norm rotary decoders over a preallocated cache indexed by position."""

    def __init__(self, model, max_len: int):
        cfg = model.config
        self.body = model.base_model
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise NotImplementedError("sliding-window attention is not in the fast engine yet")
        w = self.body.embed_tokens.weight
        shape = (len(self.body.layers), 1, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.key_pos = torch.arange(max_len, device=w.device)
        self.max_len = max_len
        # rotary tables for every position, from the model's own rotary module (any rope scaling it
        # applies is in them); a step only gathers rows, so nothing crosses to the host in a graph
        with torch.no_grad():
            cos, sin = self.body.rotary_emb(w[None, :1], self.key_pos[None])
        self.cos, self.sin = cos[0], sin[0]  # (max_len, hd)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos: (m,) -> (m, d) final-norm hidden states; writes K/V at `pos`."""
        m = ids.shape[0]
        x = self.body.embed_tokens(ids)[None]  # (1, m, d)
        cos, sin = self.cos.index_select(0, pos)[None, None], self.sin.index_select(0, pos)[None, None]  # (1,1,m,hd)
        mask = (self.key_pos[None, :] <= pos[:, None]).repeat(self.group, 1)[None, None]  # (1, 1, g*m, max_len)
        for i, layer in enumerate(self.body.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(1, m, self.n_heads, self.head_dim).transpose(1, 2)  # (1, nh, m, hd)
            k = a.k_proj(h).view(1, m, self.n_kv, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(1, m, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            # grouped-query attention at batch 1: the query heads sharing a K/V head become extra query
            # rows, so one plain masked kernel runs with no K/V copies
            qg = q.reshape(1, self.n_kv, self.group * m, self.head_dim)
            o = F.scaled_dot_product_attention(qg, self.k_cache[i], self.v_cache[i], attn_mask=mask,
                                               scale=getattr(a, "scaling", None))
            o = o.reshape(1, self.n_heads, m, self.head_dim)
            x = x + a.o_proj(o.transpose(1, 2).reshape(1, m, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.body.norm(x)[0]


class FastDecoder(Decoder):
    """Same modes, API and tokens as the eager Decoder, on a static cache with CUDA graphs."""

    def __init__(self, model, tokenizer=None, bundle=None, *, eos_token_ids=None, max_len: int = 2048,
                 graphs: bool | None = None):
        super().__init__(model, tokenizer, bundle, eos_token_ids=eos_token_ids)
        if model.config.model_type not in SUPPORTED:
            raise NotImplementedError(f"the fast engine covers {', '.join(SUPPORTED)}; "
                                      f"use collocate.decode.Decoder for {model.config.model_type}")
        self.context = min(self.context, max_len)
        self.lm = StaticLM(model, self.context)
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.width = bundle.k if bundle is not None else 1  # the widest feed: 1 + (k-1) head tokens
        self.feed = torch.zeros(self.width + 1, dtype=torch.long, device=self.device)  # next step's tokens
        self.pos0 = torch.zeros((), dtype=torch.long, device=self.device)  # position of feed[0]
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # -- one step, as pure tensor work on the static buffers (graph-capturable) ---------------------
    def step(self, ids: torch.Tensor, n_tail: int, cfg: DecodeConfig) -> torch.Tensor:
        """Feed ids; the last n_tail of them are unchecked. Returns the step's packed result."""
        m = ids.shape[0]
        pos = self.pos0 + torch.arange(m, device=self.device)
        h = self.lm.forward(ids, pos)[-(n_tail + 1):]  # (n+1, d)
        tail = ids[m - n_tail:]
        if cfg.mode == "verify":
            return self.verify_step(h, tail, m - n_tail, cfg)
        return self.unverified_step(h, tail, m, cfg)

    def heads_states(self, h: torch.Tensor, *, with_first: bool = False) -> torch.Tensor:
        return self.bundle.heads(h, with_first=with_first).to(h.dtype)  # (..., n_heads, d)

    def verify_step(self, h, tail, n_fixed: int, cfg: DecodeConfig) -> torch.Tensor:
        """Keep the drafts the backbone agrees with; draft again from the last kept row."""
        states = torch.cat([h[:, None], self.heads_states(h)], 1)  # (n+1, k, d): each row and its heads
        logits = self.lm_head(states)  # one matmul: backbone and all heads
        tok = pick(logits)  # (n+1, k): [own next token, head proposals] per row
        a = (tok[:-1, 0] == tail).long().cumprod(0).sum().view(1)  # accepted drafts
        row = tok.index_select(0, a)[0]  # (k,): the bonus token and the new drafts (no host sync)
        if cfg.adaptive:
            h_a, logits_a = h.index_select(0, a)[0], logits.index_select(0, a)[0, 1:]
            n_next = self.bundle.clp.accept(h_a, logits_a, threshold=cfg.threshold)
        else:
            n_next = torch.full((), row.shape[0] - 1, device=self.device)
        self.feed[: row.shape[0]].copy_(row)
        self.pos0.add_(n_fixed + a[0])
        return torch.cat([a, n_next.view(1).long(), row])

    def unverified_step(self, h, tail, m: int, cfg: DecodeConfig) -> torch.Tensor:
        """Backbone token, then the policy's count of head tokens; the fed tail is checked for free."""
        k = self.bundle.k if self.bundle is not None else 1
        if cfg.mode == "ar":
            own = pick(self.lm_head(h))
            emitted, n, overrides = own[-1:], torch.zeros((), dtype=torch.long, device=self.device), n_zero(self)
        else:
            with_first = cfg.mode == "compete"
            states = torch.cat([h, self.heads_states(h[-1], with_first=with_first)])
            logits = self.lm_head(states)  # one matmul: the fed rows and every head
            tok = pick(logits)
            own, heads_tok, head_logits = tok[: h.shape[0]], tok[h.shape[0]:], logits[h.shape[0]:]
            emitted, n, overrides = accept(self.bundle, cfg, h[-1], own[-1], heads_tok, head_logits)
        wrong = (own[:-1] != tail).sum()
        self.feed[: emitted.shape[0]].copy_(emitted)
        self.pos0.add_(m)
        pad = torch.zeros(k + 1 - emitted.shape[0], dtype=torch.long, device=self.device)
        return torch.cat([n.view(1).long(), wrong.view(1), overrides.view(1), emitted, pad])

    # -- graphs -----------------------------------------------------------------------------------
    def run_step(self, m: int, n_tail: int, cfg: DecodeConfig) -> torch.Tensor:
        if not self.graphs_on:
            return self.step(self.feed[:m], n_tail, cfg)
        key = (m, n_tail, cfg.mode, cfg.threshold, cfg.adaptive)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.capture(m, n_tail, cfg)
            except RuntimeError as e:  # correctness first: run the same step eagerly
                print(f"collocate: CUDA graph capture failed ({e}); running steps eagerly", file=sys.stderr)
                self.graphs_on = False
                return self.step(self.feed[:m], n_tail, cfg)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def capture(self, m: int, n_tail: int, cfg: DecodeConfig):
        """Record one step of width m; the buffers it touches are restored afterwards."""
        saved = (self.feed.clone(), self.pos0.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, kernel selection)
                self.step(self.feed[:m], n_tail, cfg)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(self.feed[:m], n_tail, cfg)
        self.feed.copy_(saved[0])
        self.pos0.copy_(saved[1])
        return graph, out

    def warm_up(self, cfg: DecodeConfig) -> None:
        """Capture every width this mode can use, before timing."""
        k = self.bundle.k if self.bundle is not None else 1
        if cfg.mode == "verify":
            widths = range(1, k + 1) if cfg.adaptive else [k]
            for m in widths:
                self.run_step(m, m - 1, cfg)
        else:
            for m in range(1, k + 1 if cfg.mode != "ar" else 2):
                self.run_step(m, m - 1, cfg)
        self.pos0.zero_()

    # -- the loop ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids, cfg: DecodeConfig | None = None, *, on_tokens=None, on_step=None) -> DecodeResult:
        cfg = cfg or DecodeConfig()
        prompt_ids = list(prompt_ids)
        self.validate(prompt_ids, cfg)
        if self.graphs_on:
            self.warm_up(cfg)
        budget = min(cfg.max_new_tokens, self.context - len(prompt_ids) - self.width - 1)
        stats, out, proposals = DecodeStats(), [], []
        verify = cfg.mode == "verify"
        finish = "length"
        start = time.perf_counter()
        self.pos0.zero_()
        res = self.step(torch.tensor(prompt_ids, device=self.device), 0, cfg).tolist()  # eager prefill
        drafts: list[int] = []
        fed_tail = 0  # unchecked head tokens in the step just run (unverified modes)
        while True:
            stats.steps += 1
            if verify:
                a, n_next, row = res[0], res[1], res[2:]
                emitted = drafts[:a] + [row[0]]
                stats.drafted, stats.draft_accepted = stats.drafted + len(drafts), stats.draft_accepted + a
                drafts = row[1:1 + n_next]
                proposals.append((len(out) + len(emitted) - 1, drafts))
                m, n_tail = 1 + len(drafts), len(drafts)
            else:
                n, wrong, overrides, row = res[0], res[1], res[2], res[3:]
                emitted = row[: 1 + n]
                stats.head_checked += fed_tail + overrides
                stats.head_wrong += wrong + overrides
                stats.head_accepted += n + overrides
                m, n_tail = 1 + n, n
                fed_tail = n
                proposals.append((len(out), row[1:self.width] if cfg.mode != "ar" else []))
            emitted, finish = self.cut(emitted, out, budget, cfg)
            out += emitted
            if on_tokens and emitted:
                on_tokens(emitted)
            if finish != "continue":
                break
            res = self.run_step(m, n_tail, cfg).tolist()  # the one host sync of a step
        torch.cuda.synchronize() if self.device.type == "cuda" else None
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = len(out)
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer else ""
        return DecodeResult(out, cut_at_stop(text, cfg.stop) if finish == "stop" else text, stats, finish, proposals)


def n_zero(dec) -> torch.Tensor:
    return torch.zeros((), dtype=torch.long, device=dec.device)

