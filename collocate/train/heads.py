"""Stage 3, heads: head j at position t learns token t+j (cross-entropy, optionally + KL to the backbone's
own distribution there), AdamW with warm-up then cosine, data-parallel through accelerate."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bundle import MTPBundle
from ..heads import VocabSlice
from .common import embedding_for, say
from .config import TrainConfig
from .features import Features, shard_features


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def head_loss(heads, offsets: list[int], lm_head, h: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
              teacher_h: torch.Tensor | None = None, embed=None) -> torch.Tensor:
    """CE of every head against its offset's token; + KL to the backbone's own distribution there.

    `heads` maps (B, d) -> (B, n_heads, d): the heads module or its data-parallel wrapper. Token-conditioned
    heads see the backbone's own tokens t+1.. (teacher forcing: a draft path is only kept where it is right).
    `lm_head` a VocabSlice: the loss is over the draft vocabulary, what decoding drafts from (a token
    outside it is never drafted, so it is no target), and each step reads a fraction of the LM head."""
    states = heads(h, tokens=targets[:, :-1], embed=embed)
    logits = lm_head(states.to(lm_head.weight.dtype)).float()  # (B, n_heads, V): one matmul
    tgt = targets[:, [o - 1 for o in offsets]]  # (B, n_heads)
    if isinstance(lm_head, VocabSlice):
        tgt = lm_head.local(tgt)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    if cfg.kl_weight and teacher_h is not None:
        valid = tgt.flatten() != -100
        with torch.no_grad():
            teacher = lm_head(teacher_h.to(lm_head.weight.dtype)).float().log_softmax(-1).flatten(0, 1)[valid]
        student = logits.log_softmax(-1).flatten(0, 1)[valid]
        loss = loss + cfg.kl_weight * F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return loss


def teacher_rows(feats: Features, rows: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Hidden state at t+j-1 for each row t and head offset j (row t+j-1 of the same answer)."""
    idx = (rows[:, None] + torch.tensor(offsets)[None] - 1).clamp(max=len(feats.hidden) - 1)
    return feats.hidden[idx]


def train_heads(model, bundle: MTPBundle, cfg: TrainConfig, run: Path, train_ids: list[int], accel) -> dict:
    lm_head, embed = model.get_output_embeddings(), embedding_for(model.get_input_embeddings())
    device = lm_head.weight.device
    if bundle.draft_ids is not None:
        lm_head = VocabSlice(lm_head, bundle.draft_ids)
    opt = torch.optim.AdamW(bundle.heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    heads, opt = accel.prepare(bundle.heads, opt)
    ckpt = run / "heads-ckpt.pt"
    epoch0, history = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        accel.unwrap_model(heads).load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        epoch0, history = state["epoch"], state["history"]
        say(f"resuming head training after epoch {epoch0}")
    sizes = [len(shard_features(model, run, i, cfg.k, cache=cfg.cache_hidden).hidden) for i in train_ids]
    rank, world = accel.process_index, accel.num_processes
    # --batch is the global batch: N processes take a share each and average their gradients, so a run on
    # N GPUs takes the steps, and learns what, a run on one takes
    share = max(1, cfg.batch // world)  # positions per process and step
    steps_per_epoch = sum(math.ceil(n // world / share) for n in sizes) // cfg.grad_accum
    total = max(1, steps_per_epoch * cfg.epochs)
    step, start = epoch0 * steps_per_epoch, time.perf_counter()
    for epoch in range(epoch0, cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = [train_ids[j] for j in torch.randperm(len(train_ids), generator=g)]
        bar = tqdm(total=sum(sizes), desc=f"heads: epoch {epoch + 1}/{cfg.epochs}", unit="pos",
                   disable=not accel.is_main_process)
        losses, micro = [], 0
        for i in order:
            feats = shard_features(model, run, i, cfg.k, cache=cfg.cache_hidden)
            perm = torch.randperm(len(feats.hidden), generator=g)
            mine = perm[: len(perm) // world * world][rank::world]  # equal shares: DDP needs equal step counts
            for rows in mine.split(share):
                bar.update(len(rows) * world)
                h = feats.hidden[rows].to(device, torch.float32)
                th = teacher_rows(feats, rows, bundle.heads.offsets).to(device) if cfg.kl_weight else None
                with accel.autocast():
                    loss = head_loss(heads, bundle.heads.offsets, lm_head, h, feats.targets[rows].to(device),
                                     cfg, th, embed) / cfg.grad_accum
                accel.backward(loss)
                micro += 1
                if micro % cfg.grad_accum == 0:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, total, cfg)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                losses.append(loss.item() * cfg.grad_accum)
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        bar.close()
        history.append({"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1),
                        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None})
        say(f"epoch {epoch + 1}: mean loss {history[-1]['loss']:.4f}")
        if accel.is_main_process:
            torch.save({"heads": accel.unwrap_model(heads).state_dict(), "opt": opt.state_dict(),
                        "epoch": epoch + 1, "history": history}, ckpt)
        accel.wait_for_everyone()
        if cfg.budget_minutes and (time.perf_counter() - start) / 60 > cfg.budget_minutes:
            say(f"stopping head training: --budget-minutes {cfg.budget_minutes} reached")
            break
    return {"history": history, "steps": step}
