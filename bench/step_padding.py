"""How much of a block-drafter training step is padding: steps of shuffled answers against `epoch_steps`'.

    tar -xzf bench/answers/q15-20480.tgz -C runs && python bench/step_padding.py runs/q15-20480/work

A step runs the backbone (and the drafter's context) at its longest answer's length, so its padding is
that length times its answers less their lengths. Every shard but the last (the held-out one), --batch 512
and --anchors 64 as training takes them.
"""
import argparse
import random
from pathlib import Path

from collocate.train.block import block_steps, epoch_steps, usable_answers
from collocate.train.config import TrainConfig


def padding(answers, steps) -> float:
    real = sum(len(answers[i][0]) for step in steps for i in step)
    return 1 - real / sum(max(len(answers[i][0]) for i in step) * len(step) for step in steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", help="a run's work/ folder (its data/ shards)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--anchors", type=int, default=64)
    args = ap.parse_args()
    shards = sorted(Path(args.work, "data").glob("shard-*.safetensors"))
    answers = usable_answers(Path(args.work), list(range(len(shards) - 1)))
    cfg = TrainConfig(out="-", batch=args.batch, anchors=args.anchors)
    order = list(range(len(answers)))
    random.Random(0).shuffle(order)
    shuffled = [[order[j] for j in step] for step in block_steps([answers[i] for i in order], cfg)]
    print(f"{len(answers)} answers: steps of shuffled answers {padding(answers, shuffled):.1%} padding, "
          f"epoch_steps' {padding(answers, epoch_steps(answers, cfg, 0)):.1%}")


if __name__ == "__main__":
    main()
