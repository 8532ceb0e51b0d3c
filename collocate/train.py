"""Self-distillation training of MTP heads, CLP and the gate baseline: one command, resumable.

    collocate train --model smollm2-135m --k 4 --samples 2000 --out runs/smollm2-k4
    accelerate launch --multi_gpu --num_processes 2 -m collocate.cli train ...   # data-parallel, same bundle
    (on CPUs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...)

Stages, each resumable after a kill:
  1. data      the backbone's own greedy answers to real prompts, in atomic shards + a manifest;
  2. features  its last hidden states over those sequences (cached on disk unless --no-cache-hidden);
  3. heads     head j at position t learns token t+j (CE, optionally + KL to the backbone), AdamW,
               warm-up then cosine; per-offset top-1/top-5 on held-out shards;
  4. policies  CLP (labels = how many leading heads agree with the backbone) and the gates (BCE).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .bundle import MTPBundle
from .clp import CLP, Gates, head_confidence


@dataclass
class TrainConfig:
    model: str
    out: str
    k: int = 4
    samples: int = 2000
    mix: tuple[str, ...] = ()
    max_new_tokens: int = 192
    max_prompt_tokens: int = 256
    gen_batch: int = 64
    gen_static: bool = False  # answers through HF's static cache: fixed shapes, so CUDA compiles it once
    shard_size: int = 128
    heldout_shards: int = 1
    epochs: int = 2
    lr: float = 1e-3
    batch: int = 512
    grad_accum: int = 1
    warmup: float = 0.05
    distill: float = 0.0  # weight of the KL term to the backbone's own distribution
    clp_features: str = "hidden"
    clp_epochs: int = 4
    policy_positions: int = 100_000  # training positions sampled for CLP and gates
    gates: bool = True
    compete: bool = False
    cache_hidden: bool = True
    budget_minutes: float | None = None
    seed: int = 0
    chat: bool = True
    prompts_file: str | None = None  # JSONL of {"prompt": ...}: your own prompts instead of ShareGPT
    only: str | None = None  # stop after this stage ("data" or "features")

    def __post_init__(self):
        self.mix = tuple(self.mix)
        if self.k < 2:
            raise ValueError(f"--k must be >= 2, got {self.k}")
        if self.samples < 2:
            raise ValueError("--samples must be at least 2")
        if self.only not in (None, "data", "features"):
            raise ValueError(f"--only takes 'data' or 'features', got {self.only!r}")
        if self.epochs < 1 or self.batch < 1 or self.grad_accum < 1:
            raise ValueError("--epochs, --batch and --grad-accum must be >= 1")

    @property
    def n_shards(self) -> int:
        return math.ceil(self.samples / self.shard_size)


# -- small helpers --------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_atomic(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank_world()[0] == 0


def say(msg: str) -> None:
    if is_main():
        tqdm.write(f"collocate train: {msg}")


# -- stage 1: self-distilled data -----------------------------------------------------------------
def prepare_prompts(cfg: TrainConfig, tokenizer, run: Path) -> list[list[int]]:
    """The encoded prompt list, fixed at the first run so a restart sees the very same one."""
    path = run / "data" / "prompts.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["settings"] != prompt_settings(cfg):
            raise ValueError(f"{run} was started with other data settings {saved['settings']}; "
                             "use another --out or the same settings")
        return saved["ids"]
    from .data import encode, suite_prompts, training_prompts

    if cfg.prompts_file:
        texts = [p.text for p in suite_prompts(cfg.prompts_file)]
    else:
        texts = training_prompts(cfg.samples * 2, mix=cfg.mix, seed=cfg.seed)  # spare for length filtering
    ids = [p for p in (encode(tokenizer, t, chat=cfg.chat) for t in texts) if len(p) <= cfg.max_prompt_tokens]
    if len(ids) < cfg.samples:
        raise ValueError(f"only {len(ids)} usable prompts for --samples {cfg.samples}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_main():
        write_atomic(path, json.dumps({"settings": prompt_settings(cfg), "ids": ids[: cfg.samples]}))
    return ids[: cfg.samples]


def prompt_settings(cfg: TrainConfig) -> dict:
    return {"model": cfg.model, "samples": cfg.samples, "mix": list(cfg.mix), "seed": cfg.seed,
            "max_prompt_tokens": cfg.max_prompt_tokens, "max_new_tokens": cfg.max_new_tokens,
            "shard_size": cfg.shard_size, "chat": cfg.chat,
            **({"prompts_file": cfg.prompts_file} if cfg.prompts_file else {})}


def shard_path(run: Path, i: int) -> Path:
    return run / "data" / f"shard-{i:05d}.safetensors"


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], cfg: TrainConfig, eos: list[int]) -> list[list[int]]:
    """Greedy answers for a batch of prompts: left padding, KV cache, cut after the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # with a static cache every batch is padded to the longest allowed prompt: one shape, one compile
    width = cfg.max_prompt_tokens if cfg.gen_static else max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    extra = {"cache_implementation": "static"} if cfg.gen_static else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad, **extra)[:, width:].tolist()
    answers = []
    for row in out:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append(row[:cut])
    return answers


