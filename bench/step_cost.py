"""Milliseconds per decoding step by width for random-weight models of exact Qwen2.5 shapes.

    python bench/step_cost.py --shape 7b --out bench/results/gpu-2026-11-28/step_cost_7b.json
    python bench/step_cost.py --shape 1.5b --widths 1,16,32,64 --modes --out step_cost_1.5b.json

Random weights give honest step timings (the work per step does not depend on the values). Each
step is the fast engine's forward (compiled layers) + LM head + argmax, replayed as a CUDA graph,
with attention over every slot and over the shortest attention length that covers the context and
the step (as the decode loop runs it); the same step with uncompiled layers is timed too, to show what
compiling buys. The cache has --max-len slots (2,048), as the engine builds it; --unaligned also times
the compiled step over max-len + 7 slots (2,055), an odd row length. --modes also times whole decoding
steps as the decode loop runs them on the fast backend with random k=4 bundles (LM head over every fed
row and head, the heads, the accept rule, the next feed, and the host reading the result), which is what
a mode's step costs beyond the bare forward: chains, trees, token-conditioned drafts (one LM-head read per
depth; with a 32K draft vocabulary, a fifth of it) and --exact; once with attention over the context, as
the loop runs them, and once over every slot; and once more with the step's tail (everything after the
forward: accept rule, drafting, next feed; StepRunner.settle) run plain instead of compiled, to show what
compiling it buys.
"""
import argparse
import json
import re
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from collocate.bundle import MTPBundle
from collocate.decode import EXACT_WIDTH, DecodeConfig
from collocate.draft import MAX_TREE, best_paths
from collocate.engine import build_decoder
from collocate.fast import SLOT_MULTIPLE, StaticLM, attn_lens, shortest_covering

MODE_STEPS = {  # name: (drafter, draft vocabulary, k, config, fed tokens), as the decode loop feeds each mode
    "ar": ("heads", 0, 4, DecodeConfig("ar"), 1),
    "clp, 4 tokens": ("heads", 0, 4, DecodeConfig("clp"), 4),
    "verify, 4 tokens": ("heads", 0, 4, DecodeConfig("verify"), 4),
    "verify --candidates 5, 8 tokens": ("heads", 0, 4, DecodeConfig("verify", candidates=5), 8),
    **{f"verify --tree-size {n}": ("heads", 0, 4, DecodeConfig("verify", tree_size=n), n + 1) for n in (16, 32, 64)},
    **{f"{d} verify, 4 tokens": (d, 0, 4, DecodeConfig("verify"), 4) for d in ("tc-depth", "tc-shared")},
    **{f"tc-depth verify --tree-size {n}": ("tc-depth", 0, 4, DecodeConfig("verify", tree_size=n), n + 1)
       for n in (16, 32)},
    "tc-depth, 32K draft vocab, verify --tree-size 32": ("tc-depth", 32768, 4, DecodeConfig("verify", tree_size=32), 33),
    **{f"tc-shared k={k}, 32K draft vocab, verify --tree-size {n}":
       ("tc-shared", 32768, k, DecodeConfig("verify", tree_size=n), n + 1) for k in (4, 6) for n in (16, 32, 48, 64)},
    **{f"tc-shared k=6, 32K draft vocab, verify --tree-size {n} --tree-depth {d}":
       ("tc-shared", 32768, 6, DecodeConfig("verify", tree_size=n, tree_depth=d), n + 1)
       for n, d in ((31, 3), (32, 3), (47, 3), (48, 3), (48, 4), (63, 3), (64, 3))},  # (n + 1 rows: 32, 33, ...)
    # the block drafter (its default layers, 5 backbone layers, a 32K draft vocabulary): its chain of 15, and trees
    "block k=16, verify, 16 tokens": ("block", 32768, 16, DecodeConfig("verify"), 16),
    **{f"block k=16, verify --tree-size {n} --tree-depth {d}": ("block", 32768, 16,
       DecodeConfig("verify", tree_size=n, tree_depth=d), n + 1) for n, d in ((48, 3), (48, 6), (64, 8))},  # noqa
    "ar --exact": ("heads", 0, 4, DecodeConfig("ar", exact=True), EXACT_WIDTH),
    "verify --exact": ("heads", 0, 4, DecodeConfig("verify", exact=True), EXACT_WIDTH),
    # --exact at the block drafter's widths: ar and the tree each at 16 and 64 rows a step
    **{f"block k=16, ar --exact --exact-width {w}": ("block", 32768, 16, DecodeConfig("ar", exact=True, exact_width=w), w)
       for w in (16, 64)},
    "block k=16, verify --exact (its chain)": ("block", 32768, 16, DecodeConfig("verify", exact=True), 16),
    "block k=16, verify --tree-size 48 --tree-depth 3 --exact --exact-width 64": (
        "block", 32768, 16, DecodeConfig("verify", tree_size=48, tree_depth=3, exact=True, exact_width=64), 64),
}
# a plausible shape of held-out hit rates per rank for +2..+7 (timing needs the tree's shape, not its accuracy)
RANK_PROBS = [[0.5, 0.1, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01], [0.45, 0.1, 0.05, 0.04, 0.03, 0.02],
              [0.42, 0.08, 0.05, 0.04, 0.03], [0.4, 0.08, 0.05, 0.04], [0.38, 0.08, 0.05], [0.36, 0.08]]

