"""Two training runs of the same data settings, one on 1 GPU and one on N (accelerate data parallelism):
are the answer shards byte-identical, and the held-out head accuracy equal within a point?

    python bench/ddp_compare.py runs/x-1gpu runs/x-2gpu > ddp.json

Prints one JSON document: per run its processes, stage seconds, answers/s and head-training positions/s;
shards equal or not (sha256 of each) and, where they differ, how: the same prompts in the same order or
not, how many answers are the same token for token, and where the others first part; held-out top-1 per
offset and the largest difference in points.
"""
import hashlib
import json
import statistics
import sys
from pathlib import Path

from collocate.train.answers import read_shard


def summary(run: Path) -> dict:
    report = json.loads((run / "train_report.json").read_text())
    stages = report["stages"]
    shards = sorted((run / "work" / "data").glob("shard-*.safetensors"))
    return {"run": str(run), "processes": report["processes"], "device": report["device"],
            "seconds": {k: round(v["seconds"], 1) for k, v in stages.items()},
            "answers_per_s": stages["data"]["samples"] / max(stages["data"]["seconds"], 1e-9),
            "answer_tokens_per_s": stages["data"]["answer_tokens"] / max(stages["data"]["seconds"], 1e-9),
            "head_steps": stages["heads"].get("steps"),
            "head_positions_per_s": head_positions(report) / max(stages["heads"]["seconds"], 1e-9),
            "heldout_top1": {o: v["top1"] for o, v in report["heldout_head_accuracy"].items()},
            "shards": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in shards}}


def head_positions(report: dict) -> int:
    """Positions the head training went through: optimiser steps times the global batch (--batch)."""
    cfg = report["config"]
    return report["stages"]["heads"]["steps"] * cfg["batch"] * cfg["grad_accum"]


def answers(run: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token lists of every shard, in shard order."""
    n = len(list((run / "work" / "data").glob("shard-*.safetensors")))
    return [(seq[:plen], seq[plen:]) for i in range(n) for seq, plen in read_shard(run / "work", i)]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def answer_agreement(one: Path, many: Path) -> dict:
    """How two runs' answers differ: the same prompts? the same answers? where do the others first part?"""
    a, b = answers(one), answers(many)
    same_prompts = len(a) == len(b) and all(p == q for (p, _), (q, _) in zip(a, b))
    parted = [first_difference(x, y) for (_, x), (_, y) in zip(a, b) if x != y]
    return {"answers": len(a), "answers_second": len(b), "same_prompts_in_order": same_prompts,
            "repeated_prompts_second": len(b) - len({tuple(p) for p, _ in b}),  # a resume repeats none
            "identical_answers": len(a) - len(parted) if same_prompts else None,
            "first_difference_token_median": statistics.median(parted) if same_prompts and parted else None,
            "answer_tokens_median": statistics.median(len(x) for _, x in a) if a else None}


def main() -> int:
    one, many = (summary(Path(p)) for p in sys.argv[1:3])
    diff = max(abs(one["heldout_top1"][o] - many["heldout_top1"][o]) for o in one["heldout_top1"])
    doc = {"single": one, "parallel": many, "shards_identical": one["shards"] == many["shards"],
           "answers": answer_agreement(Path(sys.argv[1]), Path(sys.argv[2])),
           "max_heldout_top1_difference_points": round(100 * diff, 2),
           "answers_speedup": many["answers_per_s"] / one["answers_per_s"]}
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
