"""The block drafter: a few transformer layers that draft a whole block of tokens in one pass, reading
several of the backbone's layers (DFlash's design, arXiv 2602.06036; our own code, read from its
description and public configurations).

    block = BlockModel(BlockConfig.for_backbone(model))           # 2 layers, block 16, 5 feature layers
    feats = backbone_features(model, ids, block.c.taps)           # (T, n_taps * d) from the taps
    loss, hits = block.loss(embed, lm_head, tokens, feats, anchors)  # training: many blocks of a sequence at once
    cache = block.allocate(slots, device, dtype)                  # decoding: a context cache by position,
    block.extend(cache, feats[:n], torch.arange(n))               # the context's K/V written into it
    logits = block.draft(cache, embed, lm_head, root, pos)        # (block - 1, V): tokens at pos+1 .. pos+block-1

A block starts at the anchor, the token the backbone itself chose (Backbone-as-Architect): slot 0 is that
token and slots 1..B-1 a mask token, all embedded with the backbone's table; slot k predicts the token k
places after the anchor. Every layer's queries come from the block alone; its keys and values are the
block's and the context's: the backbone's hidden states at `taps` (layers spread over its depth) of every
position before the anchor, joined, projected to the hidden size by `fc` and normalised, then passed
through that layer's own k/v projections, k-norm and rotary embedding. Inside the block attention goes
both ways. Embedding and LM head are the backbone's, frozen; only the layers, `fc` and the norms train.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import TokenBlock

# a drafter's layers unless asked otherwise: with one, every mask slot's query is the mask token's (rotated
# by position only), so what a slot reads from the context cannot depend on what it says (bench/README.md,
# cpu-block-layers)
LAYERS = 2
DECAY = 7.0  # slot j of a block weighs exp(-(j-1) / DECAY) in the training loss (DFlash's)


@dataclass
class BlockConfig:
    hidden_size: int
    intermediate_size: int
    taps: list = field(default_factory=list)  # backbone layers whose outputs make the context (0-based)
    layers: int = 1
    block_size: int = 16
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    mask_token_id: int = 0  # an embedding row no text uses (past the tokenizer's own tokens, where there is one)
    rope_theta: float = 1e6
    eps: float = 1e-6
    token_cond: bool = False  # each slot's state updated by the token drafted at the slot before it

    @staticmethod
    def for_backbone(model, *, layers: int = LAYERS, block_size: int = 16, intermediate_size: int | None = None,
                     n_taps: int = 5, kv_heads: int | None = None, mask_token_id: int | None = None,
                     token_cond: bool = False) -> "BlockConfig":
        """Sizes from the backbone: its hidden size, head layout and rotary base; `n_taps` layers spread
        from layer 1 to L-3, as the public drafters take them (24 layers: 1, 6, 11, 16, 21). kv_heads: its
        own key/value heads (default the backbone's; a drafter's config carries its own, so an engine that
        serves it reads them from there). token_cond: slots that follow the token before them (--block-tc)."""
        cfg = model.config
        n = cfg.num_hidden_layers
        taps = sorted({round(1 + i * (n - 4) / max(n_taps - 1, 1)) for i in range(n_taps)}) if n > 4 else [n - 2]
        check_taps(taps, n)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return BlockConfig(hidden_size=cfg.hidden_size, intermediate_size=intermediate_size or cfg.intermediate_size,
                           taps=taps, layers=layers, block_size=block_size, heads=cfg.num_attention_heads,
                           kv_heads=kv_heads or cfg.num_key_value_heads, head_dim=head_dim,
                           mask_token_id=cfg.vocab_size - 1 if mask_token_id is None else mask_token_id,
                           rope_theta=float(getattr(cfg, "rope_theta", 1e6)), eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
                           token_cond=token_cond)

    def as_dict(self) -> dict:
        """The config as a bundle and an export write it (token_cond only where set: a plain drafter's config
        stays the one a collocate before it reads)."""
        d = asdict(self)
        if not d["token_cond"]:
            del d["token_cond"]
        return d


def check_taps(taps, n_layers: int) -> None:
    """A block drafter reads layers 0..L-2 of an L-layer backbone: HF gives the last layer's output only
    after the final norm (our fast engine before it), and vLLM and SGLang capture a layer's output as the
    next layer's input, so the last layer is read by none of them alike."""
    if not taps or min(taps) < 0 or max(taps) > n_layers - 2:
        raise ValueError(f"a block drafter reads backbone layers 0..{n_layers - 2} (the last one, {n_layers - 1}, "
                         f"is normalised where HF, vLLM and SGLang expose it); asked for {list(taps)}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (..., n, hd) rotated by positions pos (n,) or any shape that broadcasts to x's (..., n),
    half-split as Llama/Qwen do."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    angle = pos.float()[..., None] * freqs  # (..., n, hd/2)
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(x.dtype), torch.cat([angle.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: BlockConfig):
        super().__init__()
        self.q_proj = nn.Linear(c.hidden_size, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.eps), RMSNorm(c.head_dim, c.eps)


class MLP(nn.Module):
    def __init__(self, c: BlockConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BlockLayer(nn.Module):
    """One pre-norm layer: attention whose keys and values also come from the context, then a SwiGLU MLP.
    Its weights are named as DFlash checkpoints name them (self_attn.q_proj, mlp.gate_proj, ...)."""

    def __init__(self, c: BlockConfig):
        super().__init__()
        self.c = c
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.eps)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(..., n, heads * hd) -> (..., heads, n, hd)"""
        return x.unflatten(-1, (heads, self.c.head_dim)).transpose(-3, -2)

    def kv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., n, d) rows at positions pos (n,) or (..., n) -> their keys and values, (..., kv_heads, n, hd)
        each. (A leading batch dimension holds several sequences: training runs a step's answers at once.)"""
        c, a = self.c, self.self_attn
        k = a.k_norm(self.split(a.k_proj(x), c.kv_heads))
        return rotary(k, pos.unsqueeze(-2), c.rope_theta), self.split(a.v_proj(x), c.kv_heads)

    def forward(self, x, pos, ctx_k, ctx_v, sees, fused: bool = False) -> torch.Tensor:
        """x (..., m, d) block rows at positions pos (..., m); ctx_k/ctx_v (..., kv_heads, n, hd) the context's
        keys and values; sees (..., m, n + m) bool: which context and block rows each block row attends to.
        fused: attention in one kernel (PyTorch's scaled_dot_product_attention, the K/V copied per query head),
        with no (rows x keys) scores in memory: training's many blocks (`logits`); the same attention."""
        c, a = self.c, self.self_attn
        m = x.shape[-2]
        h = self.input_layernorm(x)
        q = rotary(a.q_norm(self.split(a.q_proj(h), c.heads)), pos.unsqueeze(-2), c.rope_theta)
        k, v = self.kv(h, pos)
        k, v = torch.cat([ctx_k, k], -2), torch.cat([ctx_v, v], -2)  # (..., kv_heads, n + m, hd)
        g = c.heads // c.kv_heads  # query heads per K/V head: grouped, so the context's K/V are not copied
        if fused:  # (q and k leave their norms in the norm weights' dtype, v its projection's: one dtype here)
            out = F.scaled_dot_product_attention(q.to(v.dtype), k.repeat_interleave(g, -3).to(v.dtype),
                                                 v.repeat_interleave(g, -3), attn_mask=sees.unsqueeze(-3))
        else:
            q = q.unflatten(-3, (c.kv_heads, g)).flatten(-3, -2)  # (..., kv_heads, g * m, hd)
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(c.head_dim)  # (..., kv_heads, g * m, n + m)
            probs = scores.masked_fill(~torch.cat([sees] * g, -2).unsqueeze(-3), float("-inf")).softmax(-1).to(v.dtype)
            out = (probs @ v).unflatten(-2, (g, m)).flatten(-4, -3)  # (..., heads, m, hd)
        x = x + a.o_proj(out.transpose(-3, -2).flatten(-2))
        return x + self.mlp(self.post_attention_layernorm(x))


class BlockModel(nn.Module):
    """The block drafter's weights, its training loss, and its decoding (a context cache of K/V by position)."""

    def __init__(self, c: BlockConfig):
        super().__init__()
        if not c.taps:
            raise ValueError("a block drafter reads at least one backbone layer (taps)")
        if c.block_size < 2 or c.heads % c.kv_heads:
            raise ValueError(f"block_size must be >= 2 and heads a multiple of kv_heads, got {c.block_size}, "
                             f"{c.heads}/{c.kv_heads}")
        self.c = c
        self.layers = nn.ModuleList(BlockLayer(c) for _ in range(c.layers))
        self.fc = nn.Linear(len(c.taps) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.eps)
        self.norm = RMSNorm(c.hidden_size, c.eps)
        # token_cond: slot j's state x_j becomes s_j = x_j + tc.delta(s_{j-1}, e(y_{j-1}), j), y_{j-1} the token
        # drafted at slot j-1 (the answer's own in training); s_1 = x_1, whose token before it is the anchor
        self.tc = TokenBlock(c.hidden_size, c.block_size) if c.token_cond else None

    # what a bundle's readers ask of any drafter's weights
    compete = False

    @property
    def offsets(self) -> list[int]:
        """The offsets it drafts: slot j of the block anchored on the root (at +1) is +1+j."""
        return list(range(2, self.c.block_size + 1))

    @property
    def n_heads(self) -> int:
        return self.c.block_size - 1

    @torch.no_grad()
    def init_from(self, model, *, layers: bool = False) -> "BlockModel":
        """Start the final norm at the backbone's: the frozen LM head reads states at that scale (from a
        norm of ones, the first logits were ~20x too large on SmolLM2: a first loss of 46). layers: also start
        each layer as one of the backbone's last ones (attention and MLP weights, its two norms; the
        backbone's q/k/v biases, where it has them, are left out), `fc` as the deepest tap alone and
        `hidden_norm` as the first copied layer's input norm, so the first layer's context values begin as
        that backbone layer's own, and its keys as those after a k-norm of ones (`--block-init backbone`)."""
        norm = getattr(model.base_model, "norm", None)
        if norm is not None and norm.weight.shape == self.norm.weight.shape:
            self.norm.weight.copy_(norm.weight)
        if not layers:
            return self
        theirs = list(model.base_model.layers)[-len(self.layers):]
        if len(theirs) < len(self.layers):
            raise ValueError(f"cannot start {len(self.layers)} block-drafter layers from a backbone of {len(theirs)}")
        names = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight"]
        for mine, src in zip(self.layers, theirs):
            a, b = mine.state_dict(), src.state_dict()
            for n in names:
                if n not in b or b[n].shape != a[n].shape:
                    raise ValueError(f"cannot start the block drafter's layers from the backbone's: {n} is "
                                     f"{tuple(b[n].shape) if n in b else 'missing'} there, {tuple(a[n].shape)} here "
                                     "(keep --block-mlp and --block-kv-heads at the backbone's)")
                a[n].copy_(b[n])
        d, deepest = self.c.hidden_size, self.c.taps.index(max(self.c.taps))
        self.fc.weight.zero_()
        self.fc.weight[:, deepest * d:(deepest + 1) * d].copy_(torch.eye(d))
        self.hidden_norm.weight.copy_(theirs[0].input_layernorm.weight)
        return self

    # -- both ---------------------------------------------------------------------------------------
    def context(self, features: torch.Tensor) -> torch.Tensor:
        """(n, len(taps) * d) backbone states -> (n, d) the context rows every layer reads."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def block(self, embed: nn.Module, anchors: torch.Tensor) -> torch.Tensor:
        """(..., b) anchor tokens -> (..., b * B, d): each anchor, then B - 1 mask tokens, embedded."""
        ids = anchors.new_full((*anchors.shape, self.c.block_size), self.c.mask_token_id)
        ids[..., 0] = anchors
        return embed(ids.flatten(-2)).to(self.fc.weight.dtype)

    # -- training: many blocks of several sequences in one pass ------------------------------------------
    def logits(self, embed, lm_head, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor,
               fused: bool = False) -> torch.Tensor:
        """tokens (N, T), features (N, T, len(taps) * d) of N sequences' positions, anchors (N, b) positions ->
        (N, b, B-1, V) logits of the tokens 1..B-1 places after each anchor (one sequence: (T,), (T, F) and
        (b,) -> (b, B-1, V)). Block a sees the context before a and itself, as decoding does. Sequences
        shorter than T are padded (their tokens with -100); an anchor of -1 is padding (its block sees no
        context and its slots learn nothing). fused: each layer's attention in one kernel (BlockLayer)."""
        if tokens.dim() == 1:
            return self.logits(embed, lm_head, tokens[None], features[None], anchors[None], fused)[0]
        x = self.slot_states(embed, tokens, features, anchors, fused)
        x = x[:, :, 1:] if self.tc is None else self.conditioned(embed, tokens, anchors, x)
        return lm_head(self.norm(x).to(lm_head.weight.dtype))

    def conditioned(self, embed, tokens: torch.Tensor, anchors: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(N, b, B, d) slot states -> (N, b, B-1, d) those of slots 1.., each updated by the token before it,
        the sequence's own (teacher forcing: a draft is kept only where the drafts before it are right)."""
        T, B = tokens.shape[-1], self.c.block_size
        at = (anchors.clamp(min=0)[..., None] + torch.arange(B - 1, device=tokens.device)).clamp(max=T - 1)
        before = embed(tokens.gather(1, at.flatten(1)).clamp(min=0)).view(*at.shape, -1)  # (N, b, B-1, d)
        s, out = x[:, :, 1], [x[:, :, 1]]
        for j in range(2, B):
            s = x[:, :, j] + self.tc.delta(s, before[:, :, j - 1], j)
            out.append(s)
        return torch.stack(out, 2)

    def slot_states(self, embed, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor,
                    fused: bool = False) -> torch.Tensor:
        """`logits`' pass up to the final norm, N sequences: (N, b, B, d) the blocks' states, slot 0 the anchor's."""
        B, (N, T), b, dev = self.c.block_size, tokens.shape, anchors.shape[1], tokens.device
        ctx = self.context(features)  # (N, T, d)
        at = anchors.clamp(min=0)
        pos = (at[..., None] + torch.arange(B, device=dev)).flatten(1)  # (N, b*B)
        owner = torch.arange(b, device=dev).repeat_interleave(B)
        sees = torch.cat([torch.arange(T, device=dev) < anchors[:, owner, None],
                          (owner[:, None] == owner[None, :]).expand(N, -1, -1)], -1)  # (N, b*B, T + b*B)
        x = self.block(embed, tokens.gather(1, at))
        for layer in self.layers:
            ctx_k, ctx_v = layer.kv(ctx, torch.arange(T, device=dev))
            x = layer(x, pos, ctx_k, ctx_v, sees, fused)
        return x.unflatten(1, (b, B))

    def targets(self, tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(..., b, B-1): the token each slot of the blocks at `anchors` learns, tokens[a + k]; -100 past the
        end and for padding (tokens (..., T) padded with -100, anchors (..., b) with -1)."""
        T = tokens.shape[-1]
        pos = anchors[..., None] + torch.arange(1, self.c.block_size, device=tokens.device)  # (..., b, B-1)
        got = tokens.gather(-1, pos.clamp(0, T - 1).flatten(-2)).view(pos.shape)
        return torch.where((pos < T) & (anchors[..., None] >= 0), got, -100)

    def loss(self, embed, lm_head, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor,
             *, decay: float = DECAY, local=None, teacher: torch.Tensor | None = None,
             kl_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted cross-entropy, (B-1,) top-1 hits per slot) of the blocks at `anchors` (positions in
        0..T-2; shapes as `logits`, one sequence or N padded ones): slot k's target is tokens[a + k] (past the
        end: none), and it weighs exp(-(k-1)/decay); the loss is each sequence's weighted mean over its slots,
        averaged over the sequences. local: where lm_head covers a draft vocabulary, its map from token ids to
        its rows (-100 outside). teacher: ((N,) T, V) the backbone's own logits at every position (over the same vocabulary);
        with it, kl_weight * KL(backbone at a+k-1 || slot k) joins each slot's term: the whole distribution
        the backbone gives the token that slot drafts, not only its top token."""
        terms = self.loss_terms(embed, lm_head, tokens, features, anchors, decay=decay, local=local,
                                teacher=teacher if kl_weight else None)
        return terms.mean(kl_weight), terms.hits

    def loss_terms(self, embed, lm_head, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor,
                   *, decay: float = DECAY, local=None, teacher: torch.Tensor | None = None,
                   fused: bool = False) -> "LossTerms":
        """`loss`'s sums per sequence, so that several passes over a step's answers add up (`LossTerms.add`)
        to the loss one pass over all of them gives. fused: as `logits`."""
        if tokens.dim() == 1:
            tokens, features, anchors = tokens[None], features[None], anchors[None]
            teacher = None if teacher is None else teacher[None]
        logits = self.logits(embed, lm_head, tokens, features, anchors, fused).float()  # (N, b, B-1, V)
        tokens_at = self.targets(tokens, anchors)
        target = local(tokens_at) if local is not None else tokens_at
        offsets = torch.arange(1, self.c.block_size, device=tokens.device)
        live = tokens_at != -100  # a token there (in the draft vocabulary or not)
        weight = torch.exp(-(offsets - 1) / decay).expand_as(target)
        ce = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100, reduction="none")
        ce_w = weight * (target >= 0)
        N = tokens.shape[0]
        kl, kl_w = logits.new_zeros(N), logits.new_zeros(N)
        if teacher is not None:
            T = tokens.shape[-1]
            at = (anchors[..., None] + offsets - 1).clamp(0, T - 1)  # the position whose next token slot k drafts
            t_logp = teacher.float()[torch.arange(N, device=at.device)[:, None, None], at].log_softmax(-1)
            kl_w = weight * live
            kl = ((t_logp.exp() * (t_logp - logits.log_softmax(-1))).sum(-1) * kl_w).flatten(1).sum(1)
            kl_w = kl_w.flatten(1).sum(1)
        hits = ((logits.argmax(-1) == target) & (target >= 0)).flatten(0, -2).sum(0)
        return LossTerms((ce.view(ce_w.shape) * ce_w).flatten(1).sum(1), ce_w.flatten(1).sum(1), kl, kl_w, hits)

    # -- decoding: the context's K/V in a cache indexed by position -----------------------------------
    def allocate(self, slots: int, device, dtype) -> "ContextCache":
        """An empty context cache of `slots` positions (each decoder has its own; the weights are shared)."""
        c = self.c
        shape = (c.kv_heads, slots, c.head_dim)
        return ContextCache([torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
                            [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers])

    def extend(self, cache: "ContextCache", features: torch.Tensor, pos: torch.Tensor) -> None:
        """Write the context rows of these positions (their backbone states) into every layer's cache;
        rows of a rejected draft are simply overwritten later (the anchor's position masks them)."""
        ctx = self.context(features)
        for layer, ck, cv in zip(self.layers, cache.k, cache.v):
            k, v = layer.kv(ctx, pos)
            ck.index_copy_(1, pos, k)
            cv.index_copy_(1, pos, v)

    def draft(self, cache: "ContextCache", embed, lm_head, anchor: torch.Tensor, pos: torch.Tensor,
              attn_len: int | None = None) -> torch.Tensor:
        """anchor () the backbone's token at position pos () -> (B-1, V) logits of the tokens at pos+1..pos+B-1,
        from the context cached before pos (the first attn_len slots are read: they must cover pos); a
        token-conditioned drafter's slots as their own states, not updated (`draft_states` and `step` do)."""
        return lm_head(self.norm(self.draft_states(cache, embed, anchor, pos, attn_len)[1:]).to(lm_head.weight.dtype))

    def draft_states(self, cache: "ContextCache", embed, anchor: torch.Tensor, pos: torch.Tensor,
                     attn_len: int | None = None) -> torch.Tensor:
        """`draft`'s pass up to the final norm: (B, d) the block's states, slot 0 the anchor's."""
        B = self.c.block_size
        n = attn_len or cache.k[0].shape[1]
        block_pos = pos + torch.arange(B, device=anchor.device)
        sees = torch.cat([(torch.arange(n, device=anchor.device) < pos)[None, :].expand(B, n),
                          torch.ones(B, B, dtype=torch.bool, device=anchor.device)], 1)
        x = self.block(embed, anchor.view(1))
        for layer, ck, cv in zip(self.layers, cache.k, cache.v):
            x = layer(x, block_pos, ck[:, :n], cv[:, :n], sees)
        return x

    def step(self, x: torch.Tensor, before: torch.Tensor, embedded: torch.Tensor, slot: int) -> torch.Tensor:
        """Decoding a token-conditioned drafter's tree, one depth: (r, d) the states that draft `slot` for r
        nodes one depth above it, from the block's states x (B, d), the nodes' parents' states before (r, d)
        and the nodes' own tokens, embedded (r, d) (slot 1: below the root, which the block holds already)."""
        if slot == 1:
            return x[1].expand(embedded.shape[0], -1)
        return x[slot] + self.tc.delta(before, embedded, slot).to(x.dtype)


class LossTerms(NamedTuple):
    """The block loss's sums over each sequence's blocks, (N,) each: weighted cross-entropy and its weight,
    the KL term and its weight; and (B-1,) top-1 hits per slot over them all."""
    ce: torch.Tensor
    ce_weight: torch.Tensor
    kl: torch.Tensor
    kl_weight: torch.Tensor
    hits: torch.Tensor

    def add(self, other: "LossTerms") -> "LossTerms":
        return LossTerms(*(torch.cat([a, b]) for a, b in zip(self[:4], other[:4])), self.hits + other.hits)

    def mean(self, kl_weight: float = 0.0) -> torch.Tensor:
        """Each sequence's weighted mean (plus kl_weight times its KL mean), averaged over the sequences."""
        loss = self.ce / self.ce_weight.clamp(min=1e-6)
        if kl_weight:
            loss = loss + kl_weight * self.kl / self.kl_weight.clamp(min=1e-6)
        return loss.mean()


class ContextCache(NamedTuple):
    """A decoder's block-drafter context: per layer, (kv_heads, slots, hd) keys and values by position."""
    k: list
    v: list


def backbone_features(model, ids: torch.Tensor, taps: list[int]) -> torch.Tensor:
    """(T,) ids -> (T, len(taps) * d): the outputs of the backbone's layers `taps` (0-based), joined."""
    out = model.base_model(input_ids=ids[None], output_hidden_states=True)
    return torch.cat([out.hidden_states[t + 1][0] for t in taps], -1)
