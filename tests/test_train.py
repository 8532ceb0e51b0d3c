import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from collocate.bundle import BundleError, MTPBundle
from collocate.train import TrainConfig, run_training
from collocate.train.policies import PolicyData, train_clp, train_gates
from conftest import bench_script, save_tiny, write_prompts

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp, model, prompts, out="run", **kw):
    base = dict(model=model, out=str(tmp / out), k=3, samples=24, shard_size=6, gen_batch=6, max_new_tokens=24,
                epochs=3, batch=64, lr=3e-3, prompts_file=prompts, chat=False, clp_epochs=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    model = save_tiny(tmp / "tiny")
    prompts = write_prompts(tmp / "p.jsonl", 40)
    cfg = tiny_cfg(tmp, model, prompts)
    return tmp, cfg, run_training(cfg)


def test_training_loss_falls_and_report_is_complete(trained):
    tmp, cfg, report = trained
    hist = report["stages"]["heads"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["last_loss"] < hist[0]["first_loss"]
    assert set(report["heldout_head_accuracy"]) == {"+2", "+3"}
    for acc in report["heldout_head_accuracy"].values():  # what --tree chooses from
        ranks = acc["rank_probs"]
        assert len(ranks) == 10 and ranks[0] == pytest.approx(acc["top1"]) and sum(ranks[:5]) == pytest.approx(acc["top5"])
    assert set(report["clp"]) == {"hidden", "hidden+conf"}
    for variant in report["clp"].values():
        assert len(variant["confusion"]) == cfg.k and "0.95" in variant["thresholds"]
    assert (Path(cfg.out) / "train_report.json").exists()
    assert report["stages"]["data"]["samples"] == cfg.samples
    assert set(report["heldout_overlap"]) == {"pieces_seen", "answers_half_seen"}  # (bench/heldout_overlap.py tests it)
    assert all(0 <= v <= 1 for v in report["heldout_overlap"].values())


def test_trained_bundle_refuses_other_backbone(trained, tmp_path):
    from collocate.zoo import load_backbone

    tmp, cfg, _ = trained
    own, _ = load_backbone(cfg.model)
    bundle = MTPBundle.from_pretrained(cfg.out, backbone=own)
    # every CLP variant travels in the bundle, each with its held-out table; hidden+conf is the default
    assert bundle.clp_for().features == "hidden+conf" and bundle.clp_for("hidden").features == "hidden"
    assert bundle.calibration("hidden") and bundle.calibration() != bundle.calibration("hidden")
    other, _ = load_backbone(save_tiny(tmp_path / "other", seed=7))
    with pytest.raises(BundleError, match="LM-head weights differ"):
        MTPBundle.from_pretrained(cfg.out, backbone=other)


def test_clp_labels_match_slow_reference():
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(500, 4, generator=g) < 0.6
    data = PolicyData(torch.zeros(500, 8), torch.zeros(500, 4), correct, correct, torch.ones(500, 4, dtype=torch.bool))
    for first in (0, 1):
        slow = []
        for row in correct.tolist():
            n = 0
            for ok in row[first:]:
                if not ok:
                    break
                n += 1
            slow.append(n)
        assert data.clp_labels(first).tolist() == slow


def test_clp_and_gates_learn_from_the_same_features(llama):
    """A synthetic task where head j is right iff hidden[j] > 0: both policies must beat chance."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4000, 32, generator=g)
    correct = h[:, :3] > 0
    data = PolicyData(h, torch.rand(4000, 3, generator=g), correct, correct, torch.ones(4000, 3, dtype=torch.bool))
    bundle = MTPBundle.for_backbone(llama, k=4, base_model="tiny", has_gates=True)
    cfg = TrainConfig(model="tiny", out="unused", k=4, clp_epochs=30)
    clp, gates = train_clp(data, bundle, "hidden", cfg), train_gates(data, bundle, cfg)
    labels = data.clp_labels(0)
    with torch.no_grad():
        clp_acc = (clp(h).argmax(-1) == labels).float().mean().item()
        gate_acc = ((gates(h) > 0) == correct).float().mean().item()
    majority = torch.bincount(labels).max().item() / len(labels)
    assert clp_acc > majority + 0.15
    assert gate_acc > 0.9


def shards(run):
    return {p.name: load_file(str(p)) for p in sorted((Path(run) / "work" / "data").glob("shard-*.safetensors"))}


def assert_same_shards(a: dict, b: dict) -> None:
    """Two sets of answer shards (as `shards` reads them) equal, tensor for tensor."""
    assert list(a) == list(b)
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        assert all(torch.equal(a[name][key], b[name][key]) for key in a[name]), name


def test_data_stage_resumes_after_kill_with_exactly_the_same_samples(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 60)
    args = ["--model", model, "--k", "3", "--samples", "48", "--shard-size", "4", "--gen-batch", "4",
            "--max-new-tokens", "160", "--prompts", prompts, "--no-chat", "--only", "data"]
    cmd = [sys.executable, "-m", "collocate.cli", "train", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "work" / "data").glob("shard-*.safetensors"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(shards(killed))
    assert 2 <= partial < 12, f"kill landed outside the data stage ({partial} shards)"
    subprocess.run(cmd + ["--out", str(killed)], env=env, check=True, capture_output=True)
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    a, b = shards(killed), shards(tmp_path / "whole")
    assert len(a) == 12 and set(a["shard-00000.safetensors"]) == {"tokens", "offsets", "prompt_lens"}
    assert_same_shards(a, b)
    assert not list((killed / "work" / "data").glob("*.tmp*"))


def test_answers_made_elsewhere_are_the_runs_own(tmp_path):
    """--answers: the backbone's greedy answers written elsewhere (as vLLM gives them: prompt_token_ids and
    token_ids) make the very shards the data stage generates, and a drafter trains on them; texts read too.
    A line that cannot be read, ids past the vocabulary, another model's answers and too few lines are
    one-line errors that write no data."""
    from collocate.train.answers import read_shard

    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    run_training(tiny_cfg(tmp_path, model, prompts, out="own", samples=12, only="data"))
    rows = [r for i in range(2) for r in read_shard(tmp_path / "own" / "work", i)]
    vllm = tmp_path / "vllm.jsonl"
    vllm.write_text("".join(json.dumps({"prompt_token_ids": s[:p], "token_ids": s[p:], "text": "..."}) + "\n"
                            for s, p in rows))
    report = run_training(tiny_cfg(tmp_path, model, None, out="imp", samples=12, answers_file=str(vllm)))
    assert_same_shards(shards(tmp_path / "own"), shards(tmp_path / "imp"))
    imported = report["stages"]["data"]["imported"]
    assert imported["greedy_agreement"] > 0.9 and imported["lines_read"] == 12
    assert (tmp_path / "imp" / "model.safetensors").exists() and report["heldout_head_accuracy"]
    (tmp_path / "imp" / "work" / "data" / "shard-00001.safetensors").unlink()  # a kill, then the file changed
    vllm.write_text("".join(reversed(vllm.read_text().splitlines(keepends=True))))
    with pytest.raises(ValueError, match="not the ones"):
        run_training(tiny_cfg(tmp_path, model, None, out="imp", samples=12, answers_file=str(vllm), only="data"))
    assert len(shards(tmp_path / "imp")) == 1
    vllm.write_text("".join(reversed(vllm.read_text().splitlines(keepends=True))))

    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    texts = tmp_path / "texts.jsonl"  # (the tiny tokenizer reads no EOS back from text: the answers lose it)
    texts.write_text("".join(json.dumps({"prompt": tok.decode(s[:p]), "answer": tok.decode(s[p:], skip_special_tokens=True)})
                             + "\n" for s, p in rows))
    run_training(tiny_cfg(tmp_path, model, None, out="txt", samples=12, answers_file=str(texts), only="data"))
    assert [s[:p] for s, p in read_shard(tmp_path / "txt" / "work", 0)] == [s[:p] for s, p in rows[:6]]

    def refused(lines, match, samples=12):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(lines))
        with pytest.raises(ValueError, match=match):
            run_training(tiny_cfg(tmp_path, model, None, out="bad", samples=samples, answers_file=str(bad)))
        assert not (tmp_path / "bad" / "work" / "data").exists()

    good = vllm.read_text().splitlines(keepends=True)
    refused(good[:2] + ["{not json\n"] + good[3:], "bad.jsonl line 3: not JSON")
    refused(good[:1] + [json.dumps({"prompt_token_ids": [3, 4], "token_ids": [5, 96]}) + "\n"] + good[2:],
            r"line 2: 'token_ids' must be a list of token ids in 0\.\.95")
    refused(good[:1] + [json.dumps({"prompt_token_ids": [3, 4]}) + "\n"] + good[2:], "line 2: needs a prompt")
    rng = torch.Generator().manual_seed(0)
    refused([json.dumps({"prompt_token_ids": s[:p], "token_ids": torch.randint(3, 96, (24,), generator=rng).tolist()})
             + "\n" for s, p in rows], "not its greedy answers")
    refused(good[:5] + good[:5], r"only 5 usable answers .* 5 repeated prompt")
    with pytest.raises(ValueError, match="leave out --prompts"):
        tiny_cfg(tmp_path, model, prompts, answers_file=str(vllm))
    with pytest.raises(ValueError, match="no such file"):
        tiny_cfg(tmp_path, model, None, answers_file=str(tmp_path / "none.jsonl"))


def test_answers_from_a_server_are_the_runs_own(tmp_path, monkeypatch):
    """--answers-from: `collocate serve` of the backbone answers the data stage's prompts (sent as token ids,
    its texts tokenized back) with the answers HF generate gives; a server of another model is refused by the
    greedy check before a shard is written, and one that is not there is a one-line error."""
    import httpx

    from collocate.api import Generator
    from collocate.engine import build_decoder
    from collocate.serve import ServeConfig, build_app
    from conftest import Server, tiny_llama, tiny_tokenizer

    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    run_training(tiny_cfg(tmp_path, model, prompts, out="own", samples=12, only="data"))

    def answers_from(out, key=None, **other):
        backbone = tiny_llama(**other).to(torch.bfloat16)  # (the data stage's backbone is bf16 too)
        server = Server(build_app(Generator(build_decoder(backbone, tiny_tokenizer(), None, engine="eager",
                                                          eos_token_ids=[2])), config=ServeConfig(name="tiny", api_key=key)))
        try:
            run_training(tiny_cfg(tmp_path, model, prompts, out=out, samples=12, only="data",
                                  answers_from=server.url + "/v1"))
            return httpx.get(server.url + "/metrics").text
        finally:
            server.stop()

    metrics = answers_from("srv")
    assert 'collocate_requests_total{route="/v1/completions",status="200"} 12.0' in metrics
    assert_same_shards(shards(tmp_path / "own"), shards(tmp_path / "srv"))
    with pytest.raises(ValueError, match="not its greedy answers"):  # (untied: its greedy answers differ)
        answers_from("other", seed=1, tie=False)
    assert not shards(tmp_path / "other")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="answered 401"):  # a server that wants a key: OPENAI_API_KEY
        answers_from("keyed", key="sesame")
    monkeypatch.setenv("OPENAI_API_KEY", "sesame")
    answers_from("keyed", key="sesame")
    assert_same_shards(shards(tmp_path / "own"), shards(tmp_path / "keyed"))
    with pytest.raises(ValueError, match="cannot reach http://127.0.0.1:9/v1/models"):
        run_training(tiny_cfg(tmp_path, model, prompts, out="none", samples=12, answers_from="http://127.0.0.1:9/v1"))
    with pytest.raises(ValueError, match="base URL"):
        tiny_cfg(tmp_path, model, prompts, answers_from="127.0.0.1:8000")


def test_data_grows_keeping_its_answers(tmp_path):
    """More --samples on a run keeps its prompts and answer shards byte for byte and appends new prompts,
    also from another --prompts file; any other changed data setting, or a partial last shard, is refused."""
    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    run_training(tiny_cfg(tmp_path, model, prompts, samples=12, only="data"))
    before = shards(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "work" / "data" / "prompts.json").read_text())["ids"]
    report = run_training(tiny_cfg(tmp_path, model, prompts, samples=24, only="data"))
    after = shards(tmp_path / "run")
    grown = json.loads((tmp_path / "run" / "work" / "data" / "prompts.json").read_text())["ids"]
    assert report["stages"]["data"]["samples"] == 24 and len(after) == 4
    assert grown[:12] == saved and len({tuple(p) for p in grown}) == 24  # the old prompts first, no repeats
    assert_same_shards(before, {name: after[name] for name in before})
    more = write_prompts(tmp_path / "more.jsonl", 60, seed=1)  # a bigger pool in another file
    run_training(tiny_cfg(tmp_path, model, more, samples=36, only="data"))
    pooled = json.loads((tmp_path / "run" / "work" / "data" / "prompts.json").read_text())
    assert pooled["ids"][:24] == grown and pooled["settings"]["prompts_file"] == more
    assert_same_shards(after, {name: shards(tmp_path / "run")[name] for name in after})
    with pytest.raises(ValueError, match="other data settings"):
        run_training(tiny_cfg(tmp_path, model, prompts, samples=30, max_new_tokens=20, only="data"))
    run_training(tiny_cfg(tmp_path, model, prompts, samples=10, out="partial", only="data"))
    with pytest.raises(ValueError, match="whole number of shards"):
        run_training(tiny_cfg(tmp_path, model, prompts, samples=24, out="partial", only="data"))


def test_near_copies_of_a_prompt_taken_are_left_out(tmp_path):
    """A prompt that mostly repeats one taken (overlapping code windows did) gives a near-copy of its answer,
    and in a held-out shard inflates held-out accuracy: the data stage leaves it out, and keeps prompts that
    share less than half their 8-word pieces with those taken."""
    import random

    from collocate.train.answers import prepare_prompts
    from conftest import tiny_tokenizer

    rng = random.Random(0)
    words = lambda n: [f"w{rng.randrange(3, 96)}" for _ in range(n)]  # noqa: E731
    originals = [words(20) for _ in range(6)]
    near = [o[:1] + ["w3"] + o[2:] for o in originals]  # one word changed: 11 of 13 pieces seen
    half = [o[10:] + words(10) for o in originals]  # their last 10 words, then new ones: 3 of 13 seen
    texts = [t for pair in zip(originals, near) for t in pair] + half
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(t)}) + "\n" for t in texts))
    tok = tiny_tokenizer()
    cfg = TrainConfig(out=str(tmp_path / "run"), samples=12, prompts_file=str(path), chat=False)
    ids = prepare_prompts(cfg, tok, tmp_path / "run")
    assert [tok.decode(p).split() for p in ids] == originals + half
    with pytest.raises(ValueError, match="only 12 usable prompts"):
        prepare_prompts(dataclasses.replace(cfg, samples=13, out=str(tmp_path / "more")), tok, tmp_path / "more")


def test_heldout_overlap_counts_the_pieces_training_already_holds(tmp_path, monkeypatch):
    """bench/heldout_overlap.py: a held-out answer copied from the training answers is all seen, a new one
    not at all; only the first N training answers count."""
    import random

    from collocate.train.answers import write_shard

    rng = random.Random(0)
    answer = lambda: [rng.randrange(3, 96) for _ in range(40)]  # noqa: E731
    train = [answer() for _ in range(4)]
    (tmp_path / "data").mkdir()
    write_shard(tmp_path, 0, [[1]] * 2, train[:2])
    write_shard(tmp_path, 1, [[1]] * 2, train[2:])
    write_shard(tmp_path, 2, [[1, 2]] * 2, [train[3], answer()])  # held out: a copy of the 4th, a new one
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"settings": {}, "shards": [{}, {}, {}]}))
    out = tmp_path / "overlap.json"
    monkeypatch.setattr(sys, "argv", ["heldout_overlap", str(tmp_path), "--train", "2,4", "--out", str(out)])
    bench_script("heldout_overlap").main()
    first, all_four = json.loads(out.read_text())["points"]
    assert (first["heldout_pieces_seen"], first["heldout_answers_half_seen"]) == (0, 0)
    assert (all_four["heldout_pieces_seen"], all_four["heldout_answers_half_seen"]) == (0.5, 0.5)


def test_deterministic_training_gives_the_same_answers(tmp_path, trained):
    """--deterministic turns on torch's deterministic kernels for the run (on the CPU the answers were so
    already) and writes the very answers of a plain run."""
    tmp, single, _ = trained
    cfg = dataclasses.replace(single, out=str(tmp_path / "det"), deterministic=True, epochs=1)
    try:
        run_training(cfg)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same_shards(shards(cfg.out), shards(single.out))


def test_device_map_training_gives_the_same_answers(tmp_path, trained):
    """--device-map auto (a backbone spread over the GPUs by accelerate; here all of it on the CPU) runs
    every stage and writes the very answers of a plain run."""
    tmp, single, _ = trained
    cfg = dataclasses.replace(single, out=str(tmp_path / "mapped"), device_map="auto", epochs=1)
    report = run_training(cfg)
    assert report["stages"]["heads"]["steps"] > 0 and MTPBundle.from_pretrained(cfg.out).k == single.k
    assert_same_shards(shards(cfg.out), shards(single.out))


def test_data_parallel_training_with_accelerate(tmp_path, trained):
    """Two processes split the shards: the answers are the very same as one process wrote (greedy), the
    loss falls, and one bundle is written."""
    pytest.importorskip("accelerate")
    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "collocate.cli", "train", "--model", model,
           "--out", str(out), "--k", "3", "--samples", "24", "--shard-size", "6", "--gen-batch", "6",
           "--max-new-tokens", "24", "--epochs", "3", "--batch", "64", "--lr", "3e-3", "--prompts", prompts, "--no-chat"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["processes"] == 2
    hist = report["stages"]["heads"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    MTPBundle.from_pretrained(out)  # the same bundle format
    _, single, single_report = trained  # the same model, prompts and data settings, one process
    # --batch is the global batch: two processes take the single run's optimiser steps (give or take one
    # where a shard's even split leaves a position out), not half of them
    steps, single_steps = report["stages"]["heads"]["steps"], single_report["stages"]["heads"]["steps"]
    assert single_steps >= 9 and abs(steps - single_steps) <= 1, (steps, single_steps)
    mine = shards(out)
    assert len(mine) == 4
    assert_same_shards(mine, shards(single.out))


def test_kl_term_trains(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 30)
    report = run_training(tiny_cfg(tmp_path, model, prompts, samples=12, kl_weight=0.5, gates=False, epochs=2))
    hist = report["stages"]["heads"]["history"]
    assert all(h["loss"] == h["loss"] for h in hist) and hist[-1]["loss"] < hist[0]["loss"]  # finite, falling
    assert "gates" not in report and MTPBundle.from_pretrained(tmp_path / "run").gates is None


def test_token_conditioned_heads_train_and_decode_losslessly(tmp_path):
    """--drafter tc-shared --draft-vocab: the loss falls; the bundle keeps its drafter, vocabulary and a
    best-first tree; verify with its tree gives ar's tokens."""
    from collocate.decode import DecodeConfig
    from collocate.engine import load_decoder

    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 30)
    cfg = tiny_cfg(tmp_path, model, prompts, samples=12, k=4, drafter="tc-shared", draft_vocab=60, gates=False)
    report = run_training(cfg)
    hist = report["stages"]["heads"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] and 0.5 < report["draft_vocab_coverage"] <= 1
    bundle = MTPBundle.from_pretrained(cfg.out)
    assert bundle.config.drafter == "tc-shared" and len(bundle.draft_ids) == 60 and 1 <= len(bundle.config.tree) <= 64
    assert bundle.config.tree[0] == [0]
    dec = load_decoder(model, heads=cfg.out, engine="eager")
    ar = dec.generate([5, 9, 13], DecodeConfig(max_new_tokens=30)).tokens
    assert dec.generate([5, 9, 13], DecodeConfig(mode="verify", max_new_tokens=30, tree_size=12)).tokens == ar
    with pytest.raises(ValueError, match="independent heads"):
        tiny_cfg(tmp_path, model, prompts, drafter="tc-depth", compete=True)
    with pytest.raises(ValueError, match="token-conditioned drafters"):
        tiny_cfg(tmp_path, model, prompts, draft_vocab=100)


