"""Export of a block drafter as DFlash: the folder read through transcriptions of vLLM's and SGLang's
loaders (their config fields, name mapping into fused qkv_proj / gate_up_proj, shapes, the draft vocabulary
map) and a DFlash draft written from their model files' math, which must draft our tokens."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from collocate.block import BlockConfig, backbone_features
from collocate.bundle import BundleError, MTPBundle
from collocate.export import export_dflash
from collocate.heads import VocabSlice
from conftest import randomize, tiny_llama, tiny_qwen
from test_decode import bundle_for

STACKED = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]


def fuse(tensors: dict, prefix: str) -> dict:
    """Both engines' stacked-parameter loading: q/k/v into one qkv_proj (rows q, k, v), gate/up into one
    gate_up_proj, every other name kept, under `prefix` (vLLM prepends "model." to all but lm_head)."""
    shards: dict = {}
    out = {}
    for name, t in tensors.items():
        for fused, part, shard in STACKED:
            if f".{part}." in name:
                shards.setdefault(prefix + name.replace(part, fused), {})[shard] = t
                break
        else:
            out[name if name.startswith("lm_head") or name == "d2t" else prefix + name] = t
    for name, parts in shards.items():
        out[name] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def vllm_load(folder) -> tuple[dict, dict]:
    """vLLM (model_executor/models/qwen3_dflash.py): the draft's hf_config; `dflash_config` merged over
    `eagle_config`; fc's input = hidden * len(target_layer_ids); "d2t" renamed draft_id_to_target_id, and
    draft_vocab_size (default vocab_size) sizes lm_head; every other name gets "model."."""
    cfg = json.loads((folder / "config.json").read_text())
    drafter = {**cfg.get("eagle_config", {}), **cfg["dflash_config"]}
    tensors = load_file(str(folder / "model.safetensors"))
    params = fuse(tensors, "model.")
    if "d2t" in params:
        params["draft_id_to_target_id"] = params.pop("d2t")
    d, n = cfg["hidden_size"], len(drafter["target_layer_ids"])
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.fc.weight": (d, d * n), "model.hidden_norm.weight": (d,), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.qkv_proj.weight": (q + 2 * kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                   p + "mlp.gate_up_proj.weight": (2 * cfg["intermediate_size"], d),
                   p + "mlp.down_proj.weight": (d, cfg["intermediate_size"]),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    vocab = cfg.get("draft_vocab_size") or cfg["vocab_size"]
    if vocab != cfg["vocab_size"]:
        shapes |= {"lm_head.weight": (vocab, d), "draft_id_to_target_id": (vocab,)}
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    return {"cfg": cfg, "taps": drafter["target_layer_ids"], "mask": drafter["mask_token_id"],
            "block": drafter.get("block_size", cfg.get("block_size")), "prefix": "model.", "params": params}


def sglang_load(folder) -> dict:
    """SGLang (models/dflash.py, speculative/dflash_utils.py): dflash_config's keys, else the top level's
    (block_size, num_target_layers, target_layer_ids); names with or without "model."; weights it does not
    know (lm_head, d2t) ignored: it drafts through the target's own LM head."""
    cfg = json.loads((folder / "config.json").read_text())
    dflash = cfg.get("dflash_config", {})
    get = lambda key: dflash.get(key, cfg.get(key))  # noqa: E731
    taps = [int(x) for x in get("target_layer_ids")]
    assert all(0 <= t < int(get("num_target_layers")) for t in taps)
    params = {k: v for k, v in fuse(load_file(str(folder / "model.safetensors")), "").items()
              if not k.startswith("lm_head") and k != "d2t"}
    assert params["fc.weight"].shape == (cfg["hidden_size"], cfg["hidden_size"] * len(taps))
    return {"cfg": cfg, "taps": taps, "mask": dflash["mask_token_id"], "block": int(get("block_size")),
            "prefix": "", "params": params}


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta):
    """Neox-style rotary (both engines' default for Qwen3): the halves of each head rotated."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dflash_draft(loaded: dict, target, feats: torch.Tensor, anchor: int, pos: int) -> torch.Tensor:
    """The block's tokens by slot 1..B-1 as the engines compute them: the context (target features before
    pos) through fc and hidden_norm, then per layer its K (k_norm, rotary) and V; the block [anchor, mask ...]
    embedded with the target's table at positions pos.., non-causal attention over context and block, final
    norm, the LM head (vLLM: over the draft vocabulary, then each draft id placed at draft id + d2t)."""
    cfg, p, pre = loaded["cfg"], {k: v.float() for k, v in loaded["params"].items()}, loaded["prefix"]
    eps, theta, B = cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"], loaded["block"]
    d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["head_dim"]
    ctx = rms(feats[:pos].float() @ p[pre + "fc.weight"].T, p[pre + "hidden_norm.weight"], eps)
    ids = torch.tensor([anchor] + [loaded["mask"]] * (B - 1))
    x = target.get_input_embeddings()(ids).float()
    qpos, kpos = torch.arange(pos, pos + B), torch.arange(pos)
    for i in range(cfg["num_hidden_layers"]):
        w = lambda name: p[f"{pre}layers.{i}.{name}"]  # noqa: E731
        h = rms(x, w("input_layernorm.weight"), eps)
        q, k, v = (h @ w("self_attn.qkv_proj.weight").T).split([nh * hd, nkv * hd, nkv * hd], -1)
        ck, cv = (ctx @ w("self_attn.qkv_proj.weight")[nh * hd:].T).split([nkv * hd, nkv * hd], -1)
        q = rope(rms(q.view(B, nh, hd), w("self_attn.q_norm.weight"), eps), qpos, theta)
        k = rope(rms(torch.cat([ck, k]).view(-1, nkv, hd), w("self_attn.k_norm.weight"), eps),
                 torch.cat([kpos, qpos]), theta)
        v = torch.cat([cv, v]).view(-1, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(B, nh * hd)
        x = x + o @ w("self_attn.o_proj.weight").T
        gate, up = (rms(x, w("post_attention_layernorm.weight"), eps) @ w("mlp.gate_up_proj.weight").T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ w("mlp.down_proj.weight").T
    h = rms(x, p[pre + "norm.weight"], eps)[1:]
    if "lm_head.weight" in p:
        draft = (h @ p["lm_head.weight"].T).argmax(-1)
        return draft + loaded["params"]["draft_id_to_target_id"][draft]
    return (h @ target.get_output_embeddings().weight.float().T).argmax(-1)


def block_bundle(model, vocab=0, kv_heads=None):
    c = BlockConfig.for_backbone(model, block_size=6, layers=2, intermediate_size=48, kv_heads=kv_heads)
    b = MTPBundle.for_backbone(model, k=6, base_model="tiny", has_gates=False, drafter="block", block=c.as_dict(),
                               draft_vocab=vocab)
    randomize(b, seed=2, scale=2.0)
    if vocab:
        b.draft_ids.copy_(torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(3))[:vocab])
    with torch.no_grad():  # the weights as the bf16 export holds them, so both sides read the same numbers
        for t in b.parameters():
            t.copy_(t.to(torch.bfloat16).float())
    return b


def our_draft(bundle, model, feats, anchor, pos):
    block, lm = bundle.heads, model.get_output_embeddings()
    head = lm if bundle.draft_ids is None else VocabSlice(lm, bundle.draft_ids)
    cache = block.allocate(64, feats.device, torch.float32)
    block.extend(cache, feats[:pos], torch.arange(pos))
    tokens = block.draft(cache, model.get_input_embeddings(), head, torch.tensor(anchor), torch.tensor(pos)).argmax(-1)
    return bundle.draft_ids[tokens] if bundle.draft_ids is not None else tokens


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
@pytest.mark.parametrize("vocab,kv", [(0, None), (40, None), (0, 4)])  # (4: K/V heads of its own, not the backbone's 2)
def test_engines_rebuild_our_block_drafter_from_the_export(tmp_path, make, vocab, kv):
    model = make()
    with torch.no_grad():  # a backbone whose LM head is bf16-exact too (the export's LM-head rows)
        model.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight.to(torch.bfloat16).float())
    bundle = block_bundle(model, vocab, kv)
    export_dflash(bundle, model, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["target_layer_ids"] == bundle.heads.c.taps
    assert cfg["num_key_value_heads"] == (kv or model.config.num_key_value_heads)
    tokens = torch.randint(3, 90, (30,), generator=torch.Generator().manual_seed(1))
    feats = backbone_features(model, tokens, bundle.heads.c.taps)
    loaders = [vllm_load] + ([sglang_load] if not vocab else [])  # (SGLang drafts over the whole vocabulary)
    for load in loaders:
        loaded = load(tmp_path / "d")
        assert loaded["taps"] == bundle.heads.c.taps and loaded["block"] == 6
        for pos in (1, 9, 25):
            want = our_draft(bundle, model, feats, int(tokens[pos]), pos)
            assert dflash_draft(loaded, model, feats, int(tokens[pos]), pos).tolist() == want.tolist(), (load.__name__, pos)


def test_dflash_export_refuses_heads_and_leaves_nothing_half_written(tmp_path):
    model = tiny_llama()
    with pytest.raises(BundleError, match="--drafter block"):
        export_dflash(bundle_for(model), model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        export_dflash(block_bundle(model), model, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep"]
