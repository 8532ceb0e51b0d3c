"""The one engine factory: the decode loop over the backend that fits the model and the device.

    dec = build_decoder(model, tokenizer, bundle)                    # engine "auto"
    dec = build_decoder(model, tokenizer, bundle, engine="fast", max_len=4096)
    dec = load_decoder("smollm2-135m", engine="eager")               # from names, as the CLI takes them

"auto" is the fast backend on CUDA for the architectures it covers, else the eager one (the HF model
with its own cache). Both run the same loop, drafter and rules, and give the same tokens.
"""
from __future__ import annotations

import torch

from .backend import HFBackend
from .decode import Decoder
from .fast import SUPPORTED, StaticBackend

ENGINES = ("auto", "eager", "fast")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


def pick_engine(model, engine: str = "auto") -> str:
    check_choice("engine", engine, ENGINES)
    if engine != "auto":
        return engine
    return "fast" if model.device.type == "cuda" and model.config.model_type in SUPPORTED else "eager"


def build_decoder(model, tokenizer=None, bundle=None, *, engine: str = "auto", eos_token_ids: list[int] | None = None,
                  max_len: int | None = None, graphs: bool | None = None, compile: bool | None = None,
                  overlap: bool | None = None) -> Decoder:
    """engine "fast" runs anywhere it can (on a CPU without graphs or compiling, as the tests drive it);
    max_len, graphs and compile are the fast backend's (cache slots, None: the model's window where memory
    allows, fast.default_max_len; graphs and compiling, None: on where there is CUDA); overlap is the
    loop's (Decoder)."""
    if pick_engine(model, engine) == "fast":
        backend = StaticBackend(model, max_len=max_len, graphs=graphs, compile=compile)
    else:
        backend = HFBackend(model)
    return Decoder(backend, tokenizer, bundle, eos_token_ids=eos_token_ids, overlap=overlap)


def load_decoder(model: str, *, heads: str | None = None, need_heads: bool = True, device: str = "auto",
                 dtype: str = "auto", engine: str = "auto", **backend_options) -> Decoder:
    """Backbone + its bundle (checked against each other) + a decoder, from names as the CLI takes them.
    heads=None picks the bundle shipped for the model, if any, when need_heads; device "auto" is the GPU
    where there is one."""
    from .bundle import MTPBundle, default_bundle_for
    from .zoo import load_backbone

    check_choice("dtype", dtype, DTYPES)
    check_choice("engine", engine, ENGINES)  # before the model loads
    backbone, tokenizer = load_backbone(model, dtype=DTYPES[dtype], device=device)
    heads = heads or (default_bundle_for(model) if need_heads else None)
    bundle = MTPBundle.from_pretrained(heads, backbone=backbone, backbone_name=model) if heads else None
    return build_decoder(backbone, tokenizer, bundle, engine=engine, **backend_options)
