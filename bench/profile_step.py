"""Where a decoding step's time goes: GPU kernels of one compiled step, grouped by name.

    python bench/profile_step.py --shape 1.5b --width 1

The step is the fast engine's forward + LM head + argmax (as in step_cost.py), run outside a graph
under torch.profiler; kernel times are GPU time, so their sum against the graph's ms per step shows
how much of a step is launch gaps rather than work.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from collocate.fast import StaticLM
from step_cost import build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    model = build(args.shape)
    lm = StaticLM(model, 2048)  # 2,048 slots, as the fast backend builds it by default
    ids = torch.randint(0, model.config.vocab_size, (args.width,), device="cuda")
    pos = torch.tensor(args.context, device="cuda")
    head = model.get_output_embeddings()
    with torch.inference_mode():
        for _ in range(3):
            head(lm.forward(ids, pos, compiled=True)).argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                head(lm.forward(ids, pos, compiled=True)).argmax(-1)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / 5 / 1000
    print(f"GPU kernel time per step: {total:.3f} ms, kernels per step: {sum(e.count for e in events) / 5:.0f}")
    for e in sorted(events, key=lambda e: -e.device_time_total)[: args.rows]:
        print(f"{e.device_time_total / 5 / 1000:8.3f} ms {e.count // 5:5d}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
