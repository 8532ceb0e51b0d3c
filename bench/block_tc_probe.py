"""Does conditioning the block drafter's slots on the token drafted before them (`--block-tc`) lift how far
its drafts stay right? The plain drafter and the token-conditioned one, trained alike on a run's answers.

    python bench/block_tc_probe.py /tmp/smol-d1536 --epochs 2 --out bench/results/cpu-block-tc/probe.json

The block drafter drafts every slot of a block side by side: slot j's guess cannot depend on the token
chosen at slot j-1, so a tree's branches below different +2 tokens all get the same +3 guesses, where the
token-conditioned heads (heads.TokenHeads) update a state with each drafted token and reach higher
accuracy at +3.. on the same answers (bench/README.md). The variant (BlockConfig.token_cond) keeps the
block's pass and adds one small update per slot on top of its final states x_j (before the final norm):

    s_1 = x_1,    s_j = x_j + W_out SiLU(W_in [s_{j-1}; e(y_{j-1})] + b_j)    (j >= 2)

with y_{j-1} the token drafted at slot j-1 (in training the answer's own: teacher forcing) and W_out
starting at zero, so the variant starts as the plain drafter. Both variants train on the same answers
from the same seed, with `collocate train`'s own loop (train/block.py's `train_block`: the same steps,
AdamW with its warm-up and cosine, a CPU's one answer at a time), the run's own block config and draft
vocabulary. The held-out shard's anchors then give, per variant, top-1 by slot and the share of anchors whose first k
drafts are all right: for the variant, drafting from its own guesses, the first k are all right exactly
where they are all right when it reads the answer's tokens, so these are the chain's real rates, and their
sum is the drafts a chain keeps per step (beyond the backbone's own token).
"""
import argparse
import dataclasses
import json
import random
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from collocate.block import BlockModel
from collocate.bundle import MTPBundle
from collocate.heads import VocabSlice
from collocate.train.answers import read_shard
from collocate.train.block import tapped_states, train_block, usable_answers
from collocate.train.config import TrainConfig
from collocate.zoo import load_backbone


def train(bundle, model, run: Path, train_ids: list[int], cfg: TrainConfig) -> dict:
    """bundle.heads trained as `collocate train` trains a block drafter (train/block.train_block, on a CPU),
    its checkpoint in a scratch folder so the run's own stays as it is."""
    with tempfile.TemporaryDirectory() as scratch:
        r = train_block(model, bundle, cfg, run / "work", train_ids, Accelerator(cpu=True),
                        ckpt=Path(scratch) / "block-ckpt.pt")
    return {"steps": r["steps"], "seconds": round(sum(h["seconds"] for h in r["history"])),
            "last_epoch_loss": r["history"][-1]["loss"]}


@torch.no_grad()
def heldout(block, model, lm_head, answers, anchors_each: int, seed: int) -> dict:
    """Per slot top-1, and the share of anchors whose first k drafts are all right (k = 1..B-1), over
    anchors with B-1 answer tokens after them."""
    embed, rng = model.get_input_embeddings(), random.Random(seed)
    hits, firsts, n = None, None, 0
    for seq, plen in answers:
        feats, _ = tapped_states(model, [seq], block.c.taps)
        tokens = torch.tensor(seq)
        last = len(seq) - block.c.block_size  # anchors whose whole block has answer tokens
        cand = list(range(plen, last))
        if not cand:
            continue
        anchors = torch.tensor(sorted(rng.sample(cand, min(anchors_each, len(cand)))))
        logits = block.logits(embed, lm_head, tokens, feats[0, :len(seq)], anchors)  # (b, B-1, V')
        target = lm_head.local(block.targets(tokens, anchors))
        right = (logits.argmax(-1) == target) & (target >= 0)
        h, f = right.sum(0), right.long().cumprod(-1).sum(0)
        hits, firsts = (h, f) if hits is None else (hits + h, firsts + f)
        n += len(anchors)
    return {"anchors": n, "top1_by_slot": (hits / n).tolist(), "first_k_all_right": (firsts / n).tolist(),
            "drafts_kept_per_step": (firsts / n).sum().item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a `collocate train --drafter block` run: its answers, block config and draft vocabulary")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", default="plain,token")
    ap.add_argument("--heldout-anchors", type=int, default=32)
    ap.add_argument("--seed", type=int, help="the drafters' initial weights, the data order and the anchors "
                                             "(default: the run's)")
    ap.add_argument("--out")
    args = ap.parse_args()
    run = Path(args.run)
    rep = json.loads((run / "train_report.json").read_text())
    c = rep["config"]
    cfg = TrainConfig(out=str(run), drafter="block", k=c["k"], epochs=args.epochs, batch=c["batch"],
                      anchors=c["anchors"], lr=c["lr"], warmup=c["warmup"],
                      seed=c["seed"] if args.seed is None else args.seed)
    torch.set_num_threads(2)
    bb = load_backbone(c["model"], dtype=torch.float32, device="cpu")
    model = bb.model
    bundle = MTPBundle.from_pretrained(run)
    lm_head = VocabSlice(model.get_output_embeddings(), bundle.draft_ids)
    n_shards = len(list((run / "work" / "data").glob("shard-*.safetensors")))
    held = [n_shards - c["heldout_shards"] + i for i in range(c["heldout_shards"])]
    train_ids = [i for i in range(n_shards) if i not in held]
    answers = usable_answers(run / "work", train_ids)
    held_answers = [a for i in held for a in read_shard(run / "work", i) if len(a[0]) - a[1] > bundle.heads.c.block_size]
    result = {"run": str(run), "train_answers": len(answers), "heldout_answers": len(held_answers),
              "epochs": args.epochs, "seed": cfg.seed, "block": bundle.heads.c.as_dict(), "variants": {}}
    for name in args.variants.split(","):
        torch.manual_seed(cfg.seed)
        c = dataclasses.replace(bundle.heads.c, token_cond=name == "token")
        bundle.heads = block = BlockModel(c).init_from(model)
        print(f"{name}: {sum(p.numel() for p in block.parameters()) / 1e6:.2f}M weights", flush=True)
        r = train(bundle, model, run, train_ids, cfg)
        r.update(heldout(block, model, lm_head, held_answers, args.heldout_anchors, seed=1))
        r["params"] = sum(p.numel() for p in block.parameters())
        result["variants"][name] = r
        print(name, json.dumps({k: (v if not isinstance(v, list) else [round(x, 3) for x in v[:6]]) for k, v in r.items()}),
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
