"""Every mode in one process on the same prompts: the honest table.

    collocate bench --suite mtbench,gsm8k,humaneval --modes ar,clp,gate,verify --n 10 --out bench/results/x

Writes results.json (every prompt, every mode), results.md (one row per mode, the paper's numbers
beside it) and speed_quality.png. Speedups are against our own `ar` in the same run.
Mode names (options.from_spec): ar, clp, gate, compete, verify, verify-adaptive, verify-cN, verify-tN,
verify-tNdD (an N-node tree at most D deep); append `@T` to set a threshold, e.g. clp@0.8, or `@argmax` for
CLP's likeliest length (the paper's reading); clp-hidden, clp-hidden+conf pick one of the bundle's CLPs
(plain clp: its default; without @: the calibrated threshold). Beside them, hf (HF generate) and hf-static
(HF generate with a static cache). The decoding options given to the bench go to each mode that reads them.
"""
from __future__ import annotations

import functools
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from .decode import DecodeConfig, DecodeResult, DecodeStats
from .engine import load_decoder
from .metrics import SandboxUnavailable, first_divergence, gsm8k_correct, humaneval_pass, mean, rep_n
from .options import from_spec

# What the paper's abstract reports, for the table. It gives no per-suite numbers.
PAPER = {
    "clp": "1.20-1.29x (1.5B), 1.14-1.20x (7B); repetition < 0.02",
    "gate": "fails to accelerate (1.07x) or degrades (repetition > 0.5%)",
    "compete": "head competition: repetitive, incoherent output",
}


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    heads: str | None = None
    suites: tuple[str, ...] = ("mtbench", "gsm8k", "humaneval")
    modes: tuple[str, ...] = ("ar", "clp", "gate", "compete", "verify")
    n: int = 10
    max_new_tokens: int = 256
    out: str = "bench/results/latest"
    device: str = "auto"  # cuda where there is a GPU
    dtype: str = "auto"
    prompts_file: str | None = None
    near_tie_eps: float = 0.5
    engine: str = "auto"  # auto | eager | fast (see fast.py); auto: fast on CUDA
    max_len: int | None = None  # the fast engine's cache (None: the model's window where memory allows)
    options: dict = field(default_factory=dict)  # DecodeConfig fields, for every mode that reads them

    def __post_init__(self):
        self.max_new_tokens = self.options.setdefault("max_new_tokens", self.max_new_tokens)  # (one value, both places)


BASELINES = ("hf", "hf-static")  # HF generate, eager and with a static cache


def parse_mode(spec: str, default_threshold: float | None = None, **options) -> DecodeConfig:
    """A bench mode name as the DecodeConfig it runs (ValueError if unknown)."""
    return from_spec(spec, **{"threshold": default_threshold, **options})


def hf_generate(dec, ids: list[int], max_new_tokens: int, *, static: bool) -> DecodeResult:
    """HF `generate` as a baseline row, timed the same way as our modes."""
    model = dec.model
    x = torch.tensor([ids], device=dec.device)
    kwargs = {"cache_implementation": "static"} if static else {}
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(dec.eos), pad_token_id=sorted(dec.eos)[0], **kwargs)
    if dec.device.type == "cuda":
        torch.cuda.synchronize()
    tokens = out[0, len(ids):].tolist()
    stats = DecodeStats(new_tokens=len(tokens), steps=len(tokens), seconds=time.perf_counter() - start)
    return DecodeResult(tokens, dec.tokenizer.decode(tokens, skip_special_tokens=True), stats,
                        "eos" if tokens and tokens[-1] in dec.eos else "length")


def run_one(dec, label: str, cfg: DecodeConfig, ids: list[int]) -> DecodeResult:
    if label in BASELINES:
        return hf_generate(dec, ids, cfg.max_new_tokens, static=label == "hf-static")
    return dec.generate(ids, cfg)


@torch.inference_mode()
def top2_gap(dec, ids: list[int]) -> float:
    """The backbone's top-1 minus top-2 logit for the token after `ids` (a near-tie is a small gap)."""
    logits = dec.model(torch.tensor([ids], device=dec.device)).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def head_accuracy(result: DecodeResult, n_heads: int) -> list[float | None]:
    """Per offset (+2, +3, ...): how often the head's proposal equals the token that followed."""
    hits, total = [0] * n_heads, [0] * n_heads
    for base, heads in result.proposals:
        for j, t in enumerate(heads):
            pos = base + 1 + j
            if pos < len(result.tokens):
                total[j] += 1
                hits[j] += int(result.tokens[pos] == t)
    return [h / t if t else None for h, t in zip(hits, total)]