def test_static_cache_generation_gives_the_same_answers():
    """--gen-static pads every batch to one width for a one-time compile; the answers must not change."""
    from collocate.train.answers import generate_batch
    from conftest import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 9, 5, 12)]
    cfg = dict(model="tiny", out="unused", max_new_tokens=20, max_prompt_tokens=16)
    plain = generate_batch(model, tok, prompts, TrainConfig(**cfg), eos=[2])
    static = generate_batch(model, tok, prompts, TrainConfig(**cfg, gen_static=True), eos=[2])
    assert static == plain and all(len(a) > 0 for a in plain)


def test_smaller_k_reuses_wider_features(trained, tmp_path):
    """k=2 after k=3 on the same data slices the cached features; they equal a fresh k=2 pass."""
    import shutil

    from collocate.train.features import shard_features
    from collocate.zoo import load_backbone

    tmp, cfg, _ = trained
    model, _ = load_backbone(cfg.model, dtype=torch.bfloat16)  # as training loads it
    run = Path(cfg.out) / "work"
    reused = shard_features(None, run, 0, 2, cache=False)  # no model: it must come from the k=3 cache
    fresh_run = tmp_path / "work"
    shutil.copytree(run / "data", fresh_run / "data")
    fresh = shard_features(model, fresh_run, 0, 2, cache=False)
    assert reused.targets.shape[1] == 2
    assert torch.equal(reused.targets, fresh.targets)
    assert torch.equal(reused.hidden, fresh.hidden)


