"""The fast engine: static KV cache, one CUDA graph per step width, the whole decision on the GPU.

    dec = FastDecoder(model, tokenizer, bundle)           # CUDA; Llama/Qwen2-style models
    dec.generate(prompt_ids, DecodeConfig(mode="verify"))  # same API and tokens as decode.Decoder
    dec = fast_or_eager(model, tokenizer, bundle)          # FastDecoder on CUDA, Decoder elsewhere

A step replays one graph: the transformer over the fed tokens (written into the cache by position),
the LM head on those rows and on every head in one matmul, the acceptance rule (verify / CLP /
gates), and the next step's input tokens and position, written in place on the device. The host
reads one small tensor per step (the accepted count picks the next graph's width). A rejected draft
costs nothing to roll back: the position does not advance past it and later writes overwrite it.

The forward is ours, and small: one function for a pre-norm decoder layer with q/k/v/o projections,
rotary embeddings and a gated SiLU MLP, which covers Llama, Qwen2 and Mistral. It reuses the HF
modules' weights (q/k/v and gate/up rebound as views of one fused matrix each) and rotary embedding;
no modeling file is copied. On CUDA that function is torch.compile'd once per step width (every layer
shares it), which fuses its small ops into a few kernels: a graph replays kernels, so fewer kernels is
what makes a batch-1 step fast. Prefill runs the same function uncompiled, so no prompt length ever
triggers a compile. bench/step_cost.py and bench/profile_step.py measure a step.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .decode import MAX_CANDIDATES, DecodeConfig, DecodeError, DecodeResult, DecodeStats, Decoder, accept, cut_at_stop, pick

SUPPORTED = ("llama", "qwen2", "mistral")
SLOT_MULTIPLE = 64  # cache slots per layer are a multiple of this, so attention's matmuls stay aligned
SPARE_SLOTS = MAX_CANDIDATES - 1  # slots after the positions, for side-by-side candidates


def fast_or_eager(model, tokenizer=None, bundle=None, **kwargs):
    """The fast engine where it can run (CUDA, a supported architecture), else the eager decoder."""
    if model.device.type == "cuda" and model.config.model_type in SUPPORTED:
        return FastDecoder(model, tokenizer, bundle, **kwargs)
    return Decoder(model, tokenizer, bundle)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x, weight, eps: float):
    """HF's RMSNorm for Llama/Qwen2/Mistral: statistics in float32, the scale in the model's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class AttnShape(NamedTuple):
    n_heads: int
    n_kv: int
    head_dim: int
    scale: float


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, q/k/v and gate/up each fused into one matrix (one matmul each)."""
    ln1: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2: torch.Tensor
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    eps: float


def decoder_layer(x, w: LayerWeights, k_cache, v_cache, slots, mask, cos, sin, shape: AttnShape):
    """One pre-norm rotary layer at batch 1: x (1, m, d) -> (1, m, d); writes its K/V at `slots`."""
    m, nh, nkv, hd = x.shape[1], shape.n_heads, shape.n_kv, shape.head_dim
    qkv = F.linear(rms_norm(x, w.ln1, w.eps), w.qkv_w, w.qkv_b)
    q, k, v = qkv.view(1, m, nh + 2 * nkv, hd).transpose(1, 2).split([nh, nkv, nkv], dim=1)  # (1, *, m, hd)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    # grouped-query attention at batch 1: the query heads sharing a K/V head become extra query rows,
    # so two batched matmuls cover it with no K/V copies. Written out rather than SDPA: at a few query
    # rows the fused attention kernels cost ~40 us a layer, these ~10 (the softmax fuses with the mask)
    qg = q.reshape(1, nkv, (nh // nkv) * m, hd)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * shape.scale  # (1, nkv, g*m, max_len)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v_cache.dtype)
    o = torch.matmul(probs, v_cache).reshape(1, nh, m, hd).transpose(1, 2).reshape(1, m, nh * hd)
    x = x + F.linear(o, w.o_w, w.o_b)
    gate, up = F.linear(rms_norm(x, w.ln2, w.eps), w.gate_up_w, w.gate_up_b).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down_w, w.down_b)


def fuse_rows(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack Linear weights (and biases) into one matrix, and rebind each module's weight as a view
    of it: one matmul instead of several, no extra memory, and the HF model computes as before.
    (Shared storage is what save_pretrained refuses: save a model before building an engine on it.)"""
    weight = joined([lin.weight.data for lin in linears])
    biases = [lin.bias.data if lin.bias is not None else None for lin in linears]
    bias = joined(biases) if None not in biases else None
    if weight is not None and (bias is not None or all(b is None for b in biases)):
        return weight, bias  # fused already, by an earlier engine on this model
    weight = torch.cat([lin.weight.data for lin in linears])
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else weight.new_zeros(lin.out_features) for b, lin in zip(biases, linears)])
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row:row + n]
        if lin.bias is not None:
            lin.bias.data = bias[row:row + n]
        row += n
    return weight, bias


def joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor these are consecutive row blocks of, if they are; else None."""
    first, offset = parts[0], parts[0].storage_offset()
    for t in parts:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def layer_weights(layer) -> LayerWeights:
    a, mlp = layer.self_attn, layer.mlp
    qkv_w, qkv_b = fuse_rows([a.q_proj, a.k_proj, a.v_proj])
    gate_up_w, gate_up_b = fuse_rows([mlp.gate_proj, mlp.up_proj])
    norm = layer.input_layernorm
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
    return LayerWeights(norm.weight, qkv_w, qkv_b, a.o_proj.weight, a.o_proj.bias,
                        layer.post_attention_layernorm.weight, gate_up_w, gate_up_b,
                        mlp.down_proj.weight, mlp.down_proj.bias, float(eps))


@functools.cache
def compile_layer():
    """Every layer shares one compiled function, built on first use: weights are arguments, so only
    the step width recompiles."""
    import torch._dynamo

    # widths 1..k, times dtypes and models in one process, stay under dynamo's recompile limit
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(decoder_layer, fullgraph=True, dynamic=False)


class StaticLM:
    """A general forward for pre-norm rotary decoders over a preallocated cache indexed by position."""

    def __init__(self, model, max_len: int, *, spare: int = SPARE_SLOTS, slot_multiple: int = SLOT_MULTIPLE):
        cfg = model.config
        self.body = model.base_model
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise NotImplementedError("sliding-window attention is not in the fast engine yet")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"the fast engine's MLP is SiLU-gated, not {cfg.hidden_act}")
        scale = getattr(self.body.layers[0].self_attn, "scaling", None) or head_dim ** -0.5
        self.shape = AttnShape(n_heads, n_kv, head_dim, float(scale))
        self.group = n_heads // n_kv
        self.layers = [layer_weights(layer) for layer in self.body.layers]
        w = self.body.embed_tokens.weight
        # slots 0..max_len-1 hold positions; the `spare` slots after them hold side-by-side candidates.
        # The slot count is rounded up to a multiple of 64: attention reads every slot, and an odd row
        # length such as 2,055 leaves its matmuls unaligned (docs/engine.md: the H200 slowdown of 2026-11-29)
        n_slots = -(-(max_len + spare) // slot_multiple) * slot_multiple
        shape = (len(self.layers), 1, n_kv, n_slots, head_dim)
        self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.key_pos = torch.arange(n_slots, device=w.device)  # slots past max_len + spare: never seen
        self.spare_slots = self.key_pos[max_len:max_len + spare]
        # rotary tables for every position, from the model's own rotary module (any rope scaling it
        # applies is in them); a step only gathers rows, so nothing crosses to the host in a graph
        with torch.no_grad():
            cos, sin = self.body.rotary_emb(w[None, :1], self.key_pos[None, :max_len])
        self.cos, self.sin = cos[0], sin[0]  # (max_len, hd)
        norm = self.body.norm
        self.final_norm = (norm.weight, float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, *, slots: torch.Tensor | None = None,
                compiled: bool = False) -> torch.Tensor:
        """ids, pos: (m,) -> (m, d) final-norm hidden states; writes K/V at `slots` (default: `pos`).

        A token sees the slots before its position and its own slot: for a chain (slots = pos) that
        is causal attention; a candidate in a spare slot sees the prefix but not its siblings."""
        slots = pos if slots is None else slots
        layer_fn = compile_layer() if compiled else decoder_layer
        x = self.body.embed_tokens(ids)[None]  # (1, m, d)
        cos, sin = self.cos.index_select(0, pos)[None, None], self.sin.index_select(0, pos)[None, None]  # (1,1,m,hd)
        mask = (self.key_pos[None, :] < pos[:, None]) | (self.key_pos[None, :] == slots[:, None])  # (m, slots)
        mask = mask.repeat(self.group, 1)[None, None]  # (1, 1, g*m, slots): query rows per K/V head
        for i, w in enumerate(self.layers):
            x = layer_fn(x, w, self.k_cache[i], self.v_cache[i], slots, mask, cos, sin, self.shape)
        return rms_norm(x, *self.final_norm)[0]


class FastDecoder(Decoder):
    """Same modes, API and tokens as the eager Decoder, on a static cache with CUDA graphs."""

    checks_candidates = True  # verify --candidates needs spare cache slots, which only this engine has

    def __init__(self, model, tokenizer=None, bundle=None, *, eos_token_ids=None, max_len: int = 2048,
                 graphs: bool | None = None, compile: bool | None = None):
        super().__init__(model, tokenizer, bundle, eos_token_ids=eos_token_ids)
        if model.config.model_type not in SUPPORTED:
            raise NotImplementedError(f"the fast engine covers {', '.join(SUPPORTED)}; "
                                      f"use collocate.decode.Decoder for {model.config.model_type}")
        if max_len <= SPARE_SLOTS:
            raise ValueError(f"max_len counts cache slots, {SPARE_SLOTS} of them spare: it must exceed {SPARE_SLOTS}")
        self.model_context = self.context
        # max_len counts cache slots, the spare ones included: 2,048 by default, the row length that
        # attention was measured fast with (2,048 positions + 7 spare = 2,055 ran at half speed, docs/engine.md)
        self.context = min(self.context, max_len - SPARE_SLOTS)
        self.lm = StaticLM(model, self.context)
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        # torch.compile fuses each layer's small ops (norms, rotary, cache writes, SiLU) into a few
        # kernels; a graph replays kernels, so fewer kernels is what makes a step fast
        self.compile_on = self.device.type == "cuda" if compile is None else compile
        self.width = bundle.k if bundle is not None else 1  # the widest feed: 1 + (k-1) head tokens
        self.feed = torch.zeros(self.width + MAX_CANDIDATES, dtype=torch.long, device=self.device)  # next tokens
        self.pos0 = torch.zeros((), dtype=torch.long, device=self.device)  # position of feed[0]
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def validate(self, prompt_ids: list[int], cfg: DecodeConfig) -> None:
        cache_too_small = self.context < self.model_context
        if prompt_ids and len(prompt_ids) >= self.context and cache_too_small:
            raise DecodeError(f"prompt of {len(prompt_ids)} tokens does not fit the fast engine's cache of "
                              f"{self.context} tokens (the model takes {self.model_context}): build "
                              f"FastDecoder(..., max_len=N) with a larger N, or use --engine eager")
        super().validate(prompt_ids, cfg)

    # -- one step, as pure tensor work on the static buffers (graph-capturable) ---------------------
    def step(self, ids: torch.Tensor, n_tail: int, cfg: DecodeConfig, *, compiled: bool = False) -> torch.Tensor:
        """Feed ids; the last n_tail of them are unchecked. Returns the step's packed result."""
        m = ids.shape[0]
        if cfg.candidates > 1 and n_tail:
            return self.candidates_step(ids, cfg, compiled=compiled)
        pos = self.pos0 + torch.arange(m, device=self.device)
        h = self.lm.forward(ids, pos, compiled=compiled)[-(n_tail + 1):]  # (n+1, d)
        tail = ids[m - n_tail:]
        if cfg.mode == "verify":
            return self.verify_step(h, tail, m - n_tail, cfg)
        return self.unverified_step(h, tail, m, cfg)

    def heads_states(self, h: torch.Tensor, *, with_first: bool = False) -> torch.Tensor:
        return self.bundle.heads(h, with_first=with_first).to(h.dtype)  # (..., n_heads, d)

    def own_and_heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (rows, k, V) and tokens (rows, k): [own next token, head proposals] for each row."""
        states = torch.cat([h[:, None], self.heads_states(h)], 1)  # (rows, k, d): each row and its heads
        logits = self.lm_head(states)  # one matmul: backbone and all heads
        return logits, pick(logits)

    def verify_step(self, h, tail, n_fixed: int, cfg: DecodeConfig) -> torch.Tensor:
        """Keep the drafts the backbone agrees with; draft again from the last kept row."""
        logits, tok = self.own_and_heads(h)  # (n+1, k, V), (n+1, k)
        a = (tok[:-1, 0] == tail).long().cumprod(0).sum().view(1)  # accepted drafts
        row = tok.index_select(0, a)[0]  # (k,): the bonus token and the new drafts (no host sync)
        if cfg.adaptive:
            h_a, logits_a = h.index_select(0, a)[0], logits.index_select(0, a)[0, 1:]
            n_next = self.bundle.clp.accept(h_a, logits_a, threshold=cfg.threshold)
        else:
            n_next = torch.full((), row.shape[0] - 1, device=self.device)
        if cfg.candidates > 1:  # after prefill: the +2 head's runners-up go beside its best draft
            row = torch.cat([row, self.runners_up(logits.index_select(0, a)[0, 1], cfg.candidates)])
        # the first draft, copied before the feed (which `tail` views) is overwritten
        first = tail[:1].clone() if tail.shape[0] else torch.zeros(1, dtype=torch.long, device=self.device)
        self.feed[: row.shape[0]].copy_(row)
        self.pos0.add_(n_fixed + a[0])
        return torch.cat([a, n_next.view(1).long(), first, row])

    @staticmethod
    def runners_up(logits_plus2: torch.Tensor, c: int) -> torch.Tensor:
        return logits_plus2.topk(c, dim=-1).indices[1:]  # (c-1,): ranks 2..c of the +2 head

    def candidates_step(self, ids, cfg: DecodeConfig, *, compiled: bool) -> torch.Tensor:
        """verify with side-by-side candidates for the first draft, all checked in the same pass.

        ids = [bonus, c1, d3..dk, c2..cc]: the usual chain at positions p..p+k-1, then the +2 head's
        runners-up, each at position p+1 in a spare cache slot, seeing the prefix but not each other.
        When the chain's first draft fails and a runner-up is the backbone's token, that one is kept:
        its K/V moves to slot p+1 and the next drafts come from its row. Greedy output is unchanged."""
        k = self.bundle.k
        n_side = ids.shape[0] - k  # c-1 runners-up
        chain_pos = self.pos0 + torch.arange(k, device=self.device)
        pos = torch.cat([chain_pos, (self.pos0 + 1).expand(n_side)])
        slots = torch.cat([chain_pos, self.lm.spare_slots[:n_side]])
        h = self.lm.forward(ids, pos, slots=slots, compiled=compiled)  # (k + c-1, d)
        logits, tok = self.own_and_heads(h)
        chain, side = ids[1:k], ids[k:]
        a_chain = (tok[: k - 1, 0] == chain).long().cumprod(0).sum()
        hit = side == tok[0, 0]  # a runner-up that is the backbone's own token after the bonus
        use_side = (a_chain == 0) & hit.any()
        j = hit.long().argmax()
        r = torch.where(use_side, k + j, a_chain).view(1)  # the row whose own token is the new bonus
        a = torch.where(use_side, torch.ones_like(a_chain), a_chain).view(1)
        first = torch.where(use_side, side.index_select(0, j.view(1)), chain[:1])
        src = torch.where(use_side, self.lm.spare_slots.index_select(0, j.view(1))[0], self.pos0 + 1).view(1)
        dst = (self.pos0 + 1).view(1)
        for cache in (self.lm.k_cache, self.lm.v_cache):  # (layers, 1, n_kv, slots, hd); a no-op if unused
            cache.index_copy_(3, dst, cache.index_select(3, src))
        row = tok.index_select(0, r)[0]
        row = torch.cat([row, self.runners_up(logits.index_select(0, r)[0, 1], cfg.candidates)])
        self.feed[: row.shape[0]].copy_(row)
        self.pos0.add_(1 + a[0])
        n_next = torch.full((1,), k - 1, dtype=torch.long, device=self.device)
        return torch.cat([a, n_next, first, row])

    def unverified_step(self, h, tail, m: int, cfg: DecodeConfig) -> torch.Tensor:
        """Backbone token, then the policy's count of head tokens; the fed tail is checked for free."""
        k = self.bundle.k if self.bundle is not None else 1
        if cfg.mode == "ar":
            own = pick(self.lm_head(h))
            zero = torch.zeros((), dtype=torch.long, device=self.device)
            emitted, n, overrides = own[-1:], zero, zero
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
            return self.compiled_step(m, n_tail, cfg)
        key = (m, n_tail, cfg.mode, cfg.threshold, cfg.adaptive, cfg.candidates)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.capture(m, n_tail, cfg)
            except RuntimeError as e:  # correctness first: run the same step without a graph
                print(f"collocate: CUDA graph capture failed ({e}); running steps without graphs", file=sys.stderr)
                self.graphs_on = False
                return self.compiled_step(m, n_tail, cfg)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def compiled_step(self, m: int, n_tail: int, cfg: DecodeConfig) -> torch.Tensor:
        """The step through the compiled layers; where compiling fails, the plain ones (same math)."""
        if self.compile_on:
            try:
                return self.step(self.feed[:m], n_tail, cfg, compiled=True)
            except Exception as e:  # noqa: BLE001  inductor raises many types (no compiler, no triton, ...)
                print(f"collocate: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                      "running uncompiled layers", file=sys.stderr)
                self.compile_on = False
        return self.step(self.feed[:m], n_tail, cfg)

    def capture(self, m: int, n_tail: int, cfg: DecodeConfig):
        """Record one step of width m; the buffers it touches are restored afterwards."""
        saved = (self.feed.clone(), self.pos0.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (compile, allocator, kernel selection)
                self.compiled_step(m, n_tail, cfg)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(self.feed[:m], n_tail, cfg, compiled=self.compile_on)
        self.feed.copy_(saved[0])
        self.pos0.copy_(saved[1])
        return graph, out

    def warm_up(self, cfg: DecodeConfig) -> None:
        """Capture every width this mode can use, before timing."""
        k = self.bundle.k if self.bundle is not None else 1
        if cfg.mode == "verify":
            widths = range(1, k + 1) if cfg.adaptive else [k + cfg.candidates - 1]
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
                a, n_next, first, row = res[0], res[1], res[2], res[3:]
                emitted = ([first] + drafts[1:a] if a else []) + [row[0]]  # first: a runner-up, if kept
                stats.drafted, stats.draft_accepted = stats.drafted + len(drafts), stats.draft_accepted + a
                drafts = row[1:1 + n_next]
                proposals.append((len(out) + len(emitted) - 1, drafts))
                m = 1 + len(drafts) + cfg.candidates - 1
                n_tail = m - 1
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
