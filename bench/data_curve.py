"""Held-out head accuracy against the number of training answers, from the train reports of bundles trained
on one data set with `collocate train --train-samples N` (the same answers, the same held-out shards).

    python bench/data_curve.py runs/q15-4096 runs/q15-8192 runs/q15-16384 --out bench/results/.../curve-q15

Each argument is a run folder (its train_report.json) or a report file. Writes OUT.json (a point per run:
drafter, k, training answers, held-out top-1 and top-5 per offset, and how much of the held-out answers
the training answers hold, where the report says) and OUT.png (top-1 per offset against
training answers, a line per offset and drafter). Refuses reports whose held-out sets differ.
"""
import argparse
import json
from dataclasses import fields
from pathlib import Path

from collocate.train.config import TrainConfig

# what fixes the answers (a resumed run must keep them too), and which of them are held out
SAME_HELDOUT = tuple(f.name for f in fields(TrainConfig) if f.metadata["data"]) + ("heldout_shards",)


def read_report(path: str) -> dict:
    p = Path(path)
    return json.loads((p / "train_report.json" if p.is_dir() else p).read_text())


def point(name: str, report: dict) -> dict:
    cfg = report["config"]
    held = report["heldout_head_accuracy"]
    return {"run": name, "drafter": cfg.get("drafter") or "heads", "k": cfg["k"],
            "draft_vocab": cfg.get("draft_vocab") or 0, "epochs": cfg["epochs"],
            "train_answers": report["train_shards"] * cfg["shard_size"],
            "heldout_top1": {o: v["top1"] for o, v in held.items() if o != "+1"},
            "heldout_top5": {o: v.get("top5") for o, v in held.items() if o != "+1"},
            "heldout_overlap": report.get("heldout_overlap")}  # (reports before it have none)


def check_same_heldout(reports: dict[str, dict]) -> dict:
    """The settings that fix the held-out answers, equal across every report (else a ValueError)."""
    first_name, first = next(iter(reports.items()))
    want = {k: first["config"].get(k) for k in SAME_HELDOUT}
    for name, r in reports.items():
        got = {k: r["config"].get(k) for k in SAME_HELDOUT}
        if got != want:
            diff = {k: (want[k], got[k]) for k in SAME_HELDOUT if want[k] != got[k]}
            raise ValueError(f"{name} and {first_name} were not held out on the same answers: {diff}")
    return want


def plot(points: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(f"{p['drafter']} k={p['k']}", []).append(p)
    for label, ps in groups.items():
        ps.sort(key=lambda p: p["train_answers"])
        for offset in ps[0]["heldout_top1"]:
            ax.plot([p["train_answers"] for p in ps], [100 * p["heldout_top1"][offset] for p in ps], marker="o",
                    label=f"{label} {offset}")
    ax.set(xscale="log", xlabel="training answers", ylabel="held-out top-1 (%)", title=title)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders or train_report.json files")
    ap.add_argument("--out", required=True, help="output path without extension: OUT.json and OUT.png")
    args = ap.parse_args(argv)
    reports = {Path(r).stem if Path(r).is_file() else Path(r).name: read_report(r) for r in args.runs}
    data = check_same_heldout(reports)
    points = sorted((point(n, r) for n, r in reports.items()),
                    key=lambda p: (p["drafter"], p["k"], p["train_answers"]))
    doc = {"data": data, "heldout_answers": data["heldout_shards"] * data["shard_size"], "points": points}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plot(points, f"{Path(str(data['model'])).name}: held-out accuracy against answers", out.with_suffix(".png"))
    for p in points:
        print(f"{p['run']:24s} {p['drafter']:9s} k={p['k']} {p['train_answers']:6d} answers  " + "  ".join(
            f"{o} {100 * v:.1f}%" for o, v in p["heldout_top1"].items()))
    return doc


if __name__ == "__main__":
    main()