def test_cli_options_are_derived_from_the_config():
    """Every TrainConfig field is an option of `collocate train`, with the field's default."""
    from dataclasses import fields

    from collocate.cli import parser

    args = parser().parse_args(["train", "--out", "x"])
    cfg = TrainConfig(out="x")
    for f in fields(TrainConfig):
        assert getattr(args, f.name) == getattr(cfg, f.name), f.name
    args = parser().parse_args(["train", "--out", "x", "--no-gates", "--mix", "gsm,code", "--kl-weight", "0.5",
                                "--prompts", "p.jsonl", "--budget-minutes", "3", "--deterministic"])
    from collocate.train.config import from_args

    cfg = from_args(args)
    assert (cfg.gates, cfg.mix, cfg.kl_weight, cfg.prompts_file, cfg.budget_minutes) == (False, ("gsm", "code"), 0.5,
                                                                                         "p.jsonl", 3.0)
    assert cfg.deterministic and not TrainConfig(out="x").deterministic
    assert set(cfg.data_settings()) == {"model", "samples", "mix", "max_new_tokens", "max_prompt_tokens",
                                        "shard_size", "seed", "chat", "prompts_file"}


def test_data_curve_reads_runs_on_one_heldout_set(trained, tmp_path):
    """bench/data_curve.py: a bundle trained on the first answers only (--train-samples) sits beside the full
    one on the same held-out answers; a report held out on other answers is refused."""
    import shutil

    curve = bench_script("data_curve")
    tmp, cfg, report = trained
    few = tmp_path / "few"
    shutil.copytree(Path(cfg.out) / "work" / "data", few / "work" / "data")
    run_training(dataclasses.replace(cfg, out=str(few), train_samples=cfg.shard_size))
    doc = curve.main([cfg.out, str(few), "--out", str(tmp_path / "curve")])
    got = {p["run"]: p["train_answers"] for p in doc["points"]}
    assert got == {"few": cfg.shard_size, Path(cfg.out).name: (cfg.n_shards - cfg.heldout_shards) * cfg.shard_size}
    assert doc["heldout_answers"] == cfg.shard_size and (tmp_path / "curve.png").stat().st_size > 10_000
    overlap = {p["run"]: p["heldout_overlap"]["pieces_seen"] for p in doc["points"]}
    assert overlap["few"] <= overlap[Path(cfg.out).name]  # fewer training answers hold no more of the held-out ones
    other = json.loads((few / "train_report.json").read_text())
    other["config"]["heldout_shards"] = 2
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="not held out on the same answers"):
        curve.main([cfg.out, str(tmp_path / "other.json"), "--out", str(tmp_path / "bad")])


