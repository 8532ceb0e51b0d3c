"""The fast backend: a static KV cache indexed by position, compiled layers, a CUDA graph per step.

    dec = build_decoder(model, tokenizer, bundle, engine="fast")   # collocate.engine; Llama/Qwen2-style
    backend = StaticBackend(model, max_len=32768)                  # what that builds under the Decoder

The decode loop's whole step (decode.Decoder.step: forward, LM head, rule, drafter, next feed) is
captured once per plan, feed width and attention length and replayed; the host reads one small result
per step. Draft rows are written to the slots after the root, at positions by depth, under a tree mask;
the kept path's K/V is then moved into place (nothing moves for a chain). A rejected draft costs nothing
to roll back: the position does not advance past it and later writes overwrite it.

The forward is ours, and small: one function for a pre-norm decoder layer with q/k/v/o projections,
rotary embeddings and a gated SiLU MLP, which covers Llama, Qwen2 and Mistral. It reuses the HF
modules' weights (q/k/v and gate/up rebound as views of one fused matrix each) and rotary embedding;
no modeling file is copied. On CUDA that function is torch.compile'd once per step width and attention
length (every layer shares it), which fuses its small ops into a few kernels: a graph replays kernels, so
fewer kernels is what makes a batch-1 step fast. Attention reads the first slots of the cache, as many as
the step needs rounded up to one of a few lengths (attn_lens), so its cost follows the context. A prompt
is fed in pieces of at most PROMPT_PIECE rows; with graphs a lone piece is padded to one of a few widths
(prompt_widths) and every later piece is whole, so a prompt's pass is a few graphs and compiles once per
width and attention length; without graphs it runs the plain layers, so no prompt length compiles anything.
bench/step_cost.py and bench/profile_step.py measure a step.
"""
from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backend import Hidden, check_supported, joined_taps, model_context
from .draft import DraftTree
from .errors import DecodeError
from .rules import Kept

SUPPORTED = ("llama", "qwen2", "mistral")
SLOT_MULTIPLE = 64  # cache slots per layer are a multiple of this, so attention's matmuls stay aligned
MIN_ATTN_LEN = 256  # the shortest attention length a step reads (attn_lens gives the longer ones)
MIN_PROMPT_WIDTH = 64  # the fewest rows a prompt's pass feeds (prompt_widths gives the wider ones)
# a prompt is fed in pieces of at most this many rows: a piece's attention scores are (rows x heads) x
# attention length floats (512 rows of Qwen2.5-1.5B over 32K slots: 0.8 GB), so a long prompt's pass
# stays within memory, and its shapes are few (a piece width times an attention length)
PROMPT_PIECE = 512
# the cache's default size: the model's own window, at most this many tokens (and, on CUDA, at most a
# quarter of the free memory): graphs and compiled shapes grow with the number of attention lengths
MAX_DEFAULT_LEN = 32768


def lengths(first: int, last: int) -> tuple[int, ...]:
    """first, then each at most 1.5x the one before (256, 384, 512, 768, 1024, 1536, ...), below `last`,
    and `last` itself: a few sizes, each within half again of any size it covers."""
    out, n = [], first
    while n < last:
        out.append(n)
        n = n * 3 // 2 if (n & (n - 1)) == 0 else n * 4 // 3  # 256 -> 384 -> 512 -> 768 -> 1024 ...
    return (*out, last)


def attn_lens(n_slots: int) -> tuple[int, ...]:
    """The attention lengths a step may read: 256, 384, 512, ... and the whole cache last. One compile and
    one graph per length and width; reading at most half again the slots in use keeps attention's cost
    close to the context's."""
    return lengths(MIN_ATTN_LEN, n_slots)


