"""Export to vLLM's Medusa format: names, shapes and config fields as vLLM's loader reads them, and a
round trip that gives the same drafts."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from collocate.bundle import BundleError, MTPBundle
from collocate.decode import DecodeConfig
from collocate.export import export_vllm_medusa, import_vllm_medusa
from conftest import randomize, tiny_llama, with_rank_probs
from test_decode import eager, prompts


class VllmMedusaMirror(nn.Module):
    """The module tree vLLM builds from a Medusa config.json (vllm/model_executor/models/medusa.py at
    01dbb08): per head a ResidualBlock of `num_hidden_layers` Linear(hidden, hidden, bias=medusa_fc_bias),
    x = x + SiLU(layer(x)) each; with `original_lm_head`, one LM head shared by every head, loaded from
    `lm_heads.0.weight`. Its loader strips a `medusa_heads.` prefix and skips names it does not know, so
    a strict load here is the stronger check."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, bias = cfg["hidden_size"], cfg.get("medusa_fc_bias", False)
        self.blocks = nn.ModuleList(nn.ModuleDict({"layers": nn.ModuleList(
            nn.Linear(d, d, bias=bias) for _ in range(cfg["num_hidden_layers"]))}) for _ in range(cfg["num_heads"]))
        self.lm_head = nn.Linear(d, cfg["truncated_vocab_size"], bias=False)

    def load(self, tensors: dict):
        named = {k.removeprefix("medusa_heads."): v for k, v in tensors.items()}
        named["lm_head.weight"] = named.pop("lm_heads.0.weight")  # what original_lm_head does
        self.load_state_dict({k: v.float() for k, v in named.items()}, strict=True)

    def propose(self, h: torch.Tensor) -> torch.Tensor:
        out = []
        for block in self.blocks:
            x = h
            for layer in block["layers"]:
                x = x + nn.functional.silu(layer(x))
            out.append(self.lm_head(x).argmax(-1))
        return torch.stack(out, -1)


@pytest.mark.parametrize("compete,layers", [(False, 1), (True, 1), (False, 2)])
def test_vllm_medusa_export_loads_as_vllm_reads_it_and_gives_the_same_drafts(tmp_path, compete, layers):
    model = tiny_llama().to(torch.bfloat16)  # bf16 weights, as the export writes them: exact comparisons
    bundle = randomize(MTPBundle.for_backbone(model, k=4, base_model="tiny", compete=compete, layers=layers),
                       seed=5, scale=4.0).to(torch.bfloat16).float()
    export_vllm_medusa(bundle, model.lm_head.weight, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"]
    assert (cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (3, layers, 32, 96)
    assert cfg["truncated_vocab_size"] == 96 and cfg["original_lm_head"] is True and cfg["medusa_fc_bias"] is True
    tensors = load_file(str(tmp_path / "model.safetensors"))
    want = {f"blocks.{h}.layers.{l}.{p}" for h in range(3) for l in range(layers) for p in ("weight", "bias")}
    assert set(tensors) == want | {"lm_heads.0.weight"}
    assert tensors["lm_heads.0.weight"].shape == (96, 32) and tensors["blocks.0.layers.0.weight"].shape == (32, 32)
    mirror = VllmMedusaMirror(cfg)
    mirror.load(tensors)
    h = model.model(torch.tensor([prompts(1, seed=2)[0]])).last_hidden_state.float()[0]  # (T, d), after the norm
    ours = bundle.heads.logits(h, model.lm_head.float(), ).argmax(-1)[:, 1 if compete else 0:]
    assert torch.equal(mirror.propose(h), ours)
    back = with_rank_probs(import_vllm_medusa(tmp_path, backbone=model))  # the round trip
    assert torch.equal(back.heads.logits(h, model.lm_head.float()).argmax(-1), ours)
    model = model.float()
    for p in prompts(3, seed=6):
        cfg_v = DecodeConfig(mode="verify", max_new_tokens=20)
        a = eager(model, back).generate(p, cfg_v)
        assert a.tokens == eager(model).generate(p, DecodeConfig(max_new_tokens=20)).tokens


def test_export_refuses_what_medusa_cannot_hold(tmp_path):
    model = tiny_llama()
    tc = MTPBundle.for_backbone(model, k=3, base_model="tiny", drafter="tc-shared")
    with pytest.raises(BundleError, match="token-conditioned"):
        export_vllm_medusa(tc, model.lm_head.weight, tmp_path)
    plain = MTPBundle.for_backbone(model, k=3, base_model="tiny")
    with pytest.raises(BundleError, match="does not fit"):
        export_vllm_medusa(plain, torch.zeros(10, 32), tmp_path)
    export_vllm_medusa(plain, model.lm_head.weight, tmp_path)
    with pytest.raises(BundleError, match="not the backbone's"):
        import_vllm_medusa(tmp_path, backbone=tiny_llama(seed=4))


def test_fasterdecoding_medusa_layout_gives_the_same_drafts(tmp_path):
    """FasterDecoding/Medusa (medusa/model/medusa_model.py): medusa_head = per head Sequential(ResBlock,
    Linear(hidden, vocab, bias=False)), loaded from medusa_lm_head.pt; our export fills it exactly."""
    from collocate.export import export_medusa

    model = tiny_llama().to(torch.bfloat16)
    bundle = randomize(MTPBundle.for_backbone(model, k=4, base_model="tiny"), seed=7, scale=4.0).to(torch.bfloat16).float()
    export_medusa(bundle, model.lm_head.weight, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == {"medusa_num_heads": 3, "medusa_num_layers": 1, "base_model_name_or_path": "tiny"}

    class ResBlock(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.linear = nn.Linear(d, d)

        def forward(self, x):
            return x + nn.functional.silu(self.linear(x))

    heads = nn.ModuleList(nn.Sequential(ResBlock(32), nn.Linear(32, 96, bias=False)) for _ in range(3))
    state = torch.load(tmp_path / "medusa_lm_head.pt")
    heads.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    h = model.model(torch.tensor([prompts(1, seed=2)[0]])).last_hidden_state.float()[0]
    theirs = torch.stack([head(h).argmax(-1) for head in heads], -1)
    assert torch.equal(theirs, bundle.heads.logits(h, model.lm_head.float()).argmax(-1))
    with pytest.raises(BundleError, match="repeats one block"):
        export_medusa(MTPBundle.for_backbone(model, k=3, base_model="t", layers=2), model.lm_head.weight, tmp_path)


def test_export_never_overwrites_unasked_and_writes_nothing_half_way(tmp_path, capsys):
    """`collocate export`: onto the bundle itself, into a folder that is not empty, to a file or where it
    cannot write: a one-line error, and every file as it was; --overwrite replaces a folder whole."""
    from collocate.cli import main
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "tiny")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    bundle_dir = tmp_path / "bundle"
    MTPBundle.for_backbone(model, k=3, base_model=model_dir).save_pretrained(bundle_dir)
    before = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    capsys.readouterr()  # (the setup's progress bars)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, word in ((bundle_dir, "the bundle itself"), (busy, "--overwrite"), (a_file, "is a file"),
                      (Path("/proc/collocate-export"), "cannot write")):
        assert main(["export", str(bundle_dir), str(out)]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == before
    assert (busy / "keep.txt").read_text() == "mine" and a_file.read_text() == "x"
    assert main(["export", str(bundle_dir), str(busy), "--overwrite"]) == 0
    assert sorted(p.name for p in busy.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
