"""Export a bundle's heads to other engines' formats, and read them back.

    collocate export runs/q15 out/q15-medusa --format vllm-medusa
    collocate export runs/q15 out/q15-fd --format medusa            # FasterDecoding/Medusa's layout
    bundle = import_vllm_medusa("out/q15-medusa", backbone=model)   # the same drafts, in collocate

vLLM's Medusa drafter (vllm/model_executor/models/medusa.py, vllm/transformers_utils/configs/medusa.py)
reads a folder with config.json (`model_type: "medusa"`, `num_heads`, `num_hidden_layers`, `hidden_size`,
`vocab_size`, `truncated_vocab_size`, `original_lm_head`, `medusa_fc_bias`) and model.safetensors with
`blocks.{h}.layers.{l}.weight/bias` (a residual block x + SiLU(W x + b) per layer, as ours) and, since
our heads share the backbone's frozen LM head, one `lm_heads.0.weight` that vLLM uses for every head.
Head h drafts token t+h+2 from the target's last hidden state at t (after its final norm), as ours do.
Only independent heads have this form: token-conditioned heads and a competition (+1) head do not.

FasterDecoding/Medusa (medusa/model/medusa_model.py) reads config.json (`medusa_num_heads`,
`medusa_num_layers`, `base_model_name_or_path`) and `medusa_lm_head.pt`, the state dict of its
`medusa_head`: per head `{h}.{l}.linear.weight/bias` and its own copy of the LM head, `{h}.{layers}.weight`.
It builds a head's layers as `[ResBlock(d)] * n`, one block repeated, so only one-layer heads keep
their meaning there.

DFlash drafters (vLLM's `qwen3_dflash.py`, method "dflash"; SGLang's `models/dflash.py`, DFLASH) read a
Qwen3-style config.json (`architectures: ["DFlashDraftModel"]`, sizes, rotary settings, `block_size`,
`num_target_layers`, and `dflash_config` with `mask_token_id` and `target_layer_ids`: 0-based target
layers whose outputs are the context, which both engines capture at the residual entering layer id + 1)
and model.safetensors with our block drafter's names (`layers.{i}.self_attn.q_proj.weight`, ..., `fc`,
`hidden_norm`, `norm`), which they fuse into qkv_proj / gate_up_proj themselves. Embeddings and the LM head
are the target's; a draft vocabulary goes as vLLM's `lm_head.weight` over those rows with `d2t` (target id
minus draft id), which SGLang ignores (it drafts over the whole vocabulary).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .bundle import BundleError, MTPBundle

FORMATS = ("vllm-medusa", "medusa", "dflash")


def check_target(out: str | Path, *, overwrite: bool = False) -> Path:
    """Where an export may go: a new or empty folder, or (overwrite) a folder it replaces whole."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} is a file: give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BundleError(f"{out} exists and is not empty: choose another folder, or --overwrite to replace it")
    try:  # where it cannot write, say so before anything is loaded
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)).rmdir()
    except OSError as e:
        raise BundleError(f"cannot write to {out}: {e.strerror or e}") from None
    return out