def score_prompt(dec, p: data.Prompt, r: DecodeResult, ref: DecodeResult | None, eps: float) -> dict:
    row = {"id": p.id, "tokens": r.tokens, "text": r.text, "finish": r.finish_reason, **asdict(r.stats),
           "tau": r.stats.tau, "rep": {n: rep_n(r.tokens, n) for n in (2, 3, 4)}}
    if ref is not None:
        div = first_divergence(ref.tokens, r.tokens)
        row.update(exact=div is None, first_divergence=div)
        if div is not None and div < len(ref.tokens):
            row["ar_gap_at_divergence"] = top2_gap(dec, p.ids + ref.tokens[:div])
            row["near_tie"] = row["ar_gap_at_divergence"] < eps
    if "final" in p.meta:
        row["gsm8k_correct"] = gsm8k_correct(r.text, p.meta["final"])
    if "entry_point" in p.meta:
        try:
            row["humaneval_pass"] = humaneval_pass(r.text, p.meta)
        except SandboxUnavailable as e:  # never run model-written code outside the sandbox: leave it unscored
            warn_once(f"collocate bench: HumanEval answers are not scored: {e}")
    return row


@functools.cache
def warn_once(message: str) -> None:
    print(message, file=sys.stderr)


def summarize(rows: list[dict], ref_rows: list[dict] | None, n_heads: int, accs: list[list]) -> dict:
    toks, secs = sum(r["new_tokens"] for r in rows), sum(r["seconds"] for r in rows)
    s = {"prompts": len(rows), "new_tokens": toks, "seconds": secs, "tok_per_s": toks / max(secs, 1e-9),
         "tau": toks / max(sum(r["steps"] for r in rows), 1),
         "ms_per_step": 1000 * secs / max(sum(r["steps"] for r in rows), 1),
         **{f"rep{n}": mean(r["rep"][n] for r in rows) for n in (2, 3, 4)}}
    prefill = sum(r["prefill_seconds"] for r in rows)
    if prefill:  # the prompt's pass and the steps after it, apart (HF generate's rows time only the whole)
        s["ms_per_prefill"] = 1000 * prefill / len(rows)
        s["ms_per_decode_step"] = 1000 * (secs - prefill) / max(sum(r["steps"] for r in rows) - len(rows), 1)
    checked = sum(r["head_checked"] for r in rows)
    s["wrong_share"] = sum(r["head_wrong"] for r in rows) / checked if checked else None
    s["draft_acceptance"] = (sum(r["draft_accepted"] for r in rows) / max(sum(r["drafted"] for r in rows), 1)
                             if any(r["drafted"] for r in rows) else None)
    if ref_rows is not None:
        ref_secs = sum(r["seconds"] for r in ref_rows)
        ref_toks = sum(r["new_tokens"] for r in ref_rows)
        s["speedup"] = s["tok_per_s"] / (ref_toks / max(ref_secs, 1e-9))
        s["delta_rep4"] = s["rep4"] - mean(r["rep"][4] for r in ref_rows)
        s["exact_match"] = mean(float(r["exact"]) for r in rows)
        s["mean_first_divergence"] = mean(r["first_divergence"] for r in rows)
        diverged = [r for r in rows if "near_tie" in r]
        s["divergences"] = len(diverged)
        s["divergences_at_near_tie"] = sum(r["near_tie"] for r in diverged)
    for key, name in (("gsm8k_correct", "gsm8k_acc"), ("humaneval_pass", "humaneval_pass1")):
        vals = [float(r[key]) for r in rows if key in r]
        s[name] = mean(vals) if vals else None
    s["head_accuracy"] = [mean(a[j] for a in accs) for j in range(n_heads)] if accs and n_heads else []
    return s


def run_bench(cfg: BenchConfig) -> dict:
    dec = load_decoder(cfg.model, heads=cfg.heads, device=cfg.device, dtype=cfg.dtype, engine=cfg.engine,
                       max_len=cfg.max_len)
    tokenizer = dec.tokenizer
    labels = ["ar"] + [m for m in cfg.modes if m != "ar"]  # ar first: the reference
    configs = {m: parse_mode("ar" if m in BASELINES else m, **cfg.options) for m in labels}
    suites = (cfg.prompts_file,) if cfg.prompts_file else cfg.suites
    prompts = [p for s in suites for p in data.prompts(s, tokenizer, n=cfg.n)]
    n_heads = dec.bundle.k - 1 if dec.bundle else 0
    for label, run_cfg in configs.items():  # warm-up: first-call costs stay out of every timing
        run_one(dec, label, replace(run_cfg, max_new_tokens=min(16, run_cfg.max_new_tokens)), prompts[0].ids)
    results: dict[str, dict] = {}
    reference: list[DecodeResult] | None = None  # ar's answers, which every other mode is compared with
    for label, run_cfg in configs.items():
        rows, accs, answers = [], [], []
        for i, p in enumerate(tqdm(prompts, desc=f"bench {label}", unit="prompt")):
            r = run_one(dec, label, run_cfg, p.ids)
            answers.append(r)
            rows.append(score_prompt(dec, p, r, reference[i] if reference else None, cfg.near_tie_eps))
            rows[-1]["suite"] = suite_of(p.id)
            if r.proposals and n_heads and run_cfg.rule.lossless:  # its output is ar's: a fair yardstick
                accs.append(head_accuracy(r, n_heads))
        ref_rows = results["ar"]["rows"] if reference else None
        summary = summarize(rows, ref_rows, n_heads, accs)
        if "threshold" in run_cfg.rule.options and label not in BASELINES:  # the threshold it ran at (None: argmax)
            summary["threshold"] = dec.threshold_of(run_cfg)
            if run_cfg.rule.calibrated_share(run_cfg) is not None:  # calibrated for this share
                summary["max_wrong"] = run_cfg.rule.calibrated_share(run_cfg)
        results[label] = {"rows": rows, "summary": summary}
        reference = reference or answers
        write_outputs(cfg, results, dec, quiet=True)  # partial results survive a kill
    return write_outputs(cfg, results, dec)


