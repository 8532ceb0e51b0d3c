import pytest
import torch

from collocate.bundle import BundleError, MTPBundle
from collocate.clp import CLP, Gates
from collocate.heads import MTPHeads
from conftest import randomize, tiny_llama, tiny_qwen


def test_head_shapes(llama):
    heads = MTPHeads(32, 4)
    h = torch.randn(2, 5, 32)
    assert heads(h).shape == (2, 5, 3, 32)
    assert heads.logits(h, llama.lm_head).shape == (2, 5, 3, 96)
    assert heads.offsets == [2, 3, 4]
    assert MTPHeads(32, 4, compete=True).offsets == [1, 2, 3, 4]


def test_heads_do_not_share_weights():
    heads = MTPHeads(32, 4, layers=2)
    ptrs = {p.data_ptr() for p in heads.parameters()}
    assert len(ptrs) == len(list(heads.parameters())) == 3 * 2 * 2


def test_zero_init_heads_equal_backbone_next_token_logits(llama):
    ids = torch.randint(3, 96, (1, 7))
    out = llama(ids, output_hidden_states=True)
    h = llama.model(ids).last_hidden_state
    logits = MTPHeads(32, 4).logits(h, llama.lm_head)
    for j in range(3):
        torch.testing.assert_close(logits[:, :, j], out.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits[:, :, j].argmax(-1), out.logits.argmax(-1))


def test_parameter_counts():
    assert sum(p.numel() for p in CLP(1536, 4).parameters()) == 6148
    assert sum(p.numel() for p in CLP(1536, 4, features="hidden+conf").parameters()) == 1539 * 4 + 4
    assert sum(p.numel() for p in CLP(896, 4).parameters()) == 3588
    per_gate = 1536 * 512 + 512 + 512 * 256 + 256 + 256 + 1
    assert sum(p.numel() for p in Gates(1536, 3).parameters()) == 3 * per_gate
    assert 0.9e6 < per_gate < 0.95e6


def test_clp_threshold_rule_picks_longest_confident_length():
    clp = CLP(4, 4)
    with torch.no_grad():
        clp.linear.weight.zero_()
        clp.linear.bias.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))
    h = torch.zeros(1, 4)
    assert clp.accept(h, None).item() == 3  # argmax
    # P(len >= c) = 1, .9, .7, .4
    assert clp.accept(h, None, threshold=0.95).item() == 0
    assert clp.accept(h, None, threshold=0.8).item() == 1
    assert clp.accept(h, None, threshold=0.7).item() == 2
    assert clp.accept(h, None, threshold=0.3).item() == 3


def test_gates_accept_until_first_refusal():
    gates = Gates(4, 3)
    with torch.no_grad():
        for mlp, bias in zip(gates.mlps, [5.0, -5.0, 5.0]):
            for p in mlp.parameters():
                p.zero_()
            mlp[-1].bias.fill_(bias)
    assert gates.accept(torch.zeros(2, 4)).tolist() == [1, 1]


def test_save_load_round_trip_is_bit_identical(tmp_path, llama):
    b = MTPBundle.for_backbone(llama, k=4, base_model="tiny", has_gates=True, clp_features="hidden+conf")
    randomize(b)
    b.save_pretrained(tmp_path)
    c = MTPBundle.from_pretrained(tmp_path, backbone=llama)
    assert c.config == b.config
    for (n1, t1), (n2, t2) in zip(b.state_dict().items(), c.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)


def test_bundle_refuses_other_backbone(tmp_path, llama):
    MTPBundle.for_backbone(llama, k=3, base_model="tiny-llama").save_pretrained(tmp_path)
    with pytest.raises(BundleError, match="tiny-llama.*LM-head weights differ"):
        MTPBundle.from_pretrained(tmp_path, backbone=tiny_llama(seed=1), backbone_name="other")
    with pytest.raises(BundleError, match="hidden size 32.*hidden size 48"):
        MTPBundle.from_pretrained(tmp_path, backbone=tiny_llama(hidden=48))
    with pytest.raises(BundleError, match="vocabulary 96.*vocabulary 80"):
        MTPBundle.from_pretrained(tmp_path, backbone=tiny_qwen(vocab=80))


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path, llama):
    MTPBundle.for_backbone(llama, k=3, base_model="tiny").save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        MTPBundle.from_pretrained(tmp_path)
    st.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BundleError, match="corrupt or truncated"):
        MTPBundle.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        MTPBundle.from_pretrained(tmp_path)
    with pytest.raises(BundleError, match="no MTP bundle"):
        MTPBundle.from_pretrained(tmp_path / "nope")


