"""The `collocate` command line.

    collocate models
    collocate info smollm2-135m-k4
    collocate demo
    collocate generate --prompt "Why is the sky blue?" --chat --mode verify
    collocate train --model smollm2-135m --k 4 --samples 2000 --out runs/smollm2-k4
    collocate bench --suite mtbench,gsm8k --modes ar,clp,verify --n 10 --out bench/results/cpu
    collocate serve --model smollm2-135m --port 8000            # OpenAI-compatible, /v1/chat/completions
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .engine import DTYPES, ENGINES
from .options import SPEC_HELP
from .options import add_arguments as add_decoding_arguments
from .train.config import add_arguments as add_train_arguments
from .zoo import DEFAULT_MODEL, ZOO, is_cached, model_dir


def cmd_models(args) -> int:
    print(f"{'name':<22}{'size':>9}  {'cached':<8}source")
    for m in ZOO.values():
        print(f"{m.name:<22}{m.size_mb:>6} MB  {'yes' if is_cached(m.name) else 'no':<8}{m.source}")
    print(f"\ncache: {model_dir('').parent}  (set COLLOCATE_CACHE to move it)")
    return 0


def cmd_info(args) -> int:
    from .bundle import MTPBundle, resolve_bundle

    bundle = MTPBundle.from_pretrained(args.bundle)
    c = bundle.config
    counts = bundle.param_counts()
    print(f"bundle      {args.bundle}\nbase model  {c.base_model}\nk           {c.k} (heads for offsets "
          f"{', '.join('+' + str(o) for o in bundle.heads.offsets)})\nhidden      {c.hidden_size}\n"
          f"vocabulary  {c.vocab_size}\n" + (f"block       {c.block['layers']} layer(s), MLP {c.block['intermediate_size']}, "
                                              f"reading backbone layers {c.block['taps']}" if c.block else
                                              f"layers/head {c.layers}") +
          f"\nfingerprint {c.fingerprint.get('lm_head_sha256', '-')[:16]}")
    clps = ", ".join([f"{c.clp_features} (default)", *bundle.clp_variants])
    print(f"parameters  heads {counts['heads']:,}  CLP {counts['clp']:,}: {clps}  "
          f"gates {counts['gates']:,}" + ("" if c.has_gates else " (none)"))
    vocab = f", drafting over {c.draft_vocab:,} tokens" if c.draft_vocab else ""
    print(f"drafter     {c.drafter}{vocab}; tree: " + (f"{len(c.tree)} nodes stored best first" if c.tree else
                                                       "from the training report, if any"))
    report = resolve_bundle(args.bundle) / "train_report.json"
    if report.exists():
        acc = json.loads(report.read_text()).get("heldout_head_accuracy", {})
        print("held-out top-1  " + "  ".join(f"{o} {v['top1']:.1%}" for o, v in acc.items()))
    from .modes import CLP_DEFAULT_MAX_WRONG

    for f in [c.clp_features, *bundle.clp_variants]:
        t = bundle.safe_threshold(CLP_DEFAULT_MAX_WRONG, f)
        row = bundle.calibration_at(t, f) if t is not None else {}
        if row:
            print(f"clp {f:<12} calibrated threshold {t:g}: held-out wrong share {row['wrong_share']:.1%}, "
                  f"{row['mean_accepted']:.2f} head tokens a step")
    return 0


def load_for_decoding(args, *, need_heads: bool):
    from .engine import load_decoder

    dec = load_decoder(args.model, heads=args.heads, need_heads=need_heads, device=args.device, dtype=args.dtype,
                       engine=args.engine, max_len=args.max_len)
    return dec, dec.tokenizer


def cmd_generate(args) -> int:
    from .api import Generator
    from .decode import DecodeError, drain
    from .options import from_args

    cfg = from_args(args)
    if not args.prompt.strip():
        raise DecodeError("empty prompt: give --prompt some text")
    gen = Generator(load_for_decoding(args, need_heads=cfg.rule.drafts)[0])
    r = drain(gen.stream(args.prompt, cfg, chat=args.chat), lambda piece: print(piece, end="", flush=True))
    s = r.stats
    extra = f"  wrong head tokens {s.wrong_share:.1%}" if not cfg.rule.lossless else ""
    extra += f"  drafts accepted {s.draft_acceptance:.1%}" if s.drafted else ""
    print(f"\n\n[{cfg.mode}] {s.new_tokens} tokens in {s.steps} steps, tau {s.tau:.2f}, "
          f"{s.tok_per_s:.1f} tok/s, finished by {r.finish_reason}{extra}", file=sys.stderr)
    note = clp_default_note(gen.decoder, cfg)
    if note:
        hint = "" if "verify" in note else " For speed at the model's own quality: --mode verify."
        print(f"[{cfg.mode}] {note}{hint}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .zoo import convert_gguf

    convert_gguf(Path(args.gguf), Path(args.out))
    return 0


def cmd_train(args) -> int:
    from accelerate import PartialState

    from .train import run_training
    from .train.config import from_args

    run_training(from_args(args))
    PartialState().destroy_process_group()  # under `accelerate launch`: leave cleanly (one process: a no-op)
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, run_bench
    from .options import given

    cfg = BenchConfig(model=args.model, heads=args.heads, suites=tuple(args.suite.split(",")),
                      modes=tuple(args.modes.split(",")), n=args.n, out=args.out, device=args.device,
                      dtype=args.dtype, prompts_file=args.prompts, near_tie_eps=args.near_tie_eps,
                      engine=args.engine, max_len=args.max_len, options=given(args))
    run_bench(cfg)
    return 0


def cmd_serve(args) -> int:
    from .api import Generator

    try:
        from .serve import serve
    except ImportError as e:
        raise ValueError(f"collocate serve needs FastAPI and uvicorn ({e}): pip install 'collocate[serve]'") from None

    from .serve import ServeConfig

    key = args.api_key or os.environ.get("COLLOCATE_API_KEY") or None
    config = ServeConfig(name=args.name or args.model, default_max_tokens=args.max_new_tokens, max_queue=args.max_queue,
                         request_timeout=args.request_timeout, max_body=args.max_body, api_key=key)
    if min(config.max_queue, config.request_timeout, config.max_body) < 0 or config.request_timeout == 0:
        raise ValueError("--max-queue and --max-body must be >= 0 and --request-timeout > 0")
    gen = Generator(load_for_decoding(args, need_heads=True)[0])
    serve(gen, config, host=args.host, port=args.port)
    return 0


def cmd_export(args) -> int:
    from .bundle import BundleError, MTPBundle, resolve_bundle
    from .export import check_target, export_dflash, export_medusa, export_vllm_medusa
    from .zoo import load_backbone

    if Path(args.out).resolve() == resolve_bundle(args.bundle).resolve():
        raise BundleError(f"{args.out} is the bundle itself: export into another folder")
    check_target(args.out, overwrite=args.overwrite)  # before the backbone loads
    bundle = MTPBundle.from_pretrained(args.bundle)
    model_name = args.model or bundle.config.base_model
    backbone, _ = load_backbone(model_name, device="cpu")
    bundle.check_backbone(backbone, model_name)
    args.format = args.format or ("dflash" if bundle.config.drafter == "block" else "vllm-medusa")
    if args.format == "dflash":
        out = export_dflash(bundle, backbone, args.out, overwrite=args.overwrite)
        what = f"a block drafter of {bundle.k} slots over layers {bundle.heads.c.taps} of {model_name}"
    else:
        write = export_vllm_medusa if args.format == "vllm-medusa" else export_medusa
        out = write(bundle, backbone.get_output_embeddings().weight, args.out, overwrite=args.overwrite)
        what = f"{bundle.k - 1} heads, LM head of {model_name}"
    print(f"collocate: wrote {out} ({args.format}: {what}); docs/export.md shows how to serve it")
    return 0


DEMO_PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
    "A baker makes 12 muffins per tray and bakes 7 trays. She sells 60 muffins. How many are left?",
)


def clp_default_note(dec, cfg) -> str:
    """What a calibrated rule (clp) ran at, in words: its threshold, and whether it is as safe as asked;
    "" for modes that calibrate nothing."""
    if "max_wrong" not in cfg.rule.options:
        return ""
    t = dec.threshold_of(cfg)
    share = cfg.rule.calibrated_share(cfg)
    if share is None:
        return f"'{cfg.mode}' ran at {f'threshold {t:g}' if t is not None else 'its argmax'}, as asked."
    if t is None:
        return f"'{cfg.mode}' took the CLP's argmax (this bundle has no held-out calibration)."
    row = dec.bundle.calibration_at(t, cfg.clp_features)
    said = f"'{cfg.mode}' ran at threshold {t:g}"
    if not row:
        return said + "."
    if row["wrong_share"] <= share:
        kept = "" if cfg.max_wrong else " (the share that kept task quality on the whole suites; few head tokens pass)"
        return said + f", where {row['wrong_share']:.1%} of held-out head tokens were wrong{kept}."
    return (said + f", this bundle's most cautious, and still {row['wrong_share']:.0%} of held-out head tokens were "
            f"wrong: its CLP cannot reach the {share:.0%} asked (use verify for quality).")


def cmd_demo(args) -> int:
    """The embedded model with its shipped bundle: ar, verify and clp (calibrated, and the paper's argmax)."""
    from dataclasses import replace

    from .bundle import MTPBundle, default_bundle_for
    from .data import encode
    from .engine import build_decoder
    from .metrics import first_divergence
    from .options import DecodeConfig, DecodeError, given, with_options

    dec, tokenizer = load_for_decoding(args, need_heads=True)
    rows = {m: with_options(DecodeConfig(mode=m), **given(args)) for m in ("ar", "verify", "clp")}
    try:  # the paper's reading beside the calibrated default, unless a threshold or the argmax was asked for
        paper = replace(rows["clp"], argmax=True)
        if paper != rows["clp"]:
            rows["clp argmax"] = paper
    except DecodeError:
        pass
    decoders = dict.fromkeys(rows, dec)
    block = default_bundle_for(args.model, block=True) if args.heads is None else None
    if block is not None:  # the block drafter shipped beside the heads, on the same backbone, verified the same way
        model = dec.backend.model
        decoders["verify block"] = build_decoder(model, tokenizer, MTPBundle.from_pretrained(
            block, backbone=model, backbone_name=args.model), engine=args.engine, max_len=args.max_len)
        rows["verify block"] = rows["verify"]
    totals = {m: [0, 0, 0.0, 0, 0, 0] for m in rows}  # tokens, steps, seconds, exact, wrong, checked
    for mode in ("verify", "verify block"):
        if mode in rows:
            decoders[mode].generate(encode(tokenizer, "Hi"), rows[mode])  # warm-up
    for prompt in DEMO_PROMPTS:
        print(f"\n=== {prompt}")
        ids, ref = encode(tokenizer, prompt), None
        for mode, cfg in rows.items():
            r = decoders[mode].generate(ids, cfg)
            ref = ref or r
            same = first_divergence(ref.tokens, r.tokens) is None
            t = totals[mode]
            t[0], t[1], t[2] = t[0] + r.stats.new_tokens, t[1] + r.stats.steps, t[2] + r.stats.seconds
            t[3], t[4], t[5] = t[3] + same, t[4] + r.stats.head_wrong, t[5] + r.stats.head_checked
            body = "(identical to ar)" if same and mode != "ar" else r.text.strip()
            print(f"--- {mode} (tau {r.stats.tau:.2f}, {r.stats.tok_per_s:.1f} tok/s)\n{body}")
    ar_speed = totals["ar"][0] / totals["ar"][2]
    print(f"\n{'mode':<11}{'tokens':>7}{'steps':>7}{'tau':>6}{'tok/s':>8}{'speedup':>9}{'same as ar':>12}"
          f"{'wrong head tok':>16}")
    for mode, (toks, steps, secs, exact, wrong, checked) in totals.items():
        wrong_s = f"{wrong / checked:.0%}" if checked else "-"
        print(f"{mode:<11}{toks:>7}{steps:>7}{toks / steps:>6.2f}{toks / secs:>8.1f}{toks / secs / ar_speed:>8.2f}x"
              f"{exact:>8}/{len(DEMO_PROMPTS)}{wrong_s:>16}")
    print(f"\n{dec.device.type} timings. verify checks every draft, so its answers are ar's. clp accepts head tokens "
          "unchecked: 'wrong head tok' is the share the backbone itself would not have written. "
          + clp_default_note(dec, rows["clp"])
          + (" 'clp argmax' is the paper's reading: faster, and wrong far more often." if "clp argmax" in rows else "")
          + (f" 'verify block' drafts with the block drafter shipped beside the heads ({Path(block).name}, a small "
             "one trained on a CPU: bench/README.md)." if block else "")
          + " On a CPU a multi-token step costs about as much as its tokens, so the speedups need a GPU "
          "(bench/README.md).")
    return 0


def add_model_args(p, command: str):
    """The backbone, its bundle, where it runs, and the decoding options `command` takes (options.py)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, hub id, local folder or .gguf file")
    p.add_argument("--heads", help="MTP bundle folder (default: the bundle shipped for --model, if any)")
    p.add_argument("--device", default="auto", help="auto: cuda if there is a GPU, else cpu")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="fast: static KV cache, compiled layers, a CUDA graph per step width (Llama/Qwen2/"
                        "Mistral); auto: fast on CUDA where it supports the model, else eager")
    p.add_argument("--max-len", type=int, help="tokens the fast engine's cache holds, prompt and answer together "
                   "(default: the model's window, at most 32,768, as far as a quarter of the free GPU memory holds)")
    add_decoding_arguments(p, command)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="collocate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("models", help="the model zoo and what is cached").set_defaults(fn=cmd_models)
    p = sub.add_parser("info", help="what an MTP bundle holds")
    p.add_argument("bundle")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("generate", help="stream an answer")
    add_model_args(p, "generate")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("convert", help="dequantize a .gguf once into a bf16 Hugging Face folder")
    p.add_argument("gguf")
    p.add_argument("out")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("demo", help="the embedded model and its shipped bundle: ar, clp, verify")
    add_model_args(p, "demo")
    p.set_defaults(fn=cmd_demo, max_new_tokens=96)
    p = sub.add_parser("train", help="self-distil data and train heads, CLP and gates")
    add_train_arguments(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("export", help="a bundle's drafter in another engine's format (vLLM Medusa, Medusa, DFlash)")
    p.add_argument("bundle")
    p.add_argument("out")
    p.add_argument("--format", choices=["vllm-medusa", "medusa", "dflash"],
                   help="vllm-medusa: vLLM's Medusa drafter (the default for heads); medusa: FasterDecoding/Medusa's "
                        "medusa_lm_head.pt; dflash: a block drafter as vLLM (method dflash) and SGLang (DFLASH) "
                        "load it (the default for a block drafter)")
    p.add_argument("--model", help="the backbone whose LM head goes with the heads (default: the bundle's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a folder that is not empty")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, streaming)")
    add_model_args(p, "serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model name clients ask for (default: --model)")
    p.add_argument("--api-key", help="every /v1 route needs Authorization: Bearer KEY (default: $COLLOCATE_API_KEY; "
                   "none: open to whoever reaches the port)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait behind the one being answered; "
                   "more get 429 with Retry-After (default 16)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may wait for the engine; "
                   "then 503 with Retry-After (default 600)")
    p.add_argument("--max-body", type=int, default=4 << 20, help="bytes of a request body; more get 413 (default 4 MiB)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("bench", help="modes side by side on real prompts; writes JSON, Markdown, PNG")
    add_model_args(p, "bench")
    p.add_argument("--suite", default="mtbench,gsm8k,humaneval")
    p.add_argument("--modes", default="ar,clp,gate,compete,verify", help=f"comma-separated: {SPEC_HELP}")
    p.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} lines, used instead of --suite")
    p.add_argument("--n", type=int, default=10, help="prompts per suite")
    p.add_argument("--near-tie-eps", type=float, default=0.5, help="logit gap under which a divergence is a near-tie")
    p.add_argument("--out", default="bench/results/latest")
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .bundle import BundleError
    from .decode import DecodeError

    try:
        return args.fn(args)
    except (BundleError, DecodeError, ValueError, OSError, NotImplementedError) as e:
        print(f"collocate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
