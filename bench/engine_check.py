"""The fast engine on a random-weight Qwen2.5 shape: speed against our eager loop and HF `generate`,
and losslessness of verify (exact in float32; in bf16 every divergence checked for a near-tie).

    python bench/engine_check.py --shape 1.5b --out bench/results/gpu-2026-11-28/engine_check_1.5b.json

Random weights give honest step timings; acceptance rates need real weights (bench_*.md). The
bundle is zero-initialised (each head repeats the backbone's next-token guess), so verify drafts are
mostly rejected: the point here is speed per step and exactness, not tau. No EOS is set, so every
answer is exactly --new tokens long.
"""
import argparse
import json
import time

import torch

from collocate.bundle import MTPBundle
from collocate.decode import DecodeConfig
from collocate.engine import build_decoder
from collocate.metrics import first_divergence

from step_cost import build, time_width


def prompts(vocab: int, lengths=(37, 91, 150, 233, 318, 402)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(dec, ps, cfg):
    toks, secs, steps, outs = 0, 0.0, 0, []
    for p in ps:
        r = dec.generate(p, cfg)
        toks, secs, steps = toks + r.stats.new_tokens, secs + r.stats.seconds, steps + r.stats.steps
        outs.append(r.tokens)
    return {"tok_per_s": toks / secs, "tau": toks / steps, "prompts": len(ps)}, outs


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_tok_s(model, p, new, **kw):
    x = torch.tensor([p], device=model.device)
    sync()
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, **kw)
    sync()
    return (out.shape[1] - len(p)) / (time.perf_counter() - t)


@torch.inference_mode()
def gap(model, ids):
    top = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--eps", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only-float32", action="store_true")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    res = {"shape": f"Qwen2.5-{args.shape} random weights", "device": torch.cuda.get_device_name() if cuda else "cpu",
           "torch": torch.__version__, "new_tokens": args.new}

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res, indent=1), flush=True)

    model = build(args.shape, args.device)
    bundle = MTPBundle.for_backbone(model, k=4, base_model="random", has_gates=True, compete=True)
    ps = prompts(model.config.vocab_size)
    cfg = lambda mode, **kw: DecodeConfig(mode=mode, max_new_tokens=args.new, **kw)  # noqa: E731
    if not args.only_float32:
        bf16_checks(res, model, bundle, ps, cfg, args, cuda, save)
    float32_checks(res, model, bundle, ps, cfg, args)
    save()


def bf16_checks(res, model, bundle, ps, cfg, args, cuda, save):
    fast = build_decoder(model, None, bundle, engine="fast", eos_token_ids=[])
    fast.generate(ps[0], cfg("ar"))
    res["fast_ar"], ar_out = run(fast, ps, cfg("ar"))
    res["engine"] = fast.backend.describe()
    save()
    for label, c in [("verify", cfg("verify")), ("verify_adaptive", cfg("verify", adaptive=True)),
                     ("verify_c5", cfg("verify", candidates=5)),
                     ("clp", cfg("clp")), ("gate", cfg("gate")), ("compete", cfg("compete"))]:
        fast.generate(ps[0], c)
        res[f"fast_{label}"], outs = run(fast, ps, c)
        if label.startswith("verify"):
            divs = [first_divergence(a, b) for a, b in zip(ar_out, outs)]
            res[f"fast_{label}"]["exact_vs_ar"] = sum(d is None for d in divs)
            res[f"fast_{label}"]["divergence_gaps"] = [None if d is None else gap(model, p + a[:d])
                                                       for d, p, a in zip(divs, ps, ar_out)]
    if cuda:
        res[f"step_ms_{args.shape}"] = {m: time_width(model, fast.backend.lm, m, 512) for m in range(1, 6)}
    save()
    eager = build_decoder(model, None, bundle, engine="eager", eos_token_ids=[])
    eager.generate(ps[0], DecodeConfig(max_new_tokens=8))
    res["eager_ar"], _ = run(eager, ps[:2], cfg("ar"))
    hf_tok_s(model, ps[0], 8)
    res["hf_eager_tok_per_s"] = [hf_tok_s(model, p, args.new) for p in ps[:2]]
    save()
    # static cache: first call per length may compile; report every call
    res["hf_static_tok_per_s"] = [hf_tok_s(model, p, args.new, cache_implementation="static")
                                  for p in (ps[0], ps[1], ps[1], ps[2])]
    save()


def float32_checks(res, model, bundle, ps, cfg, args):
    """float32: verify must equal ar token for token, and the fast engine the eager one."""
    model = model.float()
    fast32 = build_decoder(model, None, bundle, engine="fast", eos_token_ids=[])
    a = [fast32.generate(p, cfg("ar")).tokens for p in ps]
    v = [fast32.generate(p, cfg("verify")).tokens for p in ps]
    va = [fast32.generate(p, cfg("verify", adaptive=True)).tokens for p in ps]
    vc = [fast32.generate(p, cfg("verify", candidates=5)).tokens for p in ps]
    n_eager = min(64, args.new)
    eager = build_decoder(model, None, bundle, engine="eager", eos_token_ids=[])
    e = [eager.generate(p, DecodeConfig(max_new_tokens=n_eager)).tokens for p in ps[:2]]
    res["float32"] = {"verify_exact": sum(x == y for x, y in zip(a, v)), "verify_adaptive_exact":
                      sum(x == y for x, y in zip(a, va)), "verify_candidates5_exact": sum(x == y for x, y in zip(a, vc)),
                      "prompts": len(ps), "engine": fast32.backend.describe(),
                      f"fast_ar_equals_eager_ar_first_{n_eager}_tokens": sum(x[:n_eager] == y for x, y in zip(a, e))}


if __name__ == "__main__":
    main()
