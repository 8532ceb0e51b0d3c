"""The whole training run, stage after stage, each resumable: data, features, heads, policies."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..bundle import MTPBundle
from ..clp import CLP_FEATURES
from ..draft import MAX_TREE, best_paths
from ..block import BlockConfig, check_taps
from .answers import generate_answers, heldout_overlap, import_answers, read_shard, shard_answers, write_manifest
from .block import block_policy_data, train_block
from .common import is_main, say, write_atomic
from .config import TrainConfig
from .features import shard_features
from .heads import train_heads
from .policies import train_policies

OVERLAP_WARNING = 0.05  # share of held-out answer pieces found in training answers past which train warns


def run_training(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator

    from ..zoo import load_backbone

    if cfg.deterministic:  # before the first CUDA matmul: cuBLAS reads the variable when it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no such kernel warns, once
    accel = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    run = Path(cfg.out) / "work"
    device = accel.device
    # bf16 everywhere: CPUs with AVX512-BF16/AMX run it several times faster than float32
    if cfg.device_map and accel.num_processes > 1:
        raise ValueError("--device-map spreads one backbone over the GPUs in one process; launch one process, "
                         "not several")
    backbone = load_backbone(cfg.model, dtype=torch.bfloat16, device=device, device_map=cfg.device_map)
    model, tokenizer = backbone
    report = {"config": asdict(cfg), "device": device_name(device), "processes": accel.num_processes, "stages": {}}
    start = starting_drafter(cfg, model, tokenizer) if cfg.init_from else None  # (checked before anything is written)
    run.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    (import_answers if cfg.answers_file else generate_answers)(model, tokenizer, cfg, run)
    accel.wait_for_everyone()
    manifest = write_manifest(cfg, run)
    report["stages"]["data"] = {"seconds": add_stage_time(run, "data", time.perf_counter() - t0),
                                "samples": manifest["samples"],
                                "answer_tokens": manifest["answer_tokens"],
                                **({"imported": manifest["imported"]} if "imported" in manifest else {})}
    say(f"data: {manifest['samples']} answers, {manifest['answer_tokens']} tokens")
    if cfg.only == "data":
        return report

    held = list(range(cfg.n_shards - cfg.heldout_shards, cfg.n_shards))
    train_ids = [i for i in range(cfg.n_shards) if i not in held]
    if cfg.train_samples:
        train_ids = train_ids[: max(1, math.ceil(cfg.train_samples / cfg.shard_size))]
    report["train_shards"] = len(train_ids)
    block = cfg.drafter == "block"  # (it reads several layers: computed on the fly, no features stage)
    if not block:
        t0 = time.perf_counter()
        for i in tqdm(range(cfg.n_shards), desc="features", unit="shard", disable=not is_main()):
            if i % accel.num_processes == accel.process_index:
                shard_features(model, run, i, cfg.k, cache=cfg.cache_hidden)
        accel.wait_for_everyone()
        report["stages"]["features"] = {"seconds": add_stage_time(run, "features", time.perf_counter() - t0)}
    if cfg.only == "features":
        return report

    torch.manual_seed(cfg.seed)  # the drafter's initial weights: a run is repeatable, seed by seed
    bundle = MTPBundle.for_backbone(model, k=cfg.k, base_model=cfg.model, has_gates=cfg.gates,
                                    compete=cfg.compete, clp_features=cfg.clp_features, drafter=cfg.drafter,
                                    clp_variants=[f for f in CLP_FEATURES if f != cfg.clp_features],
                                    draft_vocab=cfg.draft_vocab,
                                    block=block_config(model, tokenizer, cfg).as_dict() if block else {}).to(device)
    if cfg.draft_vocab:
        bundle.draft_ids.copy_(most_used(model, run, train_ids, cfg))
    if block:
        bundle.heads.init_from(model, layers=cfg.block_init == "backbone")
    if start is not None:  # (--init-from: the drafter and its draft vocabulary as they were trained)
        bundle.heads.load_state_dict(start.heads.state_dict())
        bundle.draft_ids.copy_(start.draft_ids)
        report["init_from"] = cfg.init_from
    t0 = time.perf_counter()
    train = train_block if block else train_heads
    report["stages"]["heads"] = {**train(model, bundle, cfg, run, train_ids, accel)}
    report["stages"]["heads"]["seconds"] = add_stage_time(run, "heads", time.perf_counter() - t0)
    if accel.is_main_process:
        bundle.heads.eval()
        t0 = time.perf_counter()
        report.update(train_policies(model, bundle, cfg, run, train_ids, held,
                                     outputs=block_policy_data if block else None))
        bundle.config.tree = report.get("heldout_paths") or [list(p) for p in best_paths(bundle.rank_probs(), MAX_TREE)]
        if cfg.draft_vocab:
            report["draft_vocab_coverage"] = vocab_coverage(model, run, held, bundle.draft_ids, cfg)
        report["stages"]["policies"] = {"seconds": add_stage_time(run, "policies", time.perf_counter() - t0)}
        report["heldout_overlap"] = overlap = heldout_overlap(shard_answers(run, train_ids), shard_answers(run, held))
        if overlap["pieces_seen"] > OVERLAP_WARNING:
            say(f"warning: {overlap['pieces_seen']:.0%} of the held-out answers' 16-token pieces are in the training "
                "answers, so held-out accuracy overstates what the heads do on new prompts (near-copies in the "
                "prompts? bench/heldout_overlap.py)")
        report["params"] = bundle.param_counts()
        bundle.to("cpu").save_pretrained(cfg.out)
        write_atomic(Path(cfg.out) / "train_report.json", json.dumps(report, indent=1))
        say(f"wrote {cfg.out}: heads held-out top-1 " + ", ".join(
            f"{o} {v['top1']:.1%}" for o, v in report["heldout_head_accuracy"].items()))
    accel.wait_for_everyone()
    return report


def token_counts(model, run: Path, ids: list[int], cfg: TrainConfig) -> torch.Tensor:
    """How often each token is an answer token in these shards."""
    counts = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.long)
    for i in ids:
        t = torch.tensor([tok for seq, plen in read_shard(run, i) for tok in seq[plen:]], dtype=torch.long)
        counts += torch.bincount(t, minlength=len(counts))
    return counts


def block_config(model, tokenizer, cfg: TrainConfig) -> BlockConfig:
    """The block drafter's sizes from the backbone and the options; its mask token an embedding row past
    the tokenizer's tokens where the table has one (Qwen2.5 pads its table: 151,665 tokens, 151,936 rows)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    mask = len(tokenizer) if tokenizer is not None and len(tokenizer) < vocab else vocab - 1
    c = BlockConfig.for_backbone(model, layers=cfg.block_layers, block_size=cfg.k,
                                 intermediate_size=cfg.block_mlp or None, kv_heads=cfg.block_kv_heads or None,
                                 mask_token_id=mask, token_cond=cfg.block_tc)
    if cfg.block_taps:
        check_taps(cfg.block_taps, model.config.num_hidden_layers)
        c.taps = sorted(set(cfg.block_taps))
    return c


