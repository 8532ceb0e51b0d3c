"""Stage 3 for a block drafter (`--drafter block`): it learns from the backbone's own answers to draft the
block after an anchor, reading the backbone's tapped layers, which are computed on the fly for each batch
of answers (a cache of five layers' states would take ~60 GB for 16K answers of the 1.5B).

    collocate train --model qwen2.5-coder-1.5b --drafter block --k 16 --samples 16384 --out runs/q15-block

A step takes answers of about one length (`epoch_steps`) until it holds `--batch` anchors: for each answer,
up to `--anchors` random answer positions a; the block at a is [token a, mask x (k-1)] and slot j learns
token a + j (cross-entropy weighted exp(-(j-1)/7), DFlash's; each answer's mean, averaged over the step's),
with the context of the positions before a. The step's answers go through the backbone together, and
through the drafter together on a GPU (padded to the longest) or one at a time on a CPU (`step_terms`).
AdamW with warm-up then cosine, gradients clipped at 1; a checkpoint per epoch to resume from. Under
`--budget-minutes` the schedule runs on the clock (`scheduled_step`) and training stops when it ends,
mid-epoch too. `block_policy_data` gives the held-out per-slot accuracy and the CLP's training data in
the same form as the heads' (policies.PolicyData).
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..block import LossTerms
from ..heads import VocabSlice
from .answers import read_shard
from .common import release_memory, say
from .config import TrainConfig
from .features import batches_by_tokens, padded, to_device
from .heads import lr_at
from .policies import PolicyData, outputs_row


def tapped_states(model, seqs: list[list[int]], taps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences' (N, W, len(taps) * d) tapped layer outputs and (N, W, d) last hidden states, in one
    batched forward (right padding to the longest, W: causal, so padding changes nothing before it and needs
    no mask, which also keeps the attention in its causal kernel)."""
    ids = padded(seqs, 0, model.get_input_embeddings().weight.device)
    out = model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[t + 1] for t in taps], -1), out.last_hidden_state  # ([0]: the embeddings)


def anchor_count(seq: list[int], plen: int, n: int) -> int:
    """How many anchors `answer_anchors` gives this answer, n at most."""
    return min(n, max(len(seq) - 1 - plen, 0))


def answer_anchors(seq_len: int, plen: int, n: int | None, rng: random.Random | None) -> torch.Tensor:
    """Anchors of one answer: positions whose token the backbone wrote and that have a token after them
    (plen .. seq_len - 2); n of them at random (None: all, in order)."""
    all_ = list(range(plen, seq_len - 1))
    if n is not None and len(all_) > n:
        all_ = sorted(rng.sample(all_, n))
    return torch.tensor(all_, dtype=torch.long)


def step_anchors(seqs: list[tuple[list[int], int]], n: int, rng: random.Random, device) -> torch.Tensor:
    """(N, most) a step's answers' `answer_anchors`, n at most each, padded with -1 (as `BlockModel.logits`
    reads them)."""
    return to_device(torch.nn.utils.rnn.pad_sequence([answer_anchors(len(s), plen, n, rng) for s, plen in seqs],
                                                     batch_first=True, padding_value=-1), device)


class Pass(NamedTuple):
    """Some of a step's answers, trained in one pass: their rows of the step's padded tensors, trimmed to
    their longest answer and their most blocks."""
    rows: slice
    width: int
    blocks: int


def passes(seqs: list[tuple[list[int], int]], anchors: torch.Tensor, together: bool) -> list[Pass]:
    """A step's answers in one pass (on a GPU: fewer, larger kernels) or one at a time (on a CPU, where one
    pass's temporaries outgrow the caches: about 2x slower at a tiny shape, bench/train_cost.py); the loss is the
    same mean either way."""
    if together:  # (padded to the answer with the most blocks: no need to count them on the device)
        return [Pass(slice(0, len(seqs)), max(len(s) for s, _ in seqs), anchors.shape[1])]
    blocks = (anchors >= 0).sum(1).tolist()
    return [Pass(slice(i, i + 1), len(seqs[i][0]), blocks[i]) for i in range(len(seqs))]


def step_terms(block, embed, lm_head, seqs: list[tuple[list[int], int]], tokens: torch.Tensor, feats: torch.Tensor,
               anchors: torch.Tensor, *, together: bool, teacher: torch.Tensor | None = None, **kw) -> LossTerms:
    """A step's block-loss terms, its answers taken in `passes`: tokens (N, W), feats (N, W, F), anchors
    (N, b) and teacher (N, W, V) padded as `BlockModel.logits` reads them; kw: loss_terms' decay, local and
    fused."""
    terms = None
    for part in passes(seqs, anchors, together):
        t = block.loss_terms(embed, lm_head, tokens[part.rows, :part.width], feats[part.rows, :part.width],
                             anchors[part.rows, :part.blocks],
                             teacher=None if teacher is None else teacher[part.rows, :part.width], **kw)
        terms = t if terms is None else terms.add(t)
    return terms