def test_layer_probe_trains_each_probe_on_one_heldout_set(trained, tmp_path):
    """bench/layer_probe.py on a trained run's answers: features of an earlier layer and the final one, the
    three probes trained alike, each loss falling, the fused one reading more."""
    probe = bench_script("layer_probe")
    tmp, cfg, _ = trained
    doc = probe.main(["--model", cfg.model, "--answers", str(Path(cfg.out) / "work"), "--train", "18",
                      "--heldout", "6", "--layers", "1", "--vocab", "40", "--epochs", "4",
                      "--probes", "final,final+block,fused,final-k2,final-kl", "--out", str(tmp_path / "probe.json")])
    results = json.loads((tmp_path / "probe.json").read_text())["results"]
    assert results.keys() == {"final", "final+block", "fused", "final-k2", "final-kl"}
    for r in doc["results"].values():
        assert r["history"][-1]["loss"] < r["history"][0]["loss"]
        assert all(0 <= a <= b <= 100 for a, b in zip(r["heldout_top1_+2_+3_+4"], r["heldout_top5_+2_+3_+4"]))
    params = {k: r["params"] for k, r in doc["results"].items()}
    assert params["final-k2"] < params["final"] == params["final-kl"] < params["final+block"] < params["fused"]
    assert len(results["final-k2"]["heldout_top1_+2_+3_+4"]) == 1  # k=2: a head for +2 only
    assert doc["train_positions"] > 0 and doc["heldout_positions"] > 0


