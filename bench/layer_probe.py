"""Do earlier layers' hidden states help token-conditioned heads (EAGLE-3's fused features)? A CPU probe on
self-distilled answers brought home, before building it into the drafter and the engines.

    python bench/layer_probe.py --model MODEL_DIR --answers RUN/work --train 480 --heldout 120 \
        --layers 8,16 --vocab 8192 --epochs 3 --out bench/results/cpu-q05-layer-probe/probe.json

Features: the hidden states after layers 8 and 16 and the final (normed) one at every answer position of
the first --train answers of shards 0..n-2 and the first --heldout answers of the last shard, with the
tokens t+1..t+4. Probes of tc-shared heads (k=4 unless said) over the --vocab most used answer tokens,
trained alike (AdamW, warm-up then cosine, batch 512): `final` starts from the final state, as the bundles do;
`final+block` adds a zero-initialised block on the final state alone (a capacity control); `fused` the same
block on the unit-RMS states of the earlier layers and the final one; `final-k2` the first with k=2 (a head
for +2 only: does a shorter horizon help +2, as the paper says of large models?); `final-kl` the first trained
with `collocate train --kl-weight 0.5`'s loss (`train.heads.head_loss`: + 0.5 x KL to the backbone's own
distribution at t+j-1, over the draft vocabulary: soft targets, as Medusa-2's self-distillation).
Held-out top-1 (and top-5, the ranks a tree drafts from) at +2/+3/+4.
"""
import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from collocate.heads import TokenHeads, VocabSlice, unit_rms
from collocate.train.answers import read_shard
from collocate.train.features import Features, answer_targets, batches_by_tokens
from collocate.train.heads import head_loss, teacher_rows

K = 4  # heads for +2..+4; the tokens t+1..t+3 condition them
KL_WEIGHT = 0.5  # final-kl: the weight docs/training.md shows for --kl-weight


@torch.inference_mode()
def features(model, seqs, layers: tuple[int, ...]) -> dict:
    out = {f"h{i}": [] for i in layers} | {"hf": [], "targets": []}
    for b in batches_by_tokens(seqs, 4096):
        width = max(len(s) for s, _ in b)
        ids = torch.tensor([s + [0] * (width - len(s)) for s, _ in b])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in b])
        o = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for j, (seq, plen) in enumerate(b):
            rows = slice(plen - 1, len(seq) - 1)  # t such that t+1 is an answer token
            for i in layers:
                out[f"h{i}"].append(o.hidden_states[i][j, rows].clone())
            out["hf"].append(o.last_hidden_state[j, rows].clone())
            out["targets"].append(answer_targets(seq, plen, K))
    return {k: torch.cat(v) for k, v in out.items()}


class Fuse(nn.Module):
    """final + W_out SiLU(W_in [rms(h_a); rms(h_b); ...; rms(final)]), W_out zero at the start."""

    def __init__(self, d: int, n_in: int):
        super().__init__()
        self.inp, self.out = nn.Linear(n_in * d, d), nn.Linear(d, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hs):
        return hs[-1] + self.out(F.silu(self.inp(torch.cat([unit_rms(h) for h in hs], -1))))


class Probe(nn.Module):
    def __init__(self, kind: str, d: int, layers: tuple[int, ...], vocab: VocabSlice, embed: nn.Module):
        super().__init__()
        self.kind, self.layers, self.vocab, self.embed = kind, layers, vocab, embed
        self.k = 2 if kind == "final-k2" else K  # final-k2: the paper's shorter horizon, heads for +2 only
        self.heads = TokenHeads(d, self.k, design="tc-shared")
        self.fuse = {"final": None, "final-k2": None, "final-kl": None, "final+block": Fuse(d, 1),
                     "fused": Fuse(d, len(layers) + 1)}[kind]

    def forward(self, f: dict, rows) -> torch.Tensor:
        hs = ([f[f"h{i}"][rows].float() for i in self.layers] if self.kind == "fused" else []) + [f["hf"][rows].float()]
        h = hs[0] if self.fuse is None else self.fuse(hs)
        return self.vocab(self.heads(h, tokens=f["targets"][rows, :self.k - 1], embed=self.embed))  # (n, k-1, V')