def distill(model, tokenizer, cfg: TrainConfig, run: Path) -> dict:
    """Stage 1. Shards are written whole or not at all, so a restart never loses or repeats one."""
    from .decode import eos_ids

    prompts = prepare_prompts(cfg, tokenizer, run)
    rank, world = rank_world()
    mine = [i for i in range(cfg.n_shards) if i % world == rank]
    todo = [i for i in mine if not shard_path(run, i).exists()]
    eos = eos_ids(model, tokenizer)
    bar = tqdm(total=len(prompts), desc="data: answers", unit="ans", disable=not is_main(),
               initial=(cfg.n_shards - len(todo) * world) * cfg.shard_size if todo else len(prompts))
    start, new_tokens = time.perf_counter(), 0
    for i in todo:
        chunk = prompts[i * cfg.shard_size:(i + 1) * cfg.shard_size]
        order = sorted(range(len(chunk)), key=lambda j: len(chunk[j]))  # similar lengths batch together
        answers = [None] * len(chunk)
        for b in range(0, len(order), cfg.gen_batch):
            idx = order[b:b + cfg.gen_batch]
            for j, ans in zip(idx, generate_batch(model, tokenizer, [chunk[j] for j in idx], cfg, eos)):
                answers[j] = ans
            new_tokens += sum(len(answers[j]) for j in idx)
            bar.update(len(idx) * world)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
        write_shard(run, i, chunk, answers)
    bar.close()
    return write_manifest(cfg, run)


def write_shard(run: Path, i: int, prompts: list[list[int]], answers: list[list[int]]) -> None:
    seqs = [p + a for p, a in zip(prompts, answers)]
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    save_atomic({"tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
                 "offsets": offsets.to(torch.int64),
                 "prompt_lens": torch.tensor([len(p) for p in prompts], dtype=torch.int64)}, shard_path(run, i))


def read_shard(run: Path, i: int) -> list[tuple[list[int], int]]:
    """[(token ids of prompt+answer, prompt length)] of one shard."""
    t = load_file(str(shard_path(run, i)))
    toks, off, plen = t["tokens"].tolist(), t["offsets"].tolist(), t["prompt_lens"].tolist()
    return [(toks[off[j]:off[j + 1]], plen[j]) for j in range(len(plen))]