SHAPES = {  # Qwen2.5 published configurations (and a tiny one to try the scripts on a CPU)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def build(shape: str, device: str = "cuda"):
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    return model


def time_width(model, lm: StaticLM, m: int, context: int, reps: int = 50, *, compiled: bool = True,
               attn_len: int | None = None) -> float:
    ids = torch.randint(0, model.config.vocab_size, (m,), device="cuda")
    pos0 = torch.tensor(context, device="cuda")
    head = model.get_output_embeddings()

    def step():
        return head(lm.forward(ids, pos0, attn_len=attn_len, compiled=compiled)).argmax(-1)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def random_bundle(model, drafter: str, vocab: int, k: int = 4) -> MTPBundle:
    """drafter "block": a block drafter of block size k at its default sizes (block.LAYERS, five taps);
    "block-tc": the same with its slots following the token before them (--block-tc)."""
    vocab = min(vocab, model.config.vocab_size // 2)  # (the tiny shape has 512 tokens)
    block = {}
    if drafter.startswith("block"):  # (imported here: a tree from before the block drafter runs this file too)
        from collocate.block import BlockConfig

        block = BlockConfig.for_backbone(model, block_size=k, token_cond=drafter == "block-tc").as_dict()
        drafter = "block"
    bundle = MTPBundle.for_backbone(model, k=k, base_model="random weights", has_gates=drafter != "block",
                                    drafter=drafter, draft_vocab=vocab, block=block)
    bundle.config.tree = [list(p) for p in best_paths((RANK_PROBS + RANK_PROBS[-1:] * k)[: k - 1], MAX_TREE)]
    if vocab:
        bundle.draft_ids.copy_(torch.randperm(model.config.vocab_size)[:vocab])
    return bundle


def time_mode_steps(model, context: int, max_len: int, reps: int = 50, only: str | None = None,
                    all_slots: bool = False, plain_tail: bool = False) -> dict[str, float]:
    """Median ms of one whole step per mode, from the host's side: replay (or run) and read the result.
    Attention reads the shortest of the engine's lengths that covers the step, as the loop runs it
    (all_slots: every slot, as every step did before attention lengths). plain_tail:
    the step after the forward runs op by op, not compiled."""
    out, decoders = {}, {}
    with torch.inference_mode():
        for name, (drafter, vocab, k, cfg, m) in MODE_STEPS.items():
            if only and not re.search(only, name):
                continue
            if (drafter, vocab, k) not in decoders:  # the same 2,048 slots as above
                decoders = {(drafter, vocab, k): build_decoder(model, bundle=random_bundle(model, drafter, vocab, k),
                                                               engine="fast", max_len=max_len)}
            run = decoders[drafter, vocab, k].runner
            if plain_tail:
                run.settle_step = run.settle
            rule, times = decoders[drafter, vocab, k].rule_for(cfg), []
            # --exact reads one attention length a request: a 256-token answer's after this context
            run.exact_len = None if not rule.exact or all_slots else run.backend.attn_len(context + 256 + m)
            for _ in range(reps + 2):  # the first two capture the graph and warm up
                run.pos0.fill_(context)
                t0 = time.perf_counter()
                run.run_step(m, rule, None if all_slots else context + m).read()
                times.append(1000 * (time.perf_counter() - t0))
            out[name] = statistics.median(times[2:])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--unaligned", action="store_true", help="also time max_len + 7 slots, not rounded up")
    ap.add_argument("--modes", action="store_true", help="also time whole steps per decoding mode")
    ap.add_argument("--only", help="with --modes: only the modes whose name matches this regular expression")
    ap.add_argument("--widths", default="1,2,3,4,5", help="bare-step widths to time, comma-separated")
    ap.add_argument("--out")
    args = ap.parse_args()
    model = build(args.shape)
    lm = StaticLM(model, args.max_len)  # as the fast backend builds it
    widths = [int(w) for w in args.widths.split(",")]
    attn = {m: shortest_covering(attn_lens(lm.k_cache.shape[3]), args.context + m) for m in widths}
    rows = {m: time_width(model, lm, m, args.context) for m in widths}
    short = {m: time_width(model, lm, m, args.context, attn_len=attn[m]) for m in widths}
    plain = {m: time_width(model, lm, m, args.context, compiled=False) for m in widths}
    params = sum(p.numel() for p in model.parameters())
    result = {"shape": f"Qwen2.5-{args.shape} (random weights, bf16)", "params": params, "context": args.context,
              "cache_slots": lm.k_cache.shape[3], "slot_multiple": SLOT_MULTIPLE,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "ms_per_step": rows, "relative_to_width_1": {m: t / rows[widths[0]] for m, t in rows.items()},
              "ms_per_step_uncompiled_layers": plain,
              "ms_per_step_attention_over_context": short, "attention_lengths": attn}
    if args.unaligned:
        del lm
        odd = StaticLM(model, args.max_len + 7, slot_multiple=1)
        result[f"ms_per_step_{odd.k_cache.shape[3]}_slots"] = {m: time_width(model, odd, m, args.context)
                                                              for m in widths}
    if args.modes:
        result["ms_per_mode_step"] = time_mode_steps(model, args.context, args.max_len, only=args.only)
        result["ms_per_mode_step_all_slots"] = time_mode_steps(model, args.context, args.max_len, only=args.only,
                                                               all_slots=True)
        result["ms_per_mode_step_plain_tail"] = time_mode_steps(model, args.context, args.max_len, only=args.only,
                                                                plain_tail=True)
    report(result, args.out)


def report(result: dict, out: str | None) -> None:
    """Print a result and write it to out, where given."""
    print(json.dumps(result, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
