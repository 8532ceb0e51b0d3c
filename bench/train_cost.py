"""Milliseconds per block-drafter training step, by part, for random-weight models of exact Qwen2.5 shapes.

    python bench/train_cost.py --shape 1.5b --out train_cost_1.5b.json
    python bench/train_cost.py --shape tiny --device cpu --reps 2     # the script itself, on a CPU
    cd bench && PYTHONPATH=.. python3 train_cost.py --shape 1.5b --syncs  # where a step waits for the GPU
    python bench/train_cost.py --shape 1.5b --run RUN/work --out ...  # also the steps of RUN's kept answers

A step as `collocate train --drafter block` runs it (collocate/train/block.py), on `--answers` answers of
`--length` tokens (the last `--answer` of them the answer) with `--anchors` random blocks each, the
drafter's default layers, five taps and a 32K draft vocabulary, in bf16 autocast: the backbone's tapped
layers over the step's answers (no gradient), then the drafter's weighted loss, its backward, clipping and
AdamW. The drafter's part is timed three ways (train/block.py's `step_terms`): the step's answers in one
padded pass (what training runs on a GPU) and one answer at a time, their losses added up before one
backward (what it runs on a CPU, and what it ran everywhere before the seventeenth session); and the one
pass with its attention as scores then softmax (`--block-attention eager`) instead of in one kernel (SDPA,
the default since the eighteenth session). A whole step builds its inputs as training does; `--reps` of
them back to back, with one wait at the end, give the steps a second a training log sees. Random weights
time a step honestly: its work does not depend on the values. Peak memory beside each. `--block-tc`: the
same with the drafter of `collocate train --block-tc`. `--syncs` times nothing: PyTorch's sync debug mode
over one whole step prints each place where the host waits for the GPU (its stack's frames of collocate,
transformers and torch.nn/optim) and how often. `--run`: also `--real-steps` steps of training's first
epoch over that run's kept answers (`epoch_steps`: their own lengths, a new padded width almost every step),
back to back, twice (the second time every shape has been seen), then with each step's width rounded up to
a multiple of 64 (a few shapes, a little more work), beside the steps of one shape above.
"""
import argparse
import random
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

from collocate.block import BlockConfig, BlockModel
from collocate.heads import VocabSlice
from collocate.train.block import epoch_steps, padded, step_anchors, step_terms, tapped_states, usable_answers
from collocate.train.config import TrainConfig
from step_cost import SHAPES, build, report


def timed(fn, reps: int, device: str) -> dict:
    """fn() reps times after one warm-up: median milliseconds and peak memory (GiB, CUDA only)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"ms": statistics.median(times), "peak_gib": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--answers", type=int, default=9, help="answers a step takes (--batch 512 / --anchors 64, "
                                                             "less where answers are short: ~9.8 on the 1.5B's)")
    ap.add_argument("--length", type=int, default=420, help="tokens per sequence, prompt and answer")
    ap.add_argument("--answer", type=int, default=185, help="of which the answer (anchors are taken there)")
    ap.add_argument("--anchors", type=int, default=64)
    ap.add_argument("--draft-vocab", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--block-tc", action="store_true", help="a drafter whose slots follow the token before them")
    ap.add_argument("--syncs", action="store_true", help="list where a whole step waits for the GPU, time nothing")
    ap.add_argument("--run", help="a training run's work folder (data/shard-*.safetensors): time its real steps too")
    ap.add_argument("--real-steps", type=int, default=200)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = build(args.shape, args.device)
    block = BlockModel(BlockConfig.for_backbone(model, token_cond=args.block_tc)).to(args.device).init_from(model)
    embed, full = model.get_input_embeddings(), model.get_output_embeddings()
    vocab = min(args.draft_vocab, full.weight.shape[0])
    lm_head = VocabSlice(full, torch.randperm(full.weight.shape[0])[:vocab])
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4, fused=args.device == "cuda")  # (as training's)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 151000 if args.shape != "tiny" else 500, (args.length,), generator=g).tolist()
            for _ in range(args.answers)]
    plen, rng = args.length - args.answer, random.Random(0)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16)

    def backbone():
        with torch.no_grad():
            return tapped_states(model, seqs, block.c.taps)

    feats, _ = backbone()
    tokens = padded(seqs, -100, feats.device)
    anchors = step_anchors([(s, plen) for s in seqs], args.anchors, rng, feats.device)

    def drafter(together: bool, fused: bool = True):
        drafter_step(block, embed, lm_head, opt, autocast, [(s, plen) for s in seqs], tokens, feats, anchors,
                     together, fused)

    def step():  # as the training loop runs one: its inputs built from lists, copied without waiting
        whole_step(model, block, embed, lm_head, opt, autocast, [(s, plen) for s in seqs], args.anchors, rng,
                   args.device == "cuda")

    if args.syncs:
        return sync_sites(step)

    def steps():  # reps steps back to back, one wait at the end: what training's steps a second see
        for _ in range(args.reps):
            step()

    rows = {"backbone (taps, no grad)": timed(backbone, args.reps, args.device),
            "drafter, the step's answers in one pass": timed(lambda: drafter(True), args.reps, args.device),
            "drafter, one pass, attention as scores then softmax (--block-attention eager)":
                timed(lambda: drafter(True, False), args.reps, args.device),
            "drafter, one answer at a time": timed(lambda: drafter(False), args.reps, args.device),
            "whole step (backbone, drafter as training runs it here)": timed(step, args.reps, args.device),
            "steps back to back, per step": {**timed(steps, 1, args.device),
                                             "per": args.reps}}
    rows["steps back to back, per step"]["ms"] /= args.reps
    if args.run:
        rows.update(real_steps(args, model, block, embed, lm_head, opt, autocast))
    result = {"shape": f"Qwen2.5-{args.shape} (random weights, bf16)", "device": torch.cuda.get_device_name()
              if args.device == "cuda" else args.device, "torch": torch.__version__,
              "drafter": {**block.c.as_dict(), "params": sum(p.numel() for p in block.parameters()),
                          "draft_vocab": vocab},
              "answers": args.answers, "length": args.length, "answer": args.answer, "anchors": args.anchors,
              "steps": rows}
    report(result, args.out)


def drafter_step(block, embed, lm_head, opt, autocast, seqs, tokens, feats, anchors, together: bool,
                 fused: bool = True) -> None:
    """The drafter's part of a training step, as train/block.py runs it: its loss, backward, clipping, AdamW."""
    with autocast:
        terms = step_terms(block, embed, lm_head, seqs, tokens, feats, anchors, together=together,
                           local=lm_head.local, fused=fused)
    opt.zero_grad(set_to_none=True)
    terms.mean().backward()
    torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
    opt.step()


