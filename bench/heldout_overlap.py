"""How much of a run's held-out answers its training answers already contain: the check that a held-out
accuracy measures generalisation, not recall of near-copies.

    python bench/heldout_overlap.py runs/base/work --train 4096,8192,15360 --out overlap.json

For each training size N (the first N answers, as `collocate train --train-samples N` takes them) it
reports the share of the held-out answers' 16-token pieces that occur in those training answers, and the
share of held-out answers more than half of whose pieces do (`train.answers.heldout_overlap`, which
`collocate train` reports for the run's own training shards). Near-copies of a prompt (two overlapping
code windows) give near-copies of its answer; the data stage leaves them out
(train.answers.prepare_prompts), and this measures what is left, or what a run made without that holds.
"""
import argparse
import json
from pathlib import Path

from collocate.train.answers import PIECE, heldout_overlap, shard_answers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", help="a run's work folder (with data/manifest.json)")
    ap.add_argument("--heldout-shards", type=int, default=1)
    ap.add_argument("--train", required=True, help="training sizes, comma-separated")
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(args.work)
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    n_shards = len(manifest["shards"])
    held = shard_answers(work, list(range(n_shards - args.heldout_shards, n_shards)))
    answers = shard_answers(work, list(range(n_shards - args.heldout_shards)))
    points = []
    for n in sorted(int(x) for x in args.train.split(",")):
        overlap = heldout_overlap(answers[:n], held)
        points.append({"train_answers": min(n, len(answers)), "heldout_pieces_seen": overlap["pieces_seen"],
                       "heldout_answers_half_seen": overlap["answers_half_seen"]})
        print(json.dumps(points[-1]))
    result = {"work": str(work), "settings": manifest["settings"], "heldout_answers": len(held),
              "piece_tokens": PIECE, "points": points}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