def default_max_len(model) -> int:
    """The model's own window, at most MAX_DEFAULT_LEN tokens and, on CUDA, as many as a quarter of the
    free memory holds as K/V (Qwen2.5-1.5B: 28 KB a token in bf16, so 32K is under 1 GB)."""
    cfg, w = model.config, model.get_input_embeddings().weight
    n = min(model_context(model), MAX_DEFAULT_LEN)
    if w.device.type == "cuda":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * w.element_size()
        free, _ = torch.cuda.mem_get_info(w.device)
        n = min(n, max(2048, free // 4 // per_token))
    return n


def shortest_covering(lens: tuple[int, ...], end: int | None) -> int:
    """The shortest of `lens` that covers the slots before `end`; None (or past them all): the last."""
    return next((n for n in lens if end is not None and n >= end), lens[-1])


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


class LayerInputs(NamedTuple):
    x: torch.Tensor  # (1, m, d) the fed tokens' embeddings
    slots: torch.Tensor  # (m,) cache slots the rows write
    mask: torch.Tensor  # (1, 1, g*m, attn_len) bool: which slots each query row (per K/V head) sees
    cos: torch.Tensor  # (1, 1, m, hd) rotary tables at each row's position
    sin: torch.Tensor
    cols: torch.Tensor | None = None  # (m, attn_len) --exact: the slot each row's key column c reads (`exact_attention`)
    window: torch.Tensor | None = None  # (m, w) --exact: the columns each row reads in its own order (`exact_attention`)


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


def decoder_layer(x, w: LayerWeights, k_cache, v_cache, slots, mask, cos, sin, shape: AttnShape, cols=None,
                  window=None):
    """One pre-norm rotary layer at batch 1: x (1, m, d) -> (1, m, d); writes its K/V at `slots`. With
    `cols` and `window` (--exact) row r's key column c reads slot cols[r, c] (`exact_attention`)."""
    m, nh, nkv, hd = x.shape[1], shape.n_heads, shape.n_kv, shape.head_dim
    qkv = F.linear(rms_norm(x, w.ln1, w.eps), w.qkv_w, w.qkv_b)
    q, k, v = qkv.view(1, m, nh + 2 * nkv, hd).transpose(1, 2).split([nh, nkv, nkv], dim=1)  # (1, *, m, hd)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    n = mask.shape[-1]  # attention reads the first n slots (StaticBackend.attn_len), all written before
    k_cache, v_cache = k_cache[:, :, :n], v_cache[:, :, :n]
    # grouped-query attention at batch 1: the query heads sharing a K/V head become extra query rows,
    # so two batched matmuls cover it with no K/V copies. Written out rather than SDPA: at a few query
    # rows the fused attention kernels cost ~40 us a layer, these ~10 (the softmax fuses with the mask)
    qg = q.reshape(1, nkv, (nh // nkv) * m, hd)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * shape.scale  # (1, nkv, g*m, n)
    if cols is None:
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v_cache.dtype)
        o = torch.matmul(probs, v_cache).reshape(1, nh, m, hd)
    else:
        o = exact_attention(scores, mask, v_cache, cols, window, nh // nkv)
    o = o.transpose(1, 2).reshape(1, m, nh * hd)
    x = x + F.linear(o, w.o_w, w.o_b)
    gate, up = F.linear(rms_norm(x, w.ln2, w.eps), w.gate_up_w, w.gate_up_b).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down_w, w.down_b)


def exact_attention(scores, mask, v_cache, cols, window, g: int) -> torch.Tensor:
    """--exact attention: every row reads its keys and values laid out as `ar` would have them, the
    context's slots then its own path from the root in depth order (cols), so that a tree node's
    arithmetic is ar's for the same token at the same position, bit for bit, whatever row of the feed
    it sits in. scores (1, nkv, g*m, n) over the slots as they are -> (1, nh, m, hd).

    The scores are gathered (each is one dot product, the same in any column). The weighted sum of the
    values splits where the row's window starts (`window`, columns s..s+w-1 with s a function of the
    row's position alone, at or before the step's first slot): the columns before s are slots in ar's
    order for every row, so one matmul over the values as they lie covers them, with each row's weights
    from s on zeroed (adding a zero leaves a sum's bits alone); the window's values are copied per row,
    (nkv, m, w, hd), since a product's place in the reduction may change its rounding. So the copy is
    the window's, whatever the context's length, and ar's row at that position splits the same way
    (its step has the same width and attention length: `StepRunner.exact_bound`)."""
    _, nkv, gm, n = scores.shape
    m, w = window.shape
    scores = scores.gather(-1, cols.repeat(g, 1).expand(1, nkv, gm, n))
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v_cache.dtype)  # each row in its own order
    before = (torch.arange(n, device=scores.device)[None, :] < window[:, :1]).repeat(g, 1)  # (g*m, n)
    shared = torch.matmul(probs * before, v_cache).view(nkv, g, m, -1)
    own = probs.gather(-1, window.repeat(g, 1).expand(1, nkv, gm, w)).view(nkv, g, m, w).transpose(1, 2)
    values = v_cache[0][:, cols.gather(1, window)]  # (nkv, m, w, hd): row r's window in its own order
    o = torch.matmul(own, values).transpose(1, 2)  # (nkv, g, m, hd): one batch per row
    return (shared + o).reshape(1, nkv * g, m, -1)


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
    the step width and the attention length recompile."""
    import torch._dynamo

    # widths 1..k times attention lengths, times dtypes and models in one process, stay under dynamo's limits
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
    return torch.compile(decoder_layer, fullgraph=True, dynamic=False)


@functools.cache
def compile_norm():
    return torch.compile(rms_norm, fullgraph=True, dynamic=False)


class StaticLM:
    """A general forward for pre-norm rotary decoders over a preallocated cache indexed by position."""

    def __init__(self, model, max_len: int, *, slot_multiple: int = SLOT_MULTIPLE):
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
        # attention may read every slot (the last of attn_lens), so the slot count is rounded up to a multiple
        # of 64: an odd row length leaves its matmuls unaligned (2,055 slots ran at half the speed of 2,048)
        n_slots = -(-max_len // slot_multiple) * slot_multiple
        shape = (len(self.layers), 1, n_kv, n_slots, head_dim)
        self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.key_pos = torch.arange(n_slots, device=w.device)  # slots past max_len: only a prompt's padding
        # rotary tables for every slot, from the model's own rotary module (any rope scaling it applies is in
        # them); a step only gathers rows, so nothing crosses to the host in a graph. Rows past max_len are
        # a padded prompt's, whose results nothing reads
        with torch.no_grad():
            cos, sin = self.body.rotary_emb(w[None, :1], self.key_pos[None])
        self.cos, self.sin = cos[0], sin[0]  # (n_slots, hd)
        norm = self.body.norm
        self.final_norm = (norm.weight, float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")))
        # a step's inputs in a few fused kernels, not a dozen (compiled on first use, per width and length)
        self.inputs_compiled = torch.compile(self.inputs, fullgraph=True, dynamic=False)

    def forward(self, ids: torch.Tensor, pos0: torch.Tensor, **kw) -> torch.Tensor:
        """ids (m,) written to slots pos0..pos0+m-1 -> (m, d) final-norm hidden states (hidden's arguments)."""
        return self.hidden(ids, pos0, **kw).last

    def hidden(self, ids: torch.Tensor, pos0: torch.Tensor, *, depths: torch.Tensor | None = None,
               visible: torch.Tensor | None = None, paths: torch.Tensor | None = None, attn_len: int | None = None,
               compiled: bool = False, taps: tuple[int, ...] = ()) -> Hidden:
        """ids (m,) written to slots pos0..pos0+m-1 -> their final-norm hidden states and the outputs of
        the layers `taps`.

        Row r sits at position pos0 + depths[r] (default r) and sees the slots before pos0 and, among the
        fed rows, those that `visible[r]` marks (default: the rows up to itself, a causal chain). paths
        (--exact, DraftTree.paths, with depths): row r reads those rows as if they stood at the slots
        after pos0 in that order, as `ar` has them (`exact_attention`).
        Attention reads the first `attn_len` slots (default: all), which must cover pos0 + m.
        compiled: the layers, and what comes before and after them, each through torch.compile."""
        layer_fn = compile_layer() if compiled else decoder_layer
        inputs, norm = (self.inputs_compiled, compile_norm()) if compiled else (self.inputs, rms_norm)
        x, slots, mask, cos, sin, cols, window = inputs(ids, pos0, depths, visible, paths, attn_len)
        tapped = []
        for i, w in enumerate(self.layers):
            x = layer_fn(x, w, self.k_cache[i], self.v_cache[i], slots, mask, cos, sin, self.shape, cols, window)
            if i in taps:
                tapped.append(x[0])
        h = norm(x, *self.final_norm)[0]
        return Hidden(h, joined_taps(tapped, h))

    def inputs(self, ids, pos0, depths, visible, paths, attn_len) -> "LayerInputs":
        """What every layer of a step reads, from the fed ids (arguments as forward's)."""
        m = ids.shape[0]
        key_pos = self.key_pos[:attn_len]
        rows = torch.arange(m, device=ids.device)
        slots = pos0 + rows
        pos = slots if depths is None else pos0 + depths
        x = self.body.embed_tokens(ids)[None]  # (1, m, d)
        cos, sin = self.cos.index_select(0, pos)[None, None], self.sin.index_select(0, pos)[None, None]  # (1,1,m,hd)
        cols = window = None
        if paths is not None:  # --exact: a row's path from the root at the slots after pos0, in depth order
            rel = key_pos - pos0
            on_path = (rel >= 0)[None, :] & (rel[None, :] <= depths[:, None])
            cols = torch.where(on_path, pos0 + paths[:, rel.clamp(0, paths.shape[1] - 1)], key_pos[None, :])
            mask = key_pos[None, :] <= pos[:, None]  # (m, attn_len): by position, as ar's
            # the window each row reads in its own order: the m columns up to the row's position (so from at or
            # before pos0, whatever the row's depth); by position, width and attention length alone, as ar's
            # row there has it
            n, w = key_pos.shape[0], min(m, key_pos.shape[0])
            start = (pos - (m - 1)).clamp(min=0).clamp(max=n - w)
            window = start[:, None] + torch.arange(w, device=ids.device)
        elif visible is None:
            mask = key_pos[None, :] <= slots[:, None]  # (m, attn_len)
        else:  # the prefix, and the fed rows this row's tree path goes through
            rel = key_pos - pos0  # (attn_len,) row index of each slot in this feed
            in_feed = (rel >= 0) & (rel < m)
            mask = (rel < 0)[None, :] | (visible[:, rel.clamp(0, m - 1)] & in_feed[None, :])
        mask = mask.repeat(self.group, 1)[None, None]  # (1, 1, g*m, attn_len): query rows per K/V head
        return LayerInputs(x, slots, mask, cos, sin, cols, window)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of slots `src` to slots `dst`, in every layer."""
        for cache in (self.k_cache, self.v_cache):  # (layers, 1, n_kv, slots, hd)
            cache.index_copy_(3, dst, cache.index_select(3, src))


class StaticBackend:
    """The static cache with compiled layers and CUDA graphs, for Llama, Qwen2 and Mistral."""

    fixed_rows = True  # every step of a request may read one attention length: a row's arithmetic has one shape (--exact)

    def __init__(self, model, *, max_len: int | None = None, graphs: bool | None = None, compile: bool | None = None,
                 piece: int = PROMPT_PIECE):
        check_supported(model)
        if model.config.model_type not in SUPPORTED:
            raise NotImplementedError(f"the fast engine covers {', '.join(SUPPORTED)}; "
                                      f"use the eager engine for {model.config.model_type}")
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len counts cache slots and must be at least 2, got {max_len}")
        self.model = model
        self.model_context = model_context(model)
        self.capacity = min(self.model_context, max_len or default_max_len(model))
        # a prompt longer than a piece is fed piece by piece, each padded to the piece's width: the slots
        # are then a multiple of it, so the last piece's padding stays inside the cache
        self.piece = piece if self.capacity > piece else self.capacity
        self.lm = StaticLM(model, self.capacity, slot_multiple=piece if self.capacity > piece else SLOT_MULTIPLE)
        self.slots = self.lm.k_cache.shape[3]
        self.attn_lens = attn_lens(self.slots)
        self.prompt_widths = lengths(MIN_PROMPT_WIDTH, self.piece)
        device = self.lm.k_cache.device
        self.graphs_on = device.type == "cuda" if graphs is None else graphs
        # with graphs a prompt is padded to one of a few widths, each a graph: its pass launched op by op
        # (hundreds of small kernels) costs more than its arithmetic. Rows past the prompt write slots that
        # the next steps overwrite before anything reads them, and no row before them sees them.
        self.pad_prompts = self.graphs_on
        # torch.compile fuses each layer's small ops (norms, rotary, cache writes, SiLU) into a few
        # kernels; a graph replays kernels, so fewer kernels is what makes a step fast
        self.compile_on = device.type == "cuda" if compile is None else compile
        self.graphs: dict = {}
        # every graph draws its temporaries from one pool: they run one at a time, so a long prompt's
        # pieces need the memory of one piece, not of each (their outputs stay alive, so none is reused)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs_on else None

    @property
    def captures(self) -> bool:
        return self.graphs_on

    def compiled(self, fn):
        """fn through torch.compile (compiled on first use, per input shapes) while the layers compile;
        the plain fn once compiling has failed (see call)."""
        fast = torch.compile(fn, fullgraph=True, dynamic=False)
        return lambda *args: (fast if self.compile_on else fn)(*args)

    def describe(self) -> str:
        """What actually runs: graphs or compiling can be lost at run time (with a message)."""
        return "fast (" + ("compiled" if self.compile_on else "plain") + " layers, " + \
            ("CUDA graphs)" if self.graphs_on else "no graphs)")

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt < self.capacity:
            return
        if self.capacity < self.model_context:
            raise DecodeError(f"prompt of {n_prompt} tokens does not fit the fast engine's cache of "
                              f"{self.capacity} tokens (the model takes {self.model_context}): give a larger "
                              f"--max-len (max_len=N in Python), or use --engine eager")
        raise DecodeError(f"prompt of {n_prompt} tokens does not fit the model's context of {self.capacity} tokens")

    def reset(self) -> None:
        pass  # the position restarts at 0; later writes overwrite the old slots

    def prompt_pieces(self, n_prompt: int) -> list[tuple[int, int]]:
        """(first row, width) of each piece a prompt of n_prompt tokens is fed as: pieces of `piece` rows;
        with graphs a lone piece is padded to one of prompt_widths, and the last of several to a whole
        piece, so that every piece after the first has one width."""
        starts = range(0, n_prompt, self.piece)
        if not self.pad_prompts:
            return [(s, min(self.piece, n_prompt - s)) for s in starts]
        if n_prompt <= self.piece:
            return [(0, shortest_covering(self.prompt_widths, n_prompt))]
        return [(s, self.piece) for s in starts]

    def attn_len(self, end: int | None) -> int:
        """How many slots a step's attention reads when it writes slots up to `end` (exclusive): the
        shortest of attn_lens that covers them; None: every slot."""
        return shortest_covering(self.attn_lens, end)

    def forward(self, ids: torch.Tensor, pos0: torch.Tensor, tree: DraftTree | None,
                attn_len: int | None = None, *, taps: tuple[int, ...] = (), exact: bool = False) -> Hidden:
        """A step's feed (tree given) or a padded prompt (tree None) through the layers compiled for its
        width and attention length; a prompt fed as it is, through the plain ones, so that no prompt length
        compiles anything. exact: a step's rows, chain or tree, read their keys in ar's order (`paths`)."""
        compiled = self.compile_on and (tree is not None or self.pad_prompts)
        if exact and tree is not None:
            t = tree.tensors(ids.device)
            return self.lm.hidden(ids, pos0, depths=t.depths, paths=t.paths, attn_len=attn_len, compiled=compiled,
                                  taps=taps)
        if tree is None or tree.is_chain:
            return self.lm.hidden(ids, pos0, attn_len=attn_len, compiled=compiled, taps=taps)
        t = tree.tensors(ids.device)
        return self.lm.hidden(ids, pos0, depths=t.depths, visible=t.visible, attn_len=attn_len, compiled=compiled,
                              taps=taps)

    def keep(self, pos0: torch.Tensor, kept: Kept, tree: DraftTree) -> None:
        """Move the kept path's K/V to the slots after the root (a chain's path is in place already)."""
        if not tree.is_chain:
            depth = torch.arange(1, kept.path.shape[0] + 1, device=pos0.device)
            self.lm.move(pos0 + kept.path, pos0 + depth)

    # -- graphs -----------------------------------------------------------------------------------
    def run(self, key, step, *, state):
        """Replay the graph captured for `key` (capturing it on first use); `state` is what the step
        updates in place (restored after the capture's warm-up runs)."""
        if not self.graphs_on:
            return self.call(step)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.capture(step, state)
            except RuntimeError as e:  # correctness first: run the same step without a graph
                print(f"collocate: CUDA graph capture failed ({e}); running steps without graphs", file=sys.stderr)
                self.graphs_on = False
                return self.call(step)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def call(self, step):
        """The step through the compiled layers; where compiling fails, the plain ones (same math)."""
        if self.compile_on:
            try:
                return step()
            except Exception as e:  # noqa: BLE001  inductor raises many types (no compiler, no triton, ...)
                print(f"collocate: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                      "running uncompiled layers", file=sys.stderr)
                self.compile_on = False
        return step()

    def capture(self, step, state):
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (compile, allocator, kernel selection), each from
                for t, s in zip(state, saved):  # the state the step was asked to start from
                    t.copy_(s)
                self.call(step)
            for t, s in zip(state, saved):
                t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        for t, s in zip(state, saved):
            t.copy_(s)
        return graph, out