@contextmanager
def staged(out: str | Path, *, overwrite: bool = False):
    """A fresh folder beside `out` to write into, moved into place only once everything is written: an
    export that fails half-way leaves nothing behind, and an existing folder is replaced only when asked."""
    out = check_target(out, overwrite=overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise BundleError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (after the move, nothing is there)


def medusa_config(bundle: MTPBundle) -> dict:
    c = bundle.config
    return {"model_type": "medusa", "architectures": ["MedusaModel"], "num_heads": bundle.k - 1,
            "num_hidden_layers": c.layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "truncated_vocab_size": c.vocab_size, "original_lm_head": True, "medusa_fc_bias": True,
            "base_model": c.base_model, "exported_by": "collocate"}


def medusa_tensors(bundle: MTPBundle, lm_head_weight: torch.Tensor, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """vLLM Medusa weight names for heads +2..+k (a +1 competition head is left out)."""
    heads = bundle.heads
    first = 1 if heads.compete else 0
    out = {}
    for h, stack in enumerate(heads.blocks[first:]):
        for layer, block in enumerate(stack):
            out[f"blocks.{h}.layers.{layer}.weight"] = block.linear.weight
            out[f"blocks.{h}.layers.{layer}.bias"] = block.linear.bias
    out["lm_heads.0.weight"] = lm_head_weight
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def check_exportable(bundle: MTPBundle, lm_head_weight: torch.Tensor, fmt: str) -> None:
    if bundle.token_conditioned:
        raise BundleError(f"{fmt} holds independent heads; this bundle's drafter is "
                          f"'{bundle.config.drafter}' (token-conditioned), which it cannot express")
    if tuple(lm_head_weight.shape) != (bundle.config.vocab_size, bundle.config.hidden_size):
        raise BundleError(f"LM head of shape {tuple(lm_head_weight.shape)} does not fit the bundle "
                          f"({bundle.config.vocab_size} x {bundle.config.hidden_size})")


def export_vllm_medusa(bundle: MTPBundle, lm_head_weight: torch.Tensor, out: str | Path, *,
                       overwrite: bool = False) -> Path:
    check_exportable(bundle, lm_head_weight, "vllm-medusa")
    with staged(out, overwrite=overwrite) as tmp:
        save_file(medusa_tensors(bundle, lm_head_weight), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(medusa_config(bundle), indent=2) + "\n")
    return Path(out)


def export_medusa(bundle: MTPBundle, lm_head_weight: torch.Tensor, out: str | Path, *,
                  overwrite: bool = False) -> Path:
    """FasterDecoding/Medusa's layout: the same blocks, and a copy of the LM head per head."""
    check_exportable(bundle, lm_head_weight, "medusa")
    if bundle.config.layers != 1:
        raise BundleError(f"FasterDecoding's Medusa repeats one block for every layer of a head, so a "
                          f"{bundle.config.layers}-layer head would change meaning there; use --format vllm-medusa")
    named = medusa_tensors(bundle, lm_head_weight)
    lm = named.pop("lm_heads.0.weight")
    state = {}
    for h in range(bundle.k - 1):
        state[f"{h}.0.linear.weight"] = named[f"blocks.{h}.layers.0.weight"]
        state[f"{h}.0.linear.bias"] = named[f"blocks.{h}.layers.0.bias"]
        state[f"{h}.1.weight"] = lm.clone()  # its heads own their LM head (ours share the backbone's)
    with staged(out, overwrite=overwrite) as tmp:
        torch.save(state, tmp / "medusa_lm_head.pt")
        (tmp / "config.json").write_text(json.dumps({"medusa_num_heads": bundle.k - 1, "medusa_num_layers": 1,
                                                     "base_model_name_or_path": bundle.config.base_model}, indent=2) + "\n")
    return Path(out)


def import_vllm_medusa(path: str | Path, *, backbone, base_model: str = "imported") -> MTPBundle:
    """A vLLM Medusa folder as a collocate bundle (heads only: no CLP or gates were trained)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "medusa":
        raise BundleError(f"{path} is not a Medusa draft (model_type {cfg.get('model_type')!r})")
    tensors = load_file(str(path / "model.safetensors"))
    tensors = {k.removeprefix("medusa_heads."): v for k, v in tensors.items()}
    bundle = MTPBundle.for_backbone(backbone, k=cfg["num_heads"] + 1, base_model=cfg.get("base_model", base_model),
                                    layers=cfg["num_hidden_layers"])
    lm = backbone.get_output_embeddings().weight
    bf16 = lambda t: t.detach().to("cpu", torch.bfloat16)  # noqa: E731  (the export's dtype)
    if "lm_heads.0.weight" in tensors and not torch.equal(bf16(tensors["lm_heads.0.weight"]), bf16(lm)):
        raise BundleError(f"{path}: its LM head is not the backbone's; collocate decodes heads through the "
                          "backbone's own LM head")
    with torch.no_grad():
        for h, stack in enumerate(bundle.heads.blocks):
            for layer, block in enumerate(stack):
                block.linear.weight.copy_(tensors[f"blocks.{h}.layers.{layer}.weight"])
                bias = tensors.get(f"blocks.{h}.layers.{layer}.bias")
                block.linear.bias.copy_(bias if bias is not None else torch.zeros_like(block.linear.bias))
    return bundle.eval().requires_grad_(False)


def dflash_config(bundle: MTPBundle, backbone) -> dict:
    """What vLLM's and SGLang's DFlash loaders read, from the block drafter's sizes and the backbone's."""
    c, b = bundle.heads.c, backbone.config
    rope = dict(getattr(b, "rope_parameters", None) or {}) or {"rope_type": "default"}
    rope["rope_theta"] = c.rope_theta
    cfg = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size, "num_hidden_layers": c.layers,
           "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
           "hidden_act": "silu", "rms_norm_eps": c.eps, "attention_bias": False, "rope_theta": c.rope_theta,
           "rope_parameters": rope, "max_position_embeddings": b.max_position_embeddings,
           "vocab_size": bundle.config.vocab_size, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "block_size": c.block_size, "num_target_layers": b.num_hidden_layers,
           "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.taps),
                             "block_size": c.block_size, "num_target_layers": b.num_hidden_layers},
           "base_model": bundle.config.base_model, "exported_by": "collocate"}
    if bundle.draft_ids is not None:
        cfg["draft_vocab_size"] = len(bundle.draft_ids)
    return cfg


def dflash_tensors(bundle: MTPBundle, lm_head_weight: torch.Tensor, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The block drafter's weights under its own (DFlash's) names; with a draft vocabulary, the LM head's rows
    of it and d2t, the offset from each draft id to its target id (vLLM's EAGLE-3 convention)."""
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in bundle.heads.state_dict().items()}
    if bundle.draft_ids is not None:
        ids = bundle.draft_ids.cpu()
        out["lm_head.weight"] = lm_head_weight.detach().index_select(0, ids.to(lm_head_weight.device)).to("cpu", dtype).contiguous()
        out["d2t"] = (ids - torch.arange(len(ids))).contiguous()
    return out


def export_dflash(bundle: MTPBundle, backbone, out: str | Path, *, overwrite: bool = False) -> Path:
    if bundle.config.drafter != "block":
        raise BundleError(f"dflash holds a block drafter; this bundle's drafter is '{bundle.config.drafter}' "
                          "(train one with --drafter block, or export heads as vllm-medusa)")
    if bundle.heads.c.token_cond:
        raise BundleError("this block drafter's slots follow the token drafted before them (--block-tc), which "
                          "vLLM's and SGLang's DFlash drafters do not do: export a block drafter trained without "
                          "--block-tc")
    lm_head = backbone.get_output_embeddings().weight
    with staged(out, overwrite=overwrite) as tmp:
        save_file(dflash_tensors(bundle, lm_head), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(dflash_config(bundle, backbone), indent=2) + "\n")
    return Path(out)
