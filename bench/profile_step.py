"""Where a decoding step's time goes: GPU kernels of one compiled step, grouped by name.

    python bench/profile_step.py --shape 1.5b --width 1
    python bench/profile_step.py --shape 1.5b --mode "tc-shared k=6, 32K draft vocab, verify --tree-size 32"

The step is the fast engine's forward + LM head + argmax (as in step_cost.py), or with --mode (a name of
step_cost.MODE_STEPS) a whole decode step of that mode with a random bundle: forward, heads, drafting,
the accept rule, the K/V move. It runs outside a graph under torch.profiler; kernel times are GPU time,
so their sum and count against the graph's ms per step show how much of a step is launch gaps.
Attention reads the shortest length that covers the context and the step, as the loop runs it
(--all-slots: all 2,048).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from collocate.engine import build_decoder
from collocate.fast import StaticLM, attn_lens, shortest_covering
from step_cost import MODE_STEPS, build, random_bundle


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--mode", choices=list(MODE_STEPS), help="a whole decode step of this mode instead")
    ap.add_argument("--all-slots", action="store_true",
                    help="attention over all 2,048 slots (as --exact), not the shortest length covering the step")
    args = ap.parse_args()
    model = build(args.shape)
    step = mode_step(model, args) if args.mode else bare_step(model, args)
    with torch.inference_mode():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / 5 / 1000
    print(f"GPU kernel time per step: {total:.3f} ms, kernels per step: {sum(e.count for e in events) / 5:.0f}")
    for e in sorted(events, key=lambda e: -e.device_time_total)[: args.rows]:
        print(f"{e.device_time_total / 5 / 1000:8.3f} ms {e.count // 5:5d}x  {e.key[:110]}")


def bare_step(model, args):
    lm = StaticLM(model, 2048)  # 2,048 slots, as the fast backend builds it by default
    ids = torch.randint(0, model.config.vocab_size, (args.width,), device="cuda")
    pos = torch.tensor(args.context, device="cuda")
    head = model.get_output_embeddings()
    n = None if args.all_slots else shortest_covering(attn_lens(2048), args.context + args.width)
    return lambda: head(lm.forward(ids, pos, attn_len=n, compiled=True)).argmax(-1)


def mode_step(model, args):
    drafter, vocab, k, cfg, m = MODE_STEPS[args.mode]
    dec = build_decoder(model, bundle=random_bundle(model, drafter, vocab, k), engine="fast", max_len=2048,
                        graphs=False)
    rule, run = dec.rule_for(cfg), dec.runner

    def step():
        run.pos0.fill_(args.context)
        return run.run_step(m, rule, None if args.all_slots else args.context + m).read()
    return step


if __name__ == "__main__":
    main()