def write_manifest(cfg: TrainConfig, run: Path) -> dict:
    shards = []
    for i in range(cfg.n_shards):
        if shard_path(run, i).exists():
            seqs = read_shard(run, i)
            digest = hashlib.sha256(shard_path(run, i).read_bytes()).hexdigest()[:16]
            shards.append({"index": i, "samples": len(seqs), "answer_tokens": sum(len(s) - p for s, p in seqs),
                           "sha256": digest})
    manifest = {"settings": prompt_settings(cfg), "shards": shards,
                "samples": sum(s["samples"] for s in shards), "answer_tokens": sum(s["answer_tokens"] for s in shards),
                "complete": len(shards) == cfg.n_shards}
    if is_main():
        write_atomic(run / "data" / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


# -- stage 2: hidden-state features ---------------------------------------------------------------
@dataclass
class Features:
    hidden: torch.Tensor  # (N, d) last hidden state at answer positions t (predicting t+1)
    targets: torch.Tensor  # (N, k) tokens t+1..t+k of the backbone's own sequence, -100 past the end


@torch.inference_mode()
def shard_features(model, run: Path, i: int, k: int, *, cache: bool, batch_tokens: int = 8192) -> Features:
    path = run / "features" / f"shard-{i:05d}-k{k}.safetensors"
    if path.exists():
        return Features(**load_file(str(path)))
    for wider in sorted(run.glob(f"features/shard-{i:05d}-k*.safetensors")):  # k=2 after k=4 on the same data
        if int(wider.stem.rsplit("-k", 1)[1]) > k:
            t = load_file(str(wider))
            return Features(t["hidden"], t["targets"][:, :k].contiguous())
    hidden, targets = [], []
    seqs = read_shard(run, i)
    for b in batches_by_tokens(seqs, batch_tokens):
        hb = body_hidden(model, [s for s, _ in b])
        for (seq, plen), h in zip(b, hb):
            rows = range(plen - 1, len(seq) - 1)  # t such that t+1 is an answer token
            hidden.append(h[plen - 1:len(seq) - 1].to(torch.bfloat16).cpu())
            tgt = torch.full((len(rows), k), -100, dtype=torch.long)
            for j in range(1, k + 1):
                n = max(0, min(len(rows), len(seq) - (plen - 1) - j))
                tgt[:n, j - 1] = torch.tensor(seq[plen - 1 + j:plen - 1 + j + n])
            targets.append(tgt)
    feats = Features(torch.cat(hidden), torch.cat(targets))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(asdict(feats), path)
    return feats


def batches_by_tokens(seqs, budget: int):
    batch, longest = [], 0
    for s in sorted(seqs, key=lambda x: len(x[0])):
        longest = max(longest, len(s[0]))
        if batch and longest * (len(batch) + 1) > budget:
            yield batch
            batch, longest = [], len(s[0])
        batch.append(s)
    if batch:
        yield batch


def body_hidden(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Last-layer hidden states of each sequence (right padding; causal, so padding is harmless)."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [h[j, :len(s)] for j, s in enumerate(seqs)]


# -- stage 3: heads -------------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def head_loss(heads, offsets: list[int], lm_head, h: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
              teacher_h: torch.Tensor | None = None) -> torch.Tensor:
    """CE of every head against its offset's token; + KL to the backbone's own distribution there.

    `heads` maps (B, d) -> (B, n_heads, d): the MTPHeads module or its data-parallel wrapper."""
    logits = lm_head(heads(h).to(lm_head.weight.dtype)).float()  # (B, n_heads, V): one matmul
    tgt = targets[:, [o - 1 for o in offsets]]  # (B, n_heads)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    if cfg.distill and teacher_h is not None:
        valid = tgt.flatten() != -100
        with torch.no_grad():
            teacher = lm_head(teacher_h.to(lm_head.weight.dtype)).float().log_softmax(-1).flatten(0, 1)[valid]
        student = logits.log_softmax(-1).flatten(0, 1)[valid]
        loss = loss + cfg.distill * F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return loss


def teacher_rows(feats: Features, rows: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Hidden state at t+j-1 for each row t and head offset j (row t+j-1 of the same answer)."""
    idx = (rows[:, None] + torch.tensor(offsets)[None] - 1).clamp(max=len(feats.hidden) - 1)
    return feats.hidden[idx]


def train_heads(model, bundle: MTPBundle, cfg: TrainConfig, run: Path, train_ids: list[int], accel) -> dict:
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device
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
    steps_per_epoch = sum(math.ceil(n // accel.num_processes / cfg.batch) for n in sizes) // cfg.grad_accum
    total = max(1, steps_per_epoch * cfg.epochs)
    step, start = epoch0 * steps_per_epoch, time.perf_counter()
    rank, world = accel.process_index, accel.num_processes
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
            for rows in mine.split(cfg.batch):
                bar.update(len(rows) * world)
                h = feats.hidden[rows].to(device, torch.float32)
                th = teacher_rows(feats, rows, bundle.heads.offsets).to(device) if cfg.distill else None
                with accel.autocast():
                    loss = head_loss(heads, bundle.heads.offsets, lm_head, h, feats.targets[rows].to(device),
                                     cfg, th) / cfg.grad_accum
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


# -- stage 4: CLP and gates -----------------------------------------------------------------------
@dataclass
class PolicyData:
    hidden: torch.Tensor  # (N, d)
    conf: torch.Tensor  # (N, n_heads) top-1 probability of each head
    correct: torch.Tensor  # (N, n_heads) bool: head's argmax equals the backbone's own token
    top5: torch.Tensor  # (N, n_heads) bool: the backbone's token in the head's top 5
    valid: torch.Tensor  # (N, n_heads) bool: a target exists

    def clp_labels(self, first: int) -> torch.Tensor:
        """Number of consecutive heads (from offset 2) agreeing with the backbone: 0..k-1."""
        return self.correct[:, first:].long().cumprod(-1).sum(-1)


@torch.inference_mode()
def policy_data(model, bundle: MTPBundle, cfg: TrainConfig, run: Path, ids: list[int], *, batch: int = 1024,
                limit: int | None = None, seed: int = 0) -> PolicyData:
    """Head outputs at every position of the shards (or an even random sample of `limit` of them)."""
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device
    parts, g = [], torch.Generator().manual_seed(seed)
    per_shard = math.ceil(limit / len(ids)) if limit else None
    for i in tqdm(ids, desc="policies: head outputs", unit="shard", disable=not is_main()):
        feats = shard_features(model, run, i, cfg.k, cache=cfg.cache_hidden)
        tgt_all = feats.targets[:, [o - 1 for o in bundle.heads.offsets]]
        keep = torch.randperm(len(feats.hidden), generator=g)[:per_shard].sort().values if per_shard else \
            torch.arange(len(feats.hidden))
        for rows in keep.split(batch):
            h = feats.hidden[rows].to(device, torch.float32)
            logits = bundle.heads.logits(h, lm_head).float()
            tgt = tgt_all[rows].to(device)
            top5 = logits.topk(5, dim=-1).indices
            parts.append((feats.hidden[rows], head_confidence(logits).cpu(), (logits.argmax(-1) == tgt).cpu(),
                          (top5 == tgt[..., None]).any(-1).cpu(), (tgt != -100).cpu()))
    return PolicyData(*(torch.cat(x) for x in zip(*parts)))


def class_weights(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Relative class weights: square root of inverse frequency, normalised to mean 1 over the classes
    present. The square root keeps rare long spans from swamping the calibration the threshold rule needs."""
    counts = torch.bincount(labels, minlength=k).float()
    w = torch.where(counts > 0, (counts.sum() / (k * counts.clamp(min=1))).sqrt(), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


def train_clp(data: PolicyData, bundle: MTPBundle, features: str, cfg: TrainConfig, device="cpu") -> CLP:
    """Class-weighted CE; the weights ramp linearly from uniform to the relative weights during the
    first 30% of steps (our reading of the paper's 'relative weighting with linear warm-up').
    The data stays on the CPU; each batch goes to `device` (the accelerator, when training has one)."""
    first = 1 if bundle.heads.compete else 0
    clp = CLP(bundle.config.hidden_size, cfg.k, features=features).to(device)
    labels = data.clp_labels(first)
    target_w = class_weights(labels, cfg.k).to(device)
    opt = torch.optim.AdamW(clp.parameters(), lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    n_steps = cfg.clp_epochs * math.ceil(len(labels) / 512)
    warm = max(1, int(0.3 * n_steps))
    step = 0
    for _ in range(cfg.clp_epochs):
        for rows in torch.randperm(len(labels), generator=g).split(512):
            ramp = min(1.0, step / warm)
            w = (1 - ramp) * torch.ones(cfg.k, device=device) + ramp * target_w
            x = clp_inputs(data, rows, first, features).to(device)
            loss = F.cross_entropy(clp.linear(x), labels[rows].to(device), weight=w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = 1e-2 * 0.5 * (1 + math.cos(math.pi * step / n_steps))
            opt.step()
            step += 1
    return clp.cpu().eval()


def clp_inputs(data: PolicyData, rows, first: int, features: str) -> torch.Tensor:
    h = data.hidden[rows].float()
    return torch.cat([h, data.conf[rows, first:]], -1) if features == "hidden+conf" else h


def train_gates(data: PolicyData, bundle: MTPBundle, cfg: TrainConfig, device="cpu") -> Gates:
    """Each gate learns P(its head is right | hidden) with BCE, from the same features as CLP."""
    gates = Gates(bundle.config.hidden_size, bundle.heads.n_heads).to(device)
    opt = torch.optim.AdamW(gates.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.clp_epochs):
        for rows in torch.randperm(len(data.hidden), generator=g).split(512):
            logit = gates(data.hidden[rows].to(device).float())
            y, valid = data.correct[rows].to(device).float(), data.valid[rows].to(device)
            loss = F.binary_cross_entropy_with_logits(logit[valid], y[valid])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return gates.cpu().eval()


@torch.no_grad()
def clp_report(clp: CLP, data: PolicyData, first: int) -> dict:
    """Confusion matrix, accuracy and, per threshold, accepted lengths and the wrong share."""
    x = clp_inputs(data, slice(None), first, clp.features)
    labels = data.clp_labels(first)
    logits = clp.linear(x)
    pred = logits.argmax(-1)
    k = clp.k
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    p_at_least = logits.softmax(-1).flip(-1).cumsum(-1).flip(-1)
    thresholds = {}
    for tau in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        ok = p_at_least >= tau
        ok[:, 0] = True
        n = torch.where(ok, torch.arange(k), 0).amax(-1)
        wrong = (n - labels).clamp(min=0)
        thresholds[str(tau)] = {"mean_accepted": n.float().mean().item(),
                                "length_distribution": torch.bincount(n, minlength=k).tolist(),
                                "wrong_share": wrong.sum().item() / max(n.sum().item(), 1)}
    return {"features": clp.features, "params": sum(p.numel() for p in clp.parameters()),
            "accuracy": (pred == labels).float().mean().item(), "confusion": confusion.tolist(),
            "label_distribution": torch.bincount(labels, minlength=k).tolist(), "thresholds": thresholds}


def head_accuracy(data: PolicyData, offsets: list[int]) -> dict:
    out = {}
    for j, o in enumerate(offsets):
        v = data.valid[:, j]
        out[f"+{o}"] = {"top1": data.correct[v, j].float().mean().item(), "top5": data.top5[v, j].float().mean().item(),
                        "positions": int(v.sum())}
    return out


@torch.no_grad()
def gate_report(gates: Gates, data: PolicyData, offsets: list[int]) -> dict:
    p = gates(data.hidden.float()).sigmoid()
    return {f"+{o}": {"accuracy": ((p[:, j] >= 0.5) == data.correct[:, j])[data.valid[:, j]].float().mean().item()}
            for j, o in enumerate(offsets)}


# -- the whole pipeline ---------------------------------------------------------------------------
def run_training(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator

    from .zoo import load_backbone

    accel = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    run = Path(cfg.out) / "work"
    run.mkdir(parents=True, exist_ok=True)
    device = accel.device
    # bf16 everywhere: CPUs with AVX512-BF16/AMX run it several times faster than float32
    backbone = load_backbone(cfg.model, dtype=torch.bfloat16, device=device)
    model, tokenizer = backbone
    report = {"config": asdict(cfg), "device": device_name(device), "processes": accel.num_processes, "stages": {}}

    t0 = time.perf_counter()
    manifest = distill(model, tokenizer, cfg, run)
    accel.wait_for_everyone()
    manifest = write_manifest(cfg, run)
    report["stages"]["data"] = {"seconds": add_stage_time(run, "data", time.perf_counter() - t0),
                                "samples": manifest["samples"],
                                "answer_tokens": manifest["answer_tokens"]}
    say(f"data: {manifest['samples']} answers, {manifest['answer_tokens']} tokens")
    if cfg.only == "data":
        return report

    held = list(range(cfg.n_shards - cfg.heldout_shards, cfg.n_shards))
    train_ids = [i for i in range(cfg.n_shards) if i not in held]
    t0 = time.perf_counter()
    for i in tqdm(range(cfg.n_shards), desc="features", unit="shard", disable=not is_main()):
        if i % accel.num_processes == accel.process_index:
            shard_features(model, run, i, cfg.k, cache=cfg.cache_hidden)
    accel.wait_for_everyone()
    report["stages"]["features"] = {"seconds": add_stage_time(run, "features", time.perf_counter() - t0)}
    if cfg.only == "features":
        return report

    bundle = MTPBundle.for_backbone(model, k=cfg.k, base_model=cfg.model, has_gates=cfg.gates,
                                    compete=cfg.compete, clp_features=cfg.clp_features).to(device)
    t0 = time.perf_counter()
    report["stages"]["heads"] = {**train_heads(model, bundle, cfg, run, train_ids, accel)}
    report["stages"]["heads"]["seconds"] = add_stage_time(run, "heads", time.perf_counter() - t0)
    if accel.is_main_process:
        bundle.heads.eval()
        t0 = time.perf_counter()
        report.update(train_policies(model, bundle, cfg, run, train_ids, held))
        report["stages"]["policies"] = {"seconds": add_stage_time(run, "policies", time.perf_counter() - t0)}
        report["params"] = bundle.param_counts()
        bundle.to("cpu").save_pretrained(cfg.out)
        write_atomic(Path(cfg.out) / "train_report.json", json.dumps(report, indent=1))
        say(f"wrote {cfg.out}: heads held-out top-1 " + ", ".join(
            f"{o} {v['top1']:.1%}" for o, v in report["heldout_head_accuracy"].items()))
    accel.wait_for_everyone()
    return report


def train_policies(model, bundle, cfg, run, train_ids, held) -> dict:
    train_data = policy_data(model, bundle, cfg, run, train_ids, limit=cfg.policy_positions, seed=cfg.seed)
    held_data = policy_data(model, bundle, cfg, run, held)
    first = 1 if bundle.heads.compete else 0
    device = model.get_output_embeddings().weight.device  # small models, many steps: the accelerator pays
    out = {"heldout_head_accuracy": head_accuracy(held_data, bundle.heads.offsets),
           "train_head_accuracy": head_accuracy(train_data, bundle.heads.offsets), "clp": {}}
    for features in ("hidden", "hidden+conf"):
        clp = train_clp(train_data, bundle, features, cfg, device)
        out["clp"][features] = clp_report(clp, held_data, first)
        if features == cfg.clp_features:
            bundle.clp.load_state_dict(clp.state_dict())
    if cfg.gates:
        gates = train_gates(train_data, bundle, cfg, device)
        out["gates"] = gate_report(gates, held_data, bundle.heads.offsets)
        bundle.gates.load_state_dict(gates.state_dict())
    return out


def add_stage_time(run: Path, stage: str, seconds: float) -> float:
    """Wall time of a stage summed over every (resumed) run of it, kept in work/stage_seconds.json."""
    path = run / "stage_seconds.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = times.get(stage, 0.0) + seconds
    if is_main():
        write_atomic(path, json.dumps(times, indent=1))
    return times[stage]


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