def heldout_top1(model: Probe, held: dict, top: int = 1) -> list[float]:
    hits, n = torch.zeros(model.k - 1), torch.zeros(model.k - 1)
    with torch.no_grad():
        for i in range(0, len(held["hf"]), 2048):
            rows = slice(i, i + 2048)
            pred = model.vocab.ids[model(held, rows).topk(top, dim=-1).indices]  # (n, k-1, top) full-vocabulary ids
            tgt = held["targets"][rows, 1:model.k]
            ok = tgt >= 0  # an answer token outside the draft vocabulary counts as a miss
            hits += ((pred == tgt[..., None]).any(-1) & ok).sum(0).float()
            n += ok.sum(0).float()
    return [round(100 * x, 2) for x in (hits / n).tolist()]


def train(kind, train_f, held_f, layers, vocab, embed, epochs: int, batch: int = 512, lr: float = 1e-3) -> dict:
    torch.manual_seed(0)
    model = Probe(kind, vocab.weight.shape[1], layers, vocab, embed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n = len(train_f["hf"])
    steps = epochs * math.ceil(n / batch)
    warm, step, t0, history = max(1, steps // 20), 0, time.time(), []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, batch):
            rows = perm[i:i + batch]
            for g in opt.param_groups:
                g["lr"] = lr * min(1, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, step / steps)))
            if kind == "final-kl":  # the product's loss, with the teacher's states as training reads them
                teacher = teacher_rows(Features(train_f["hf"], train_f["targets"]), rows, model.heads.offsets)
                loss = head_loss(model.heads, model.heads.offsets, vocab, train_f["hf"][rows].float(),
                                 train_f["targets"][rows, :model.k], SimpleNamespace(kl_weight=KL_WEIGHT),
                                 teacher_h=teacher.float(), embed=embed)
            else:
                target = vocab.local(train_f["targets"][rows, 1:model.k])  # (n, k-1) draft-vocabulary positions
                loss = F.cross_entropy(model(train_f, rows).flatten(0, 1), target.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        history.append({"epoch": epoch, "loss": round(loss.item(), 4), "heldout_top1": heldout_top1(model, held_f),
                        "heldout_top5": heldout_top1(model, held_f, top=5), "seconds": round(time.time() - t0)})
        print(kind, history[-1], flush=True)
    return {"heldout_top1_+2_+3_+4": history[-1]["heldout_top1"], "heldout_top5_+2_+3_+4": history[-1]["heldout_top5"],
            "history": history,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--answers", required=True, help="a run's work folder with data/shard-*.safetensors")
    ap.add_argument("--train", type=int, default=480)
    ap.add_argument("--heldout", type=int, default=120)
    ap.add_argument("--layers", default="8,16")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--probes", default="final,final+block,fused")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    layers = tuple(int(x) for x in args.layers.split(","))
    run = Path(args.answers)
    shards = len(list((run / "data").glob("shard-*.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    t0 = time.time()
    held_f = features(model, read_shard(run, shards - 1)[:args.heldout], layers)
    train_f = features(model, [x for i in range(shards - 1) for x in read_shard(run, i)][:args.train], layers)
    feature_seconds = round(time.time() - t0)
    model = model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    first = train_f["targets"][:, 0]
    ids = torch.bincount(first[first >= 0], minlength=lm_head.weight.shape[0]).topk(args.vocab).indices
    vocab = VocabSlice(lm_head, ids)
    results = {kind: train(kind, train_f, held_f, layers, vocab, embed, args.epochs) for kind in args.probes.split(",")}
    doc = {"model": args.model, "answers": str(run), "layers": layers, "vocab": args.vocab, "epochs": args.epochs,
           "train_answers": args.train, "heldout_answers": args.heldout, "train_positions": len(train_f["hf"]),
           "heldout_positions": len(held_f["hf"]), "feature_seconds": feature_seconds,
           "torch_threads": torch.get_num_threads(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v["heldout_top1_+2_+3_+4"] for k, v in results.items()}))
    return doc


if __name__ == "__main__":
    main()