def test_block_drafter_trains_resumes_and_decodes_losslessly(tmp_path):
    """--drafter block: the loss falls; the report has per-slot held-out accuracy with rank statistics, a
    best-first tree and the CLP's calibration; a run asked for more epochs resumes after the last one it
    finished; verify with the bundle's chain and tree gives ar's tokens on both engines."""
    from collocate.decode import DecodeConfig
    from collocate.engine import load_decoder

    model = save_tiny(tmp_path / "tiny")
    prompts = write_prompts(tmp_path / "p.jsonl", 30)
    cfg = tiny_cfg(tmp_path, model, prompts, samples=12, k=5, drafter="block", draft_vocab=60, epochs=1, anchors=8)
    first = run_training(cfg)
    again = run_training(dataclasses.replace(cfg, out=str(tmp_path / "again")))  # --seed fixes the initial weights
    assert again["stages"]["heads"]["history"][0]["first_loss"] == first["stages"]["heads"]["history"][0]["first_loss"]
    # --init-from: training goes on from a trained bundle (its drafter and draft vocabulary), checked before any
    # answer is made; a bundle of another drafter or another backbone stops it with nothing written
    # (from the bundle with its draft vocabulary in reverse order, which the answers never give, and on other
    # answers, --seed 1: against a fresh start on them, a lower first loss and the bundle's draft vocabulary)
    start = MTPBundle.from_pretrained(cfg.out)
    start.draft_ids.copy_(start.draft_ids.flip(0))
    start.save_pretrained(tmp_path / "start")
    fresh = run_training(dataclasses.replace(cfg, out=str(tmp_path / "fresh"), seed=1))
    warm = run_training(dataclasses.replace(cfg, out=str(tmp_path / "warm"), seed=1, init_from=str(tmp_path / "start")))
    assert warm["init_from"] == str(tmp_path / "start")
    assert warm["stages"]["heads"]["history"][0]["first_loss"] < fresh["stages"]["heads"]["history"][0]["first_loss"]
    ids = {name: MTPBundle.from_pretrained(tmp_path / name).draft_ids for name in ("start", "fresh", "warm")}
    assert torch.equal(ids["warm"], ids["start"]) and not torch.equal(ids["fresh"], ids["start"])
    other = save_tiny(tmp_path / "other", seed=1)
    for kw, error in ((dict(k=4), "its drafter is not this run's: k 5 \\(this run: 4\\)"),
                      (dict(model=other), "cannot run on this run's backbone")):
        with pytest.raises((ValueError, BundleError), match=error):
            run_training(dataclasses.replace(cfg, out=str(tmp_path / "refused"), init_from=cfg.out, **kw))
        assert not (tmp_path / "refused").exists()
    report = run_training(dataclasses.replace(cfg, epochs=3))
    hist = report["stages"]["heads"]["history"]
    assert len(hist) == 3 and hist[0] == first["stages"]["heads"]["history"][0] and hist[-1]["loss"] < hist[0]["loss"]
    quick = run_training(dataclasses.replace(cfg, out=str(tmp_path / "quick"), epochs=3, budget_minutes=1e-6,
                                             policy_positions=40))  # (the CLP's positions sampled: few answers')
    assert quick["clp"]["hidden"]["thresholds"]
    stopped = quick["stages"]["heads"]  # the budget is spent at once: the schedule ends after the first step
    assert (stopped["steps"], stopped["history"][-1]["stopped_after_steps"]) == (1, 1) and stopped["planned_steps"] >= 3
    assert run_training(dataclasses.replace(cfg, out=str(tmp_path / "quick"), epochs=3, budget_minutes=1e-6,
                                            policy_positions=40))["stages"]["heads"]["history"] == stopped["history"]
    held = report["heldout_head_accuracy"]
    assert list(held) == ["+2", "+3", "+4", "+5"] and all(len(v["rank_probs"]) == 10 for v in held.values())
    assert report["clp"]["hidden"]["thresholds"] and "features" not in report["stages"]
    bundle = MTPBundle.from_pretrained(cfg.out)
    best = max(range(10), key=held["+2"]["rank_probs"].__getitem__)  # the tree starts at +2's likeliest rank
    assert bundle.config.drafter == "block" and bundle.config.format_version == 4 and bundle.config.tree[0] == [best]
    assert bundle.heads.c.block_size == 5 and len(bundle.draft_ids) == 60 and not bundle.config.has_gates
    for engine in ("eager", "fast"):
        dec = load_decoder(model, heads=cfg.out, engine=engine)
        ar = dec.generate([5, 9, 13], DecodeConfig(max_new_tokens=30)).tokens
        for kw in (dict(), dict(tree_size=12)):
            assert dec.generate([5, 9, 13], DecodeConfig(mode="verify", max_new_tokens=30, **kw)).tokens == ar
    with pytest.raises(ValueError, match="shape a block drafter"):
        tiny_cfg(tmp_path, model, prompts, block_layers=3)
    with pytest.raises(ValueError, match="shape a block drafter"):
        tiny_cfg(tmp_path, model, prompts, block_init="backbone")
    with pytest.raises(ValueError, match="shape a block drafter"):
        tiny_cfg(tmp_path, model, prompts, block_tc=True)
    with pytest.raises(ValueError, match="independent heads"):
        tiny_cfg(tmp_path, model, prompts, drafter="block", compete=True)