def test_fingerprint_same_in_float32_and_bf16(llama):
    from collocate.bundle import fingerprint

    b = tiny_llama()
    b.to(torch.bfloat16)
    llama.lm_head.weight.data = b.lm_head.weight.data.float()
    assert fingerprint(llama) == fingerprint(b)


def test_bundle_whose_tensors_disagree_with_its_k_is_refused(tmp_path, llama):
    import json

    MTPBundle.for_backbone(llama, k=4, base_model="tiny").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["k"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="does not match its config.json"):
        MTPBundle.from_pretrained(tmp_path)


def test_unknown_short_name_lists_valid_names():
    from collocate.zoo import ZOO, resolve

    with pytest.raises(ValueError, match="Short names: " + ", ".join(ZOO)):
        resolve("no-such-model")


def test_max_wrong_picks_the_calibrated_threshold(tmp_path, llama):
    """--max-wrong: the lowest threshold whose held-out wrong share fits, from train_report.json; a share
    no threshold reaches, a bundle with no report, and values outside (0, 1) are clear errors."""
    import json

    from collocate.decode import DecodeConfig, DecodeError
    from collocate.engine import build_decoder

    b = MTPBundle.for_backbone(llama, k=4, base_model="tiny")
    b.save_pretrained(tmp_path)
    table = {"0.5": {"wrong_share": 0.4, "mean_accepted": 1.1}, "0.9": {"wrong_share": 0.12, "mean_accepted": 0.3},
             "0.99": {"wrong_share": 0.04, "mean_accepted": 0.02}}
    (tmp_path / "train_report.json").write_text(json.dumps({"clp": {"hidden": {"thresholds": table}}}))
    loaded = MTPBundle.from_pretrained(tmp_path, backbone=llama)
    assert loaded.threshold_for(0.5) == 0.5 and loaded.threshold_for(0.2) == 0.9 and loaded.threshold_for(0.05) == 0.99
    with pytest.raises(BundleError, match="lowest is 4.0%"):
        loaded.threshold_for(0.01)
    dec = build_decoder(llama, bundle=loaded, engine="eager", eos_token_ids=[2])
    r = dec.generate([5, 6, 7], DecodeConfig(mode="clp", max_wrong=0.2, max_new_tokens=8))
    assert float(dec.runner.threshold) == pytest.approx(0.9) and len(r.tokens) == 8
    with pytest.raises(BundleError, match="calibration"):
        build_decoder(llama, bundle=b, engine="eager").generate([5], DecodeConfig(mode="clp", max_wrong=0.1))
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(DecodeError, match=r"must lie in \(0, 1\)"):
            DecodeConfig(mode="clp", max_wrong=bad)
    with pytest.raises(DecodeError, match="mode 'clp'"):
        DecodeConfig(mode="verify", max_wrong=0.1)


def test_bundle_carries_every_clp_variant_with_its_calibration(tmp_path, llama):
    """Format 3: the default CLP and its variants (other features) save, load and calibrate each on its
    own; decoding picks one by --clp-features; a variant the bundle lacks is a clear error."""
    import json

    from collocate.bundle import BundleConfig
    from collocate.decode import DecodeConfig
    from collocate.engine import build_decoder

    b = MTPBundle.for_backbone(llama, k=4, base_model="tiny", clp_features="hidden+conf", clp_variants=["hidden"])
    with torch.no_grad():  # the default CLP always takes nothing, the paper's (hidden) always all 3
        for clp, length in ((b.clp_for(), 0), (b.clp_for("hidden"), 3)):
            clp.linear.weight.zero_()
            clp.linear.bias.copy_(torch.tensor([-9.0] * 4).index_fill_(0, torch.tensor(length), 9.0))
    b.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["format_version"] == 3
    tables = {"hidden": {"0.9": {"wrong_share": 0.3, "mean_accepted": 0.5}},
              "hidden+conf": {"0.9": {"wrong_share": 0.05, "mean_accepted": 0.2}}}
    (tmp_path / "train_report.json").write_text(json.dumps({"clp": {f: {"thresholds": t} for f, t in tables.items()}}))
    loaded = MTPBundle.from_pretrained(tmp_path, backbone=llama)
    assert loaded.clp_for().features == "hidden+conf" and loaded.clp_for("hidden").features == "hidden"
    torch.testing.assert_close(loaded.clp_for("hidden").linear.bias, b.clp_for("hidden").linear.bias)
    assert loaded.threshold_for(0.1) == 0.9
    with pytest.raises(BundleError, match="lowest is 30.0%"):
        loaded.threshold_for(0.1, "hidden")
    dec = build_decoder(llama, bundle=loaded, engine="eager", eos_token_ids=[2])
    paper = dec.generate([5, 6, 7], DecodeConfig(mode="clp", argmax=True, clp_features="hidden", max_new_tokens=12))
    default = dec.generate([5, 6, 7], DecodeConfig(mode="clp", argmax=True, max_new_tokens=12))
    assert paper.stats.tau == 4.0 and default.stats.tau == 1.0
    with pytest.raises(BundleError, match="no CLP that reads 'hidden\\+conf'"):
        MTPBundle.for_backbone(llama, k=4, base_model="tiny").clp_for("hidden+conf")
    one_clp = build_decoder(llama, bundle=MTPBundle.for_backbone(llama, k=4, base_model="tiny"), engine="eager")
    with pytest.raises(BundleError, match="no CLP that reads"):
        one_clp.generate([5], DecodeConfig(mode="verify", adaptive=True, clp_features="hidden+conf"))
    with pytest.raises(BundleError, match="unknown CLP features 'tokens'"):
        BundleConfig(k=4, hidden_size=32, vocab_size=96, base_model="tiny", clp_variants=["tokens"])