def whole_step(model, block, embed, lm_head, opt, autocast, seqs, anchors_each: int, rng, together: bool) -> None:
    """A whole training step over seqs [(ids, prompt length)], as train/block.py runs one: the backbone's taps,
    the step's inputs built from lists, then `drafter_step`."""
    with torch.no_grad():
        feats, _ = tapped_states(model, [s for s, _ in seqs], block.c.taps)
    tokens = padded([s for s, _ in seqs], -100, feats.device)
    anchors = step_anchors(seqs, anchors_each, rng, feats.device)
    drafter_step(block, embed, lm_head, opt, autocast, seqs, tokens, feats, anchors, together)


def real_steps(args, model, block, embed, lm_head, opt, autocast) -> dict:
    """The first --real-steps steps of training's first epoch over the run's kept answers (all shards but the
    last, the held-out one, as `collocate train` splits them), built and run as train/block.py does, back to
    back with one wait at the end; then the same steps again, every shape seen once; then with each step's
    width rounded up to a multiple of 64."""
    run = Path(args.run)
    ids = sorted(int(p.stem.split("-")[-1]) for p in (run / "data").glob("shard-*.safetensors"))
    if not ids:
        raise SystemExit(f"{run} holds no answer shards (data/shard-*.safetensors)")
    vocab = embed.weight.shape[0]  # (a smaller shape than the run's model: its ids folded into its vocabulary)
    answers = [([t % vocab for t in seq], plen) for seq, plen in usable_answers(run, ids[:-1])]
    cfg = TrainConfig(out=str(run), anchors=args.anchors)
    steps = epoch_steps(answers, cfg, 0)[:args.real_steps]
    rng = random.Random(0)

    def one(batch, multiple=1):
        seqs = [answers[i] for i in batch]
        if multiple > 1:  # the longest answer padded to a multiple of `multiple` tokens, and so the step's width
            i = max(range(len(seqs)), key=lambda j: len(seqs[j][0]))
            seq, plen = seqs[i]
            seqs = seqs[:i] + [(seq + [0] * (-len(seq) % multiple), plen)] + seqs[i + 1:]
        whole_step(model, block, embed, lm_head, opt, autocast, seqs, args.anchors, rng, args.device == "cuda")

    def all_steps(multiple=1):
        for batch in steps:
            one(batch, multiple)

    def shape(multiple):  # the steps' padded widths
        widths = [-(-max(len(answers[i][0]) for i in b) // multiple) * multiple for b in steps]
        return {"steps": len(steps), "answers_per_step": round(statistics.mean(map(len, steps)), 2),
                "mean_width": round(statistics.mean(widths), 1), "distinct_widths": len(set(widths))}

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = {}
    for name, multiple in (("first pass", 1), ("shapes seen", 1), ("widths rounded up to 64, first pass", 64)):
        sync()  # (no warm-up: the first pass is where the shapes are new)
        t0 = time.perf_counter()
        all_steps(multiple)
        sync()
        rows[f"real steps back to back, per step ({name})"] = {"ms": (time.perf_counter() - t0) * 1e3 / len(steps),
                                                               **shape(multiple)}
    return rows


def sync_sites(step) -> None:
    """Run step() once warm, under PyTorch's sync debug mode, and print each waiting site's stack and count."""
    step()
    torch.cuda.synchronize()
    seen = {}

    def show(message, category, filename, lineno, file=None, line=None):
        st = "".join(f for f in traceback.format_stack()[:-2]
                     if any(k in f for k in ("collocate", "transformers", "torch/nn", "torch/optim")))[-900:]
        seen[st] = seen.get(st, 0) + 1

    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    step()
    torch.cuda.set_sync_debug_mode(0)
    for st, n in seen.items():
        print(f"== x{n}\n{st}")
    print(len(seen), "sync sites")


if __name__ == "__main__":
    main()
