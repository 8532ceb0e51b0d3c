"""Two trees' benches side by side (session.sh ab): per run, each mode's tok/s, speedup and median ms per
step, then each tree's mean over its runs.

    python bench/ab_table.py bench/results/gpu-2026-11-29c qwen2.5-coder-1.5b old new old2 new2 old3 new3 old4

Runs are folders ab-<tree><n>-NAME (ab-old-…, ab-new2-…; NAME: the model, or the bundle session.sh ab was given),
listed in the order they ran (default: by name); the modes are those the runs benched.
"""
import json
import re
import statistics
import sys
from pathlib import Path


def row(doc: dict, mode: str) -> dict:
    rows = doc["per_prompt"][mode]
    s = doc["summary"][mode]
    return {"tok_s": s["tok_per_s"], "speedup": s.get("speedup"), "tau": s["tau"],
            "ms_step": statistics.median(1000 * r["seconds"] / r["steps"] for r in rows)}


def main(folder: str, model: str, *order: str) -> None:
    runs = [Path(folder) / f"ab-{r}-{model}" for r in order] or sorted(Path(folder).glob(f"ab-*-{model}"))
    modes = list(json.loads((runs[0] / "results.json").read_text())["summary"])  # as the bench ran them, ar first
    print(f"# {model}: A/B of two trees on one GPU, one bundle\n")
    print("| run | " + " | ".join(f"{m} tok/s | {m} ms/step" + (f" | {m} speedup" if m != "ar" else "") for m in modes) + " |")
    print("|---" * (1 + 3 * len(modes) - 1) + "|")
    by_tree: dict[str, list[dict]] = {}
    for run in runs:
        doc = json.loads((run / "results.json").read_text())
        tree = re.match(r"ab-([a-z]+)", run.name).group(1)
        cells = {m: row(doc, m) for m in modes}
        by_tree.setdefault(tree, []).append(cells)
        print(f"| {run.name.removesuffix('-' + model)} | " + " | ".join(
            f"{c['tok_s']:.1f} | {c['ms_step']:.3f}" + (f" | {c['speedup']:.2f}x" if m != "ar" else "")
            for m, c in cells.items()) + " |")
    print("\nMean over each tree's runs:\n")
    for tree, cells in by_tree.items():
        mean = lambda m, k: statistics.mean(c[m][k] for c in cells)  # noqa: E731
        others = ", ".join(f"{m} {mean(m, 'speedup'):.2f}x ({mean(m, 'ms_step'):.3f} ms/step, tau {mean(m, 'tau'):.2f})"
                           for m in modes if m != "ar")
        print(f"- {tree} ({len(cells)} runs): ar {mean('ar', 'tok_s'):.1f} tok/s ({mean('ar', 'ms_step'):.3f} ms/step), "
              + others)


if __name__ == "__main__":
    main(*sys.argv[1:])