def test_clp_default_is_the_calibrated_safe_threshold(tmp_path, llama):
    """clp with no threshold: the calibrated threshold for CLP_DEFAULT_MAX_WRONG, else the most cautious one
    that still accepts something; --argmax is the paper's reading; a bundle with no table falls back to it."""
    import json

    from collocate.decode import CLP_DEFAULT_MAX_WRONG, DecodeConfig, DecodeError
    from collocate.engine import build_decoder

    b = MTPBundle.for_backbone(llama, k=4, base_model="tiny")
    b.save_pretrained(tmp_path)
    report = tmp_path / "train_report.json"

    def default_threshold(table):
        report.write_text(json.dumps({"clp": {"hidden": {"thresholds": table}}}))
        dec = build_decoder(llama, bundle=MTPBundle.from_pretrained(tmp_path), engine="eager")
        return dec.threshold_of(DecodeConfig(mode="clp")), dec.threshold_of(DecodeConfig(mode="clp", argmax=True))

    row = lambda wrong, accepted: {"wrong_share": wrong, "mean_accepted": accepted}  # noqa: E731
    safe = {"0.9": row(0.1, 0.3), "0.97": row(CLP_DEFAULT_MAX_WRONG, 0.1), "0.99": row(0.002, 0.01)}
    assert default_threshold(safe) == (0.97, None)
    unsafe = {"0.9": row(0.3, 0.3), "0.99": row(0.08, 0.01), "0.999": row(0.0, 0.0)}
    assert default_threshold(unsafe) == (0.99, None)  # nothing that safe: the most cautious that accepts
    report.unlink()
    assert build_decoder(llama, bundle=b, engine="eager").threshold_of(DecodeConfig(mode="clp")) is None
    for bad, message in ((dict(mode="clp", argmax=True, threshold=0.5), "--argmax"),
                         (dict(mode="verify", argmax=True), "--argmax"),
                         (dict(mode="ar", clp_features="hidden"), "--clp-features"),
                         (dict(mode="clp", clp_features="tokens"), "unknown CLP features")):
        with pytest.raises(DecodeError, match=message):
            DecodeConfig(**bad)


def test_bundle_files_that_parse_but_are_the_wrong_shape_give_one_line_errors(tmp_path, llama):
    """JSON of the wrong kind, fields of the wrong type or range, a report that is not a report, and NaN
    weights: each a BundleError naming the file and what is wrong, never a traceback or a silent load."""
    import json

    from safetensors.torch import load_file, save_file

    MTPBundle.for_backbone(llama, k=4, base_model="tiny").save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for raw, word in (([], "JSON object"), ({**good, "format_version": "3"}, "'format_version' must be int"),
                      ({**good, "k": "4"}, "'k' must be int"), ({**good, "k": 1}, "'k' must be at least 2"),
                      ({**good, "compete": 1}, "'compete' must be bool"), ({**good, "tree": {}}, "'tree' must be list"),
                      ({**good, "draft_vocab": -5}, "draft_vocab")):
        (tmp_path / "config.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match=word):
            MTPBundle.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(good))
    for report, word in (([], "JSON object"), ({"clp": []}, "training report"),
                         ({"heldout_head_accuracy": 7}, "training report")):
        (tmp_path / "train_report.json").write_text(json.dumps(report))
        with pytest.raises(BundleError, match=word):
            MTPBundle.from_pretrained(tmp_path)
    (tmp_path / "train_report.json").unlink()
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(BundleError, match="NaN"):
        MTPBundle.from_pretrained(tmp_path)
