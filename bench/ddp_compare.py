"""Two training runs of the same data settings, one on 1 GPU and one on N (accelerate data parallelism):
are the answer shards byte-identical, and the held-out head accuracy equal within a point?

    python bench/ddp_compare.py runs/x-1gpu runs/x-2gpu > ddp.json

Prints one JSON document: per run its processes, stage seconds, answers/s and head-training positions/s;
shards equal or not (sha256 of each); held-out top-1 per offset and the largest difference in points.
"""
import hashlib
import json
import sys
from pathlib import Path


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


def main() -> int:
    one, many = (summary(Path(p)) for p in sys.argv[1:3])
    diff = max(abs(one["heldout_top1"][o] - many["heldout_top1"][o]) for o in one["heldout_top1"])
    doc = {"single": one, "parallel": many, "shards_identical": one["shards"] == many["shards"],
           "max_heldout_top1_difference_points": round(100 * diff, 2),
           "answers_speedup": many["answers_per_s"] / one["answers_per_s"]}
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
