"""The speed-quality frontier of one model: speedup against our `ar` on one axis, HumanEval pass@1, GSM8K
accuracy and the wrong share on the others; a curve per method across its thresholds, `ar` and the
lossless modes as points.

    collocate bench --model M --heads B --suite humaneval,gsm8k,mtbench --n 164 --max-new-tokens 512 \
        --modes ar,verify-t32,clp,clp@0.9,clp@0.99,gate@0.5,gate@0.9,compete@0.5 --out runs/frontier-M
    python bench/frontier.py runs/frontier-M [more bench folders] --out bench/results/.../frontier-M

Every row of one frontier must come from bench runs that share their `ar` (the same run, or runs of the
same prompts, engine and machine): speedups are against the `ar` of the run each row comes from.
"""
import argparse
import json
import re
from pathlib import Path

METRICS = (("humaneval_pass1", "HumanEval pass@1"), ("gsm8k_acc", "GSM8K accuracy"),
           ("wrong_share", "wrong head tokens"))


def method_of(label: str) -> tuple[str, float | None]:
    """'clp@0.9' -> ('clp', 0.9); 'verify-t32' -> ('verify-t32', None)."""
    name, _, thr = label.partition("@")
    return name, float(thr) if thr else None


def collect(folders: list[str]) -> list[dict]:
    rows = []
    for folder in folders:
        doc = json.loads((Path(folder) / "results.json").read_text())
        for label, s in doc["summary"].items():
            method, threshold = method_of(label)
            rows.append({"label": label, "method": method, "threshold": threshold, "run": folder,
                         "speedup": s.get("speedup") or 1.0, "tau": s["tau"], "tok_per_s": s["tok_per_s"],
                         "prompts": s["prompts"], "exact_match": s.get("exact_match"),
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
                    ax.annotate(f"{r['threshold']:g}", (r["speedup"], r[key]), fontsize=7)
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
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.json and PREFIX.png")
    ap.add_argument("--title", help="plot title (default: the first run's model)")
    args = ap.parse_args()
    rows = collect(args.runs)
    first = json.loads((Path(args.runs[0]) / "results.json").read_text())
    env = first["environment"]
    title = args.title or f"{Path(env['model']).name} on {env['device']}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"title": title, "environment": env, "config": first["config"], "runs": args.runs, "points": rows}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(rows, title, out.with_suffix(".png"))
    for r in rows:
        scores = "  ".join(f"{name} {r[k]:.0%}" for k, name in METRICS if r[k] is not None)
        print(f"{r['label']:<16} {r['speedup']:.2f}x  tau {r['tau']:.2f}  {scores}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
