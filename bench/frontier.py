"""The speed-quality frontier of one model: speedup against our `ar` on one axis, HumanEval pass@1, GSM8K
accuracy and the wrong share on the others; a curve per method across its thresholds, `ar` and the
lossless modes as points.

    collocate bench --model M --heads B --suite humaneval,gsm8k,mtbench --n 164 --max-new-tokens 512 \
        --modes ar,verify-t32,clp,clp@0.9,clp@0.99,gate@0.5,gate@0.9,compete@0.5 --out runs/frontier-M
    python bench/frontier.py runs/frontier-M [more bench folders] --out bench/results/.../frontier-M
    python bench/frontier.py --slim runs/frontier-M  # results.json.gz beside it: every answer's text, no token ids

A bench folder holds results.json or its slim results.json.gz. Every row of one frontier must come from
bench runs that share their `ar` (the same run, or runs of the same prompts, engine and machine):
speedups are against the `ar` of the run each row comes from; the first run's `ar` is the plotted one.
"""
import argparse
import gzip
import json
import re
from pathlib import Path

METRICS = (("humaneval_pass1", "HumanEval pass@1"), ("gsm8k_acc", "GSM8K accuracy"),
           ("wrong_share", "wrong head tokens"))


def method_of(label: str, summary: dict) -> tuple[str, float | None]:
    """'clp-hidden@0.9' -> ('clp-hidden', 0.9); 'clp-hidden@argmax' -> ('clp-hidden', 0.0): the argmax sits at
    the loose end of its curve; plain 'clp' is calibrated (for the wrong share its run asked, or the default
    of its time), at the threshold it ran at;
    'verify-t32' -> ('verify-t32', None)."""
    name, _, thr = label.partition("@")
    if thr == "argmax":
        return name, 0.0
    if not thr and name == "clp":
        return "clp (calibrated)", summary.get("threshold")
    return name, float(thr) if thr else None


def read_results(folder: str) -> dict:
    path = Path(folder) / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    return json.loads(gzip.decompress(path.with_suffix(".json.gz").read_bytes()))


def slim(folder: str) -> Path:
    """results.json -> results.json.gz without the token ids (the texts stay, so scores can be re-checked)."""
    doc = read_results(folder)
    for rows in doc["per_prompt"].values():
        for r in rows:
            r.pop("tokens", None)
    out = Path(folder) / "results.json.gz"
    out.write_bytes(gzip.compress(json.dumps(doc, indent=1).encode(), mtime=0))
    return out


def collect(folders: list[str]) -> list[dict]:
    rows = []
    for folder in folders:
        doc = read_results(folder)
        for label, s in doc["summary"].items():
            if label == "ar" and rows:  # every run has its own ar, each 1.00x: one point is enough
                continue
            method, threshold = method_of(label, s)
            rows.append({"label": label, "method": method, "threshold": threshold, "run": folder,
                         "speedup": s.get("speedup") or 1.0, "tau": s["tau"], "tok_per_s": s["tok_per_s"],
                         "prompts": s["prompts"], "exact_match": s.get("exact_match"), "max_wrong": s.get("max_wrong"),
                         **{k: s.get(k) for k, _ in METRICS}})
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    methods = sorted({r["method"] for r in rows})
    color = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}  # one colour per method on every panel
    for ax, (key, name) in zip(axes, METRICS):
        for method in methods:
            pts = sorted((r for r in rows if r["method"] == method and r[key] is not None),
                         key=lambda r: (r["threshold"] is None, r["threshold"] or 0))
            if not pts:
                continue
            xs, ys = [r["speedup"] for r in pts], [r[key] for r in pts]
            style = "o-" if len(pts) > 1 else "s"
            ax.plot(xs, ys, style, label=method, color=color[method])
            for r in pts:
                if r["threshold"] is not None:
                    note = "argmax" if r["label"].endswith("@argmax") else f"{r['threshold']:g}"
                    if r.get("max_wrong"):
                        note += f" (<= {r['max_wrong']:.0%} wrong)"
                    ax.annotate(note, (r["speedup"], r[key]), fontsize=7)
        ax.set(xlabel="speedup vs our ar (tok/s)", ylabel=name, ylim=(-0.03, 1.03))
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="collocate bench output folders")
    ap.add_argument("--out", help="path prefix: writes PREFIX.json and PREFIX.png")
    ap.add_argument("--title", help="plot title (default: the first run's model)")
    ap.add_argument("--slim", action="store_true", help="only write each run's results.json.gz")
    args = ap.parse_args()
    if args.slim:
        for folder in args.runs:
            print(slim(folder))
        return 0
    if not args.out:
        ap.error("--out is required (or --slim)")
    rows = collect(args.runs)
    first = read_results(args.runs[0])
    env = first["environment"]
    title = args.title or f"{Path(env['model']).name} on {env['device']}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"title": title, "environment": env, "config": first["config"], "runs": args.runs, "points": rows}
    out.parent.joinpath(out.name + ".json").write_text(json.dumps(doc, indent=1) + "\n")  # (a prefix may hold dots)
    plot(rows, title, out.parent / (out.name + ".png"))
    for r in rows:
        scores = "  ".join(f"{name} {r[k]:.0%}" for k, name in METRICS if r[k] is not None)
        print(f"{r['label']:<22} {r['speedup']:.2f}x  tau {r['tau']:.2f}  {scores}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
