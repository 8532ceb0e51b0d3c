"""Stage 4, policies: the CLP (labels: how many leading heads agree with the backbone) and the gate
baseline (BCE per head), from the frozen heads' outputs; held-out reports for both."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bundle import MTPBundle
from ..clp import CLP, CLP_FEATURES, Gates, head_confidence
from ..draft import best_paths
from ..heads import VocabSlice
from ..rules import leading_true, span_at_threshold
from .common import embedding_for, is_main
from .config import TrainConfig
from .features import shard_features

RANKS = 10  # guesses per head whose hit rates the report keeps (what the draft tree is chosen from)
# CLP thresholds the held-out report calibrates (what --max-wrong chooses from); fine near 1, where the
# wrong share falls below a few percent if anywhere
CALIBRATION = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


@dataclass
class PolicyData:
    hidden: torch.Tensor  # (N, d)
    conf: torch.Tensor  # (N, n_heads) top-1 probability of each head
    correct: torch.Tensor  # (N, n_heads) bool: head's argmax equals the backbone's own token
    top5: torch.Tensor  # (N, n_heads) bool: the backbone's token in the head's top 5
    valid: torch.Tensor  # (N, n_heads) bool: a target exists
    rank: torch.Tensor | None = None  # (N, n_heads) the backbone's token's rank in the head's top RANKS, else RANKS

    def clp_labels(self, first: int) -> torch.Tensor:
        """Number of consecutive heads (from offset 2) agreeing with the backbone: 0..k-1."""
        return leading_true(self.correct[:, first:])


@torch.inference_mode()
def policy_data(model, bundle: MTPBundle, cfg: TrainConfig, run: Path, ids: list[int], *, batch: int = 1024,
                limit: int | None = None, seed: int = 0) -> PolicyData:
    """Head outputs at every position of the shards (or an even random sample of `limit` of them)."""
    lm_head, embed = model.get_output_embeddings(), embedding_for(model.get_input_embeddings())
    device = lm_head.weight.device
    vocab = None  # a draft vocabulary: guesses from its tokens only, as in decoding
    if bundle.draft_ids is not None:
        vocab = lm_head = VocabSlice(lm_head, bundle.draft_ids)
    parts, g = [], torch.Generator().manual_seed(seed)
    per_shard = math.ceil(limit / len(ids)) if limit else None
    for i in tqdm(ids, desc="policies: head outputs", unit="shard", disable=not is_main()):
        feats = shard_features(model, run, i, cfg.k, cache=cfg.cache_hidden)
        tgt_all = feats.targets[:, [o - 1 for o in bundle.heads.offsets]]
        keep = torch.randperm(len(feats.hidden), generator=g)[:per_shard].sort().values if per_shard else \
            torch.arange(len(feats.hidden))
        for rows in keep.split(batch):
            h = feats.hidden[rows].to(device, torch.float32)
            chosen = feats.targets[rows, : bundle.k - 1].to(device)  # y_1..y_{k-1}: what token-conditioned heads see
            logits = bundle.heads.logits(h, lm_head, tokens=chosen, embed=embed).float()  # (B, n_heads, V')
            parts.append(outputs_row(feats.hidden[rows], logits, tgt_all[rows].to(device), vocab))
    return PolicyData(*(torch.cat(x) for x in zip(*parts)))


def outputs_row(hidden: torch.Tensor, logits: torch.Tensor, tgt: torch.Tensor, vocab: VocabSlice | None) -> tuple:
    """PolicyData's fields for some positions: their hidden states, and from the drafter's logits (B, n, V') at
    them and the backbone's tokens tgt (B, n; -100: none) each guess's confidence, hit and rank."""
    if vocab is not None:  # positions in the draft vocabulary; a token outside it (-1) is a miss
        tgt = torch.where(tgt >= 0, vocab.local(tgt).clamp(min=-1), tgt)
    hit = logits.topk(RANKS, dim=-1).indices == tgt[..., None]  # (B, n, RANKS)
    rank = torch.where(hit.any(-1), hit.long().argmax(-1), RANKS)
    return (hidden, head_confidence(logits).cpu(), (rank == 0).cpu(), (rank < 5).cpu(), (tgt != -100).cpu(),
            rank.to(torch.int8).cpu())


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
    thresholds = {}
    for tau in CALIBRATION:
        n = span_at_threshold(logits, tau)
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
        if data.rank is not None:  # P(the backbone's token is the head's r-th guess), r < RANKS: what trees are built from
            out[f"+{o}"]["rank_probs"] = (torch.bincount(data.rank[v, j].long(), minlength=RANKS + 1)[:RANKS]
                                          / max(int(v.sum()), 1)).tolist()
    return out


PATHS = 256  # rank paths a bundle keeps, best first: trees of up to MAX_TREE nodes, cut to any depth


def path_shares(data: PolicyData, offsets: list[int]) -> dict[tuple[int, ...], float]:
    """For each rank path (r2, r3, ...) that is right at some held-out anchor, the share of anchors where it
    is: the backbone's token at +2 is the drafter's r2-th guess there, at +3 its r3-th, and so on, which is
    what accepting that tree node takes. Counted, not multiplied: a slot is right more often where the slot
    before it was (easy stretches of text), which a product of per-slot rates (draft.best_paths) misses. A
    path's share is over the anchors whose slot at its depth has a token, and never above its parent's."""
    cols = [j for j, o in enumerate(offsets) if o >= 2]
    counts: dict[tuple[int, ...], int] = {}
    for ranks, valid in zip(data.rank[:, cols].tolist(), data.valid[:, cols].tolist()):
        path = ()
        for r, v in zip(ranks, valid):
            if not v or r >= RANKS:
                break
            path += (r,)
            counts[path] = counts.get(path, 0) + 1
    den = data.valid[:, cols].sum(0).clamp(min=1).tolist()
    shares = {}
    for path in sorted(counts, key=len):  # parents first
        share = counts[path] / den[len(path) - 1]
        shares[path] = min(share, shares[path[:-1]]) if len(path) > 1 else share
    return shares


def heldout_paths(shares: dict[tuple[int, ...], float], n: int = PATHS) -> list[tuple[int, ...]]:
    """The n paths with the largest shares, best first (a parent before its children: never a smaller
    share, and shorter at a tie), so that the first N of them, or those of them at most D deep, are the
    N-node tree (of depth D) with the most accepted drafts on the held-out anchors."""
    return sorted(shares, key=lambda p: (-shares[p], len(p), p))[:n]


def tree_drafts(shares: dict[tuple[int, ...], float], rank_probs: list[list[float]],
                sizes=(16, 32, 48, 64), depths=(None, 3)) -> dict:
    """Drafts accepted per step on the held-out anchors by the tree of each size (and depth) chosen from the
    counted paths, against the one chosen from per-slot rates (draft.best_paths), both counted."""
    paths, out = heldout_paths(shares, len(shares)), {}
    for depth in depths:
        for n in sizes:
            counted = [p for p in paths if depth is None or len(p) <= depth][:n]
            product = best_paths(rank_probs[:depth] if depth else rank_probs, n)
            out[f"t{n}" + (f"d{depth}" if depth else "")] = {"counted": sum(shares[p] for p in counted),
                                                             "per_slot_product": sum(shares.get(p, 0.0) for p in product)}
    return out


@torch.no_grad()
def gate_report(gates: Gates, data: PolicyData, offsets: list[int]) -> dict:
    p = gates(data.hidden.float()).sigmoid()
    return {f"+{o}": {"accuracy": ((p[:, j] >= 0.5) == data.correct[:, j])[data.valid[:, j]].float().mean().item()}
            for j, o in enumerate(offsets)}


def train_policies(model, bundle, cfg, run, train_ids, held, *, outputs=None) -> dict:
    """outputs: the function that gives the drafter's outputs as PolicyData (policy_data: the heads')."""
    outputs = outputs or policy_data
    train_data = outputs(model, bundle, cfg, run, train_ids, limit=cfg.policy_positions, seed=cfg.seed)
    held_data = outputs(model, bundle, cfg, run, held)
    first = 1 if bundle.heads.compete else 0
    device = model.get_output_embeddings().weight.device  # small models, many steps: the accelerator pays
    out = {"heldout_head_accuracy": head_accuracy(held_data, bundle.heads.offsets),
           "train_head_accuracy": head_accuracy(train_data, bundle.heads.offsets), "clp": {}}
    bundle.heldout = out["heldout_head_accuracy"]  # (what `rank_probs` reads, as a saved bundle's report)
    if held_data.rank is not None:  # the draft tree: rank paths counted on the held-out anchors
        shares = path_shares(held_data, bundle.heads.offsets)
        out["heldout_paths"] = [list(p) for p in heldout_paths(shares)]
        out["heldout_tree_drafts"] = tree_drafts(shares, bundle.rank_probs())
    for features in CLP_FEATURES:  # the bundle carries each; cfg.clp_features is its default
        clp = train_clp(train_data, bundle, features, cfg, device)
        out["clp"][features] = clp_report(clp, held_data, first)
        bundle.clp_for(features).load_state_dict(clp.state_dict())
    if cfg.gates:
        gates = train_gates(train_data, bundle, cfg, device)
        out["gates"] = gate_report(gates, held_data, bundle.heads.offsets)
        bundle.gates.load_state_dict(gates.state_dict())
    return out