def suite_of(prompt_id: str) -> str:
    return "humaneval" if prompt_id.startswith("HumanEval/") else prompt_id.split("-")[0]


def environment(cfg: BenchConfig, dec) -> dict:
    dev = dec.device
    return {"model": cfg.model, "heads": cfg.heads, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": str(dec.lm_head.weight.dtype), "torch": torch.__version__, "engine": dec.backend.describe(),
            "date": time.strftime("%Y-%m-%d")}


def write_outputs(cfg: BenchConfig, results: dict, dec, *, quiet: bool = False) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": asdict(cfg), "environment": environment(cfg, dec),
           "summary": {m: r["summary"] for m, r in results.items()}, "per_prompt": {m: r["rows"] for m, r in results.items()}}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(markdown_table(doc))
    plot(doc, out / "speed_quality.png")
    if not quiet:
        print(markdown_table(doc))
    return doc


def fmt(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def suite_counts(doc: dict) -> str:
    """'humaneval 164, gsm8k 100': the prompts each suite gave (a suite may hold fewer than --n)."""
    rows = next(iter(doc["per_prompt"].values()), [])
    counts = {s: sum(r.get("suite") == s for r in rows) for s in doc["config"]["suites"]}
    return ", ".join(f"{s} {n}" for s, n in counts.items())


def markdown_table(doc: dict) -> str:
    env, cfg = doc["environment"], doc["config"]
    options = {**cfg, **cfg.get("options", {})}  # (results from before the options were grouped: at the top)
    lines = [f"# collocate bench: {env['model']} on {env['device']}", "",
             f"{env['date']}, {env['dtype']}, torch {env['torch']}, engine {env['engine']}, batch 1, greedy, "
             f"max {options['max_new_tokens']} new tokens{', --exact' if options.get('exact') else ''}, suites {suite_counts(doc)}. "
             "Speedup is tok/s against our own `ar` in the same run.", "",
             "| mode | tau | ms/step | tok/s | speedup | rep-4 | Δrep-4 | exact vs ar | divergences at near-tie | wrong head tokens "
             "| head acc +2.. | GSM8K | HumanEval | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in doc["summary"].items():
        ties = f"{s['divergences_at_near_tie']}/{s['divergences']}" if s.get("divergences") else "-"
        acc = " / ".join(fmt(a, ".0%") for a in s.get("head_accuracy") or []) or "-"
        lines.append(f"| {mode} | {fmt(s['tau'])} | {fmt(s.get('ms_per_step'), '.2f')} | {fmt(s['tok_per_s'], '.1f')} | {fmt(s.get('speedup'), '.2f', 'x')} "
                     f"| {fmt(s['rep4'], '.3f')} | {fmt(s.get('delta_rep4'), '+.3f')} | {fmt(s.get('exact_match'), '.0%')} "
                     f"| {ties} | {fmt(s['wrong_share'], '.0%')} | {acc} | {fmt(s['gsm8k_acc'], '.0%')} "
                     f"| {fmt(s['humaneval_pass1'], '.0%')} | {PAPER.get(mode.split('@')[0], '')} |")
    lines += ["", "tau: tokens per backbone forward pass. rep-4: 1 - unique 4-grams / 4-grams of each answer, "
              "averaged. wrong head tokens: share of accepted unverified head tokens that the backbone's own argmax "
              "rejects. divergences at near-tie: answers that differ from ar whose first differing position has an "
              f"ar top-2 logit gap under {cfg['near_tie_eps']}. See docs/metrics.md.", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, s in doc["summary"].items():
        x = s.get("speedup") or 1.0
        axes[0].scatter(x, s.get("delta_rep4") or 0.0)
        axes[0].annotate(mode, (x, s.get("delta_rep4") or 0.0))
        axes[1].scatter(x, s.get("exact_match") if s.get("exact_match") is not None else 1.0)
        axes[1].annotate(mode, (x, s.get("exact_match") if s.get("exact_match") is not None else 1.0))
    axes[0].set(xlabel="speedup vs ar (tok/s)", ylabel="Δ rep-4 vs ar", title="speed vs repetition")
    axes[1].set(xlabel="speedup vs ar (tok/s)", ylabel="exact match with ar", title="speed vs fidelity")
    for ax in axes:
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{doc['environment']['model']} on {doc['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
