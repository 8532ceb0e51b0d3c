"""What a backend is (Backend), and the reference one: the Hugging Face model itself over its DynamicCache.

    backend = HFBackend(model)     # any HF causal LM
    dec = Decoder(backend, tokenizer, bundle)

A backend runs the forward over given ids at given positions with a given draft tree, and then keeps
what the acceptance rule kept and drops the rest; the step runner (step.py) and the loop read nothing
of it but what Backend declares. This one hands a tree to HF as a 4-D attention mask
(a row sees the prefix and its ancestors) with position ids by depth, and keeps a path by cutting the
cache back and gathering the kept rows. The fast backend (fast.StaticBackend) is tested against it
token for token.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Protocol

import torch

from .draft import DraftTree
from .errors import DecodeError
from .rules import Kept


class Hidden(NamedTuple):
    """A forward's hidden states."""
    last: torch.Tensor  # (m, d) after the final norm: what the LM head reads
    taps: torch.Tensor  # (m, len(taps) * d) the outputs of the asked layers (0-based), joined; (m, 0) for none


def joined_taps(states: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Layer outputs (m, d) each -> (m, n * d); none -> (m, 0)."""
    return torch.cat(states, -1) if states else like.new_zeros(like.shape[0], 0)


class Backend(Protocol):
    """The forward of one decode step, the cache behind it, and how steps are run."""
    model: torch.nn.Module  # the HF causal LM (its embeddings and LM head are read by the step)
    capacity: int  # the most tokens the cache holds: prompt and answer
    slots: int  # positions a forward may write: the capacity, and where a prompt is padded the padding past it
    attn_lens: tuple[int, ...]  # the attention lengths a step may read (graphs are captured per length)

    @property
    def captures(self) -> bool:
        """Steps are captured as graphs (so warm-up captures them before anything is timed)."""

    @property
    def fixed_rows(self) -> bool:
        """Every step may read one attention length (attn_len), so a row's arithmetic has one shape (--exact)."""

    def describe(self) -> str: ...
    def check_fits(self, n_prompt: int) -> None: ...
    def reset(self) -> None: ...
    def prompt_pieces(self, n_prompt: int) -> list[tuple[int, int]]:
        """(first row, width) of each piece a prompt is fed as; the last may be padded past the prompt."""
    def attn_len(self, end: int | None) -> int | None: ...

    def forward(self, ids: torch.Tensor, pos0: torch.Tensor, tree: DraftTree | None,
                attn_len: int | None = None, *, taps: tuple[int, ...] = (), exact: bool = False) -> Hidden:
        """(m,) ids written after the cache's pos0 slots, as `tree` (None: a prompt) -> their hidden states,
        and the outputs of the layers `taps` (what a block drafter reads). exact (where fixed_rows): every
        row's arithmetic is `ar`'s for its token at its position, bit for bit, whatever its row."""

    def keep(self, pos0: torch.Tensor, kept: Kept, tree: DraftTree) -> None:
        """Keep the root and the kept path of what the last forward wrote; drop the rest."""

    def compiled(self, fn: Callable) -> Callable:
        """fn, through torch.compile where this backend compiles (decided at each call: it may stop)."""

    def run(self, key, step: Callable, *, state: tuple[torch.Tensor, ...]):
        """step() (a graph replay, captured for `key` on first use, where the backend captures)."""


def check_supported(model) -> None:
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise DecodeError(f"{cfg.model_type} applies {attr} to its logits; collocate decodes through the "
                              "plain LM head and does not support it yet")


def model_context(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30


class HFBackend:
    captures = False  # steps run as they are, no graphs
    fixed_rows = False  # attention reads what the cache holds, so its length changes every step
    attn_lens = ()

    def __init__(self, model):
        check_supported(model)
        self.model = model
        self.body = model.base_model  # the transformer without its LM head: gives hidden states
        self.capacity = self.slots = model_context(model)
        self.cache_kw = cache_keyword(self.body)
        self.cache = None

    def describe(self) -> str:
        return "eager"

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.capacity:
            raise DecodeError(f"prompt of {n_prompt} tokens does not fit the model's context of {self.capacity} tokens")

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def prompt_pieces(self, n_prompt: int) -> list[tuple[int, int]]:
        return [(0, n_prompt)]  # the cache keeps every row fed: no padding

    def attn_len(self, end: int | None) -> int | None:
        return end  # the model's attention reads what its cache holds; a drafter's context cache, this many slots

    def forward(self, ids: torch.Tensor, pos0: torch.Tensor, tree: DraftTree | None,
                attn_len: int | None = None, *, taps: tuple[int, ...] = (), exact: bool = False) -> Hidden:
        """(m,) ids after what the cache holds -> their hidden states (Backend.forward)."""
        if exact:
            raise DecodeError("--exact needs the fast engine's static cache (--engine fast)")
        past = self.cache.get_seq_length()
        extra = {}
        if tree is None or tree.is_chain:  # HF's own causal mask
            positions = torch.arange(past, past + ids.shape[0], device=ids.device)
        else:
            t = tree.tensors(ids.device)
            positions = past + t.depths
            dtype = self.model.get_output_embeddings().weight.dtype
            sees = torch.cat([t.visible.new_ones(t.visible.shape[0], past), t.visible], 1)  # (m, past + m)
            mask = torch.zeros(sees.shape, dtype=dtype, device=ids.device).masked_fill(~sees, torch.finfo(dtype).min)
            extra["attention_mask"] = mask[None, None]  # additive, which eager and SDPA attention both take
        out = self.body(input_ids=ids[None], position_ids=positions[None], use_cache=True,
                        output_hidden_states=bool(taps), **{self.cache_kw: self.cache}, **extra)
        h = out.last_hidden_state[0]
        return Hidden(h, joined_taps([out.hidden_states[i + 1][0] for i in taps], h))  # [0]: the embeddings

    def keep(self, pos0: torch.Tensor, kept: Kept, tree: DraftTree) -> None:
        """Keep the root and the kept path; drop every other row this step wrote."""
        start = self.cache.get_seq_length() - tree.n - 1  # the root's position
        count = int(kept.count)
        if tree.is_chain:
            if count < tree.n:
                self.cache.crop(count - tree.n)  # a negative count drops that many from the end
            return
        rows = torch.cat([torch.arange(start + 1), start + kept.path[:count].cpu()])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, rows.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, rows.to(layer.values.device))

    def compiled(self, fn):
        return fn

    def run(self, key, step, *, state):
        return step()


def cache_keyword(body) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; speak whichever this one knows."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
