"""The issue's GPU table for one model, from the three bench runs of `bench/gpu/session.sh bench MODEL`.

    python bench/gpu_table.py bench/results/gpu-2026-11-28 qwen2.5-coder-1.5b

bench-MODEL-k4 (our modes with the k=4 bundle), bench-MODEL-k2 (clp with the k=2 bundle) and
bench-MODEL-hf (our ar against HF generate, eager and static cache, on fewer prompts: HF's static
cache recompiles at every new prompt length, so it is slow to run). Speedups against HF static chain
two ratios: mode / our ar (its own run) times our ar / HF static (the hf run), the latter from the median
per-prompt tok/s, so that the one call in which HF compiles for a new length does not decide it (the
per-prompt table under the main one shows every call).
"""
import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("row", "prompts", "tok/s", "vs our ar", "vs HF static", "tau", "head acc +2/+3/+4", "rep-4", "Δrep-4",
           "exact vs ar", "divergences at near-tie", "wrong head tokens", "GSM8K", "HumanEval")
LABELS = {"ar": "ours `ar`", "clp": "`clp`", "gate": "`gate`", "compete": "`compete`", "verify": "`verify` (fixed)",
          "verify-adaptive": "`verify` (adaptive)", "verify-c3": "`verify --candidates 3`",
          "verify-c5": "`verify --candidates 5`", "hf": "HF `generate`, eager", "hf-static": "HF `generate`, static cache"}


def pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def num(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def row(label, s, vs_static, k):
    acc = " / ".join("-" if a is None else f"{100 * a:.0f}" for a in s.get("head_accuracy") or []) or "-"
    div = s.get("divergences")
    near = f"{s['divergences_at_near_tie']}/{div}" if div else "-"
    return [label + (f" (k={k})" if k else ""), str(s["prompts"]), num(s["tok_per_s"], ".0f"),
            num(s.get("speedup"), ".2f", "x") if "speedup" in s else "-", num(vs_static, ".2f", "x"),
            num(s["tau"]), acc + ("%" if acc != "-" else ""), num(s["rep4"], ".3f"), num(s.get("delta_rep4"), "+.3f"),
            pct(s.get("exact_match")), near, pct(s.get("wrong_share")), pct(s.get("gsm8k_acc")), pct(s.get("humaneval_pass1"))]


def table(root: Path, model: str) -> str:
    def load(tag):  # a run that did not happen is left out of the table
        path = root / f"bench-{model}-{tag}" / "results.json"
        return json.loads(path.read_text()) if path.exists() else None

    k4, k2, hf = load("k4"), load("k2"), load("hf")
    hs = hf["summary"] if hf else {}
    static = median_speed(hf, "hf-static") if "hf-static" in hs else None
    ar_over_static = median_speed(hf, "ar") / static if static else None
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    rows = []
    for name in ("hf", "hf-static"):
        if name in hs:
            rows.append(row(LABELS[name], hs[name], median_speed(hf, name) / static if static else None, None))
    ours = k4 or hf
    if ours is None:
        raise SystemExit(f"no bench-{model}-k4 or bench-{model}-hf under {root}")
    for name, s in (k4 or {"summary": {"ar": hs["ar"]}})["summary"].items():
        k = 4 if name != "ar" else None
        speed = s.get("speedup", 1.0)
        rows.append(row(LABELS.get(name, name), s, speed * ar_over_static if ar_over_static else None, k))
        if name == "clp" and k2:
            s2 = k2["summary"]["clp"]
            rows.append(row(LABELS["clp"], s2, s2["speedup"] * ar_over_static if ar_over_static else None, 2))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    env = ours["environment"]
    head = (f"{env['model']} on {env['device']}, {env['dtype']}, torch {env['torch']}, engine {env['engine']}, "
            f"{ours['config']['max_new_tokens']} new tokens, {env['date']}")
    if hf:
        head += (f". HF rows and the 'vs HF static' ratio: the median per-prompt tok/s of our ar "
                 f"({median_speed(hf, 'ar'):.0f}) against HF static's ({static:.0f}) on the same {hs['ar']['prompts']} "
                 "prompts; the tok/s column is the mean, compile calls included")
    text = head + "\n\n" + "\n".join(lines) + "\n"
    return text + (per_prompt(hf) if hf else "")


def speeds(hf: dict, mode: str) -> list[float]:
    return [r["new_tokens"] / r["seconds"] for r in hf["per_prompt"][mode]]


def median_speed(hf: dict, mode: str) -> float:
    return statistics.median(speeds(hf, mode))


def per_prompt(hf: dict) -> str:
    """tok/s of each HF prompt: HF's static cache compiles at each new prompt length, so one slow call
    can dominate a mean; this shows the once-compiled speed next to it."""
    modes = [m for m in ("ar", "hf", "hf-static") if m in hf["per_prompt"]]
    lines = ["", "Per prompt, tok/s (new tokens / seconds):", "",
             "| prompt | new tokens | " + " | ".join(LABELS[m] for m in modes) + " | ours `ar` / HF static |",
             "|" + "---|" * (len(modes) + 3)]
    columns = [speeds(hf, m) for m in modes]
    for i, r in enumerate(hf["per_prompt"]["ar"]):
        tps = [col[i] for col in columns]
        ratio = (tps[0] / tps[modes.index("hf-static")]) if "hf-static" in modes else None
        lines.append(f"| {r['id']} | {r['new_tokens']} | " + " | ".join(f"{v:.0f}" for v in tps) +
                     f" | {num(ratio, '.2f', 'x')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    root, model = Path(sys.argv[1]), sys.argv[2]
    text = table(root, model)
    (root / f"table-{model}.md").write_text(text)
    print(text)