def starting_drafter(cfg: TrainConfig, model, tokenizer) -> MTPBundle:
    """--init-from's bundle, checked: trained on this very backbone, with the drafter this run trains (type, k,
    draft vocabulary size, block sizes). Only its drafter and draft vocabulary are taken; CLP and tree train anew."""
    old = MTPBundle.from_pretrained(cfg.init_from, backbone=model, backbone_name="this run's backbone")
    mine = {"drafter": cfg.drafter, "k": cfg.k, "draft_vocab": cfg.draft_vocab,
            "block": block_config(model, tokenizer, cfg).as_dict() if cfg.drafter == "block" else {}}
    theirs = {"drafter": old.config.drafter, "k": old.config.k, "draft_vocab": old.config.draft_vocab,
              "block": old.config.block}
    if theirs != mine:
        diff = "; ".join(f"{k} {theirs[k]} (this run: {mine[k]})" for k in mine if theirs[k] != mine[k])
        raise ValueError(f"--init-from {cfg.init_from}: its drafter is not this run's: {diff}")
    return old


def most_used(model, run: Path, ids: list[int], cfg: TrainConfig) -> torch.Tensor:
    """The draft vocabulary: the cfg.draft_vocab tokens the training answers use most, most used first."""
    return token_counts(model, run, ids, cfg).topk(cfg.draft_vocab).indices


def vocab_coverage(model, run: Path, held: list[int], draft_ids: torch.Tensor, cfg: TrainConfig) -> float:
    """Share of held-out answer tokens inside the draft vocabulary (a token outside it is never drafted)."""
    counts = token_counts(model, run, held, cfg)
    return counts[draft_ids.cpu()].sum().item() / max(counts.sum().item(), 1)


def add_stage_time(run: Path, stage: str, seconds: float) -> float:
    """Wall time of a stage summed over every (resumed) run of it, kept in work/stage_seconds.json."""
    path = run / "stage_seconds.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = times.get(stage, 0.0) + seconds
    if is_main():
        write_atomic(path, json.dumps(times, indent=1))
    return times[stage]


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
