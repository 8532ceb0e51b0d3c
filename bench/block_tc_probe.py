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
from the same seed, with the same steps (train/block.py's `epoch_steps`, `step_terms`, AdamW with its
warm-up and cosine, a CPU's one answer at a time), the run's own block config and draft vocabulary. The
held-out shard's anchors then give, per variant, top-1 by slot and the share of anchors whose first k
drafts are all right: for the variant, drafting from its own guesses, the first k are all right exactly
where they are all right when it reads the answer's tokens, so these are the chain's real rates, and their
sum is the drafts a chain keeps per step (beyond the backbone's own token).
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

from collocate.block import BlockConfig, BlockModel
from collocate.bundle import MTPBundle
from collocate.heads import VocabSlice
from collocate.train.answers import read_shard
from collocate.train.block import epoch_steps, padded, step_anchors, step_terms, tapped_states, usable_answers
from collocate.train.config import TrainConfig
from collocate.train.heads import lr_at
from collocate.zoo import load_backbone


def train(block, model, lm_head, answers, cfg: TrainConfig) -> dict:
    embed = model.get_input_embeddings()
    opt = torch.optim.AdamW(block.parameters(), lr=cfg.lr, weight_decay=0.0)
    epochs = [epoch_steps(answers, cfg, e) for e in range(cfg.epochs)]
    total, step, t0, losses = sum(map(len, epochs)), 0, time.perf_counter(), []
    for e, steps in enumerate(epochs):
        rng = random.Random(cfg.seed * 1000 + e + 500)
        for batch in steps:
            seqs = [answers[i] for i in batch]
            with torch.no_grad():
                feats, _ = tapped_states(model, [s for s, _ in seqs], block.c.taps)
            tokens = padded([s for s, _ in seqs], -100, feats.device)
            anchors = step_anchors(seqs, cfg.anchors, rng, feats.device)
            loss = step_terms(block, embed, lm_head, seqs, tokens, feats, anchors, together=False,
                              local=lm_head.local, fused=True).mean()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
        print(f"  epoch {e + 1}: loss {sum(losses[-len(steps):]) / len(steps):.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return {"steps": step, "seconds": round(time.perf_counter() - t0), "last_epoch_loss": sum(losses[-len(steps):]) / len(steps)}


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
        c = BlockConfig(**bundle.heads.c.as_dict())
        c.token_cond = name == "token"
        block = BlockModel(c).init_from(model).train()
        print(f"{name}: {sum(p.numel() for p in block.parameters()) / 1e6:.2f}M weights", flush=True)
        r = train(block, model, lm_head, answers, cfg)
        block.eval()
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