def draft_head(model, bundle):
    """The LM head the drafter's logits come from: over the draft vocabulary where the bundle has one."""
    lm_head = model.get_output_embeddings()
    return VocabSlice(lm_head, bundle.draft_ids) if bundle.draft_ids is not None else lm_head


def usable_answers(run: Path, ids: list[int]) -> list[tuple[list[int], int]]:
    """The answers of these shards that have an anchor: two answer tokens or more."""
    return [a for i in ids for a in read_shard(run, i) if len(a[0]) - a[1] >= 2]


def block_steps(answers: list[tuple[list[int], int]], cfg: TrainConfig) -> list[list[int]]:
    """Indices of the answers each step takes: whole answers until a step holds cfg.batch anchors."""
    steps, step, held = [], [], 0
    for i, (seq, plen) in enumerate(answers):
        step.append(i)
        held += anchor_count(seq, plen, cfg.anchors)
        if held >= cfg.batch:
            steps.append(step)
            step, held = [], 0
    return steps + ([step] if step else [])


WINDOW = 64  # steps whose answers epoch_steps sorts by length together


def epoch_steps(answers: list[tuple[list[int], int]], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """One epoch's steps, as indices into `answers`: the answers shuffled, sorted by length within windows of
    about WINDOW steps' answers (so that a step's answers pad little: a step runs the backbone and the drafter
    at its longest answer's length), taken into steps by `block_steps`, and the steps shuffled."""
    rng = random.Random(cfg.seed * 1000 + epoch)
    order = list(range(len(answers)))
    rng.shuffle(order)
    w = WINDOW * max(1, cfg.batch // max(1, cfg.anchors))
    order = [i for k in range(0, len(order), w) for i in sorted(order[k:k + w], key=lambda i: len(answers[i][0]))]
    steps = [[order[j] for j in step] for step in block_steps([answers[i] for i in order], cfg)]
    rng.shuffle(steps)
    return steps


def scheduled_step(step: int, total: int, elapsed: float, budget: float | None) -> int:
    """Where the learning-rate schedule stands: the steps taken, or under a time budget (seconds) the same
    fraction of `total` as of the budget spent, whichever is further, so that warm-up and cosine decay end
    when the budget does (a run stopped by its budget still ends at a low learning rate)."""
    return step if not budget else max(step, min(total, int(total * elapsed / budget)))


def train_block(model, bundle, cfg: TrainConfig, run: Path, train_ids: list[int], accel, *,
                ckpt: Path | None = None) -> dict:
    """Train bundle.heads (a BlockModel) on the answers of run's shards train_ids; resumable from its
    checkpoint after each epoch (default run/block-ckpt.pt)."""
    if accel.num_processes > 1:
        raise ValueError("a block drafter trains in one process (one GPU); launch it without accelerate's "
                         "data parallelism")
    block, embed, lm_head = bundle.heads, model.get_input_embeddings(), draft_head(model, bundle)
    local = lm_head.local if isinstance(lm_head, VocabSlice) else None
    taps = block.c.taps
    on_gpu = next(block.parameters()).is_cuda
    opt = torch.optim.AdamW(block.parameters(), lr=cfg.lr, weight_decay=0.0, fused=on_gpu)  # (fused: one kernel)
    block.train().requires_grad_(True)
    ckpt = ckpt or run / "block-ckpt.pt"
    epoch0, history = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        block.load_state_dict(state["block"])
        opt.load_state_dict(state["opt"])
        epoch0, history = state["epoch"], state["history"]
        say(f"resuming block-drafter training after epoch {epoch0}")
    answers = usable_answers(run, train_ids)
    epochs = [epoch_steps(answers, cfg, e) for e in range(cfg.epochs)]
    total = max(1, sum(map(len, epochs)))
    step, start = sum(map(len, epochs[:epoch0])), time.perf_counter()
    budget, spent = (cfg.budget_minutes * 60 if cfg.budget_minutes else None), False
    for epoch in range(epoch0, cfg.epochs):
        rng = random.Random(cfg.seed * 1000 + epoch + 500)  # the anchors
        # the loss and hits stay on the device until the epoch's end: a read each step would stall the queue
        losses, hits, counted = [], torch.zeros(block.c.block_size - 1, device=embed.weight.device), 0
        epoch_start = time.perf_counter()
        for batch in tqdm(epochs[epoch], desc=f"block: epoch {epoch + 1}/{cfg.epochs}", unit="step",
                          disable=not accel.is_main_process):
            seqs = [answers[i] for i in batch]
            release_memory(embed.weight.device)
            with torch.no_grad():  # the step's answers through the backbone in one pass
                feats, last = tapped_states(model, [s for s, _ in seqs], taps)
                teacher = lm_head(last.to(lm_head.weight.dtype)) if cfg.kl_weight else None
            tokens = padded([s for s, _ in seqs], -100, feats.device)
            anchors = step_anchors(seqs, cfg.anchors, rng, feats.device)
            with accel.autocast():
                terms = step_terms(block, embed, lm_head, seqs, tokens, feats, anchors, together=feats.is_cuda,
                                   teacher=teacher, decay=cfg.block_decay, local=local,
                                   fused=cfg.block_attention == "sdpa")
                loss = terms.mean(cfg.kl_weight)
            hits += terms.hits
            counted += sum(anchor_count(s, plen, cfg.anchors) for s, plen in seqs)
            at = scheduled_step(step, total, time.perf_counter() - start, budget)
            for group in opt.param_groups:
                group["lr"] = lr_at(at, total, cfg)
            opt.zero_grad(set_to_none=True)
            accel.backward(loss)
            torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(loss.detach())
            spent = step < total and scheduled_step(step, total, time.perf_counter() - start, budget) >= total
            if spent:  # the budget is spent: the schedule has ended, mid-epoch
                break
        losses = torch.stack(losses).tolist()  # (waits for the epoch's last step)
        seconds = time.perf_counter() - epoch_start
        history.append({"epoch": epoch + 1, "seconds": round(seconds, 1),
                        "steps_per_second": round(len(losses) / seconds, 2), "loss": sum(losses) / max(len(losses), 1),
                        "first_loss": losses[0], "last_loss": losses[-1], "train_top1_by_slot": (hits.cpu() / max(counted, 1)).tolist(),
                        **({"stopped_after_steps": len(losses)} if spent else {})})
        say(f"epoch {epoch + 1}: mean loss {history[-1]['loss']:.4f}, {history[-1]['steps_per_second']} steps/s")
        if accel.is_main_process:  # a run its budget stopped is done: a resume finds every epoch counted
            torch.save({"block": block.state_dict(), "opt": opt.state_dict(),
                        "epoch": cfg.epochs if spent else epoch + 1, "history": history}, ckpt)
        if spent:
            say(f"block-drafter training stopped by --budget-minutes {cfg.budget_minutes} after {step} of "
                f"{total} steps (the learning rate's schedule ran to its end on the clock)")
            break
    block.eval().requires_grad_(False)
    return {"history": history, "steps": step, "planned_steps": total}


SAMPLED = 32  # anchors per answer where block_policy_data samples about `limit` of them


def sampled_answers(answers: list[tuple[list[int], int]], limit: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """Answers at random until they hold `limit` anchors at SAMPLED each: few answers go through the
    backbone, not every one for a few anchors (for the 1.5B's 100K CLP positions from 19K answers, 3 of a
    GPU round's 30 minutes)."""
    picked, held = [], 0
    for i in rng.sample(range(len(answers)), len(answers)):
        seq, plen = answers[i]
        picked.append(answers[i])
        held += min(SAMPLED, len(seq) - 1 - plen)
        if held >= limit:
            break
    return picked


@torch.inference_mode()
def block_policy_data(model, bundle, cfg: TrainConfig, run: Path, ids: list[int], *, limit: int | None = None,
                      seed: int = 0, chunk: int = 256) -> PolicyData:
    """The block drafter's outputs at answer anchors of these shards (every one, or about `limit`: SAMPLED
    anchors of each of `sampled_answers`), as policies.PolicyData: per anchor a, the backbone's last hidden state at a - 1 (what the decoder's CLP
    reads: the row whose next token is the root a), and per slot its top-1 probability, whether its argmax is
    the backbone's token, and that token's rank among its guesses."""
    block, embed, lm_head = bundle.heads, model.get_input_embeddings(), draft_head(model, bundle)
    vocab = lm_head if isinstance(lm_head, VocabSlice) else None
    answers, per_answer = usable_answers(run, ids), None
    rng, parts = random.Random(seed), []
    if limit and limit < sum(len(s) - 1 - p for s, p in answers):  # answers at random, SAMPLED anchors each
        answers, per_answer = sampled_answers(answers, limit, rng), SAMPLED
    for group in tqdm(list(batches_by_tokens(answers, 8192)), desc="block: outputs", unit="batch"):
        release_memory(embed.weight.device)
        feats, last = tapped_states(model, [s for s, _ in group], block.c.taps)
        for j, (seq, plen) in enumerate(group):
            tokens, n = torch.tensor(seq, device=feats.device), len(seq)
            for anchors in answer_anchors(n, plen, per_answer, rng).to(feats.device).split(chunk):
                logits = block.logits(embed, lm_head, tokens, feats[j, :n], anchors).float()  # (b, B-1, V')
                parts.append(outputs_row(last[j, anchors - 1].to(torch.bfloat16).cpu(), logits,
                                         block.targets(tokens, anchors), vocab))
    return PolicyData(*(torch.cat(x) for x in zip(*parts)))
