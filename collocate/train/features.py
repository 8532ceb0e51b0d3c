"""Stage 2, features: the backbone's last hidden state at every answer position, and the tokens t+1..t+k
that follow it, cached per shard (a smaller k reuses a wider k's cache)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .answers import read_shard
from .common import save_atomic


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
            hidden.append(h[plen - 1:len(seq) - 1].to(torch.bfloat16).cpu())  # t such that t+1 is an answer token
            targets.append(answer_targets(seq, plen, k))
    feats = Features(torch.cat(hidden), torch.cat(targets))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(asdict(feats), path)
    return feats


def answer_targets(seq: list[int], plen: int, k: int) -> torch.Tensor:
    """(answer length, k) tokens t+1..t+k after each position t whose t+1 is an answer token, -100 past the end."""
    rows = len(seq) - plen
    tgt = torch.full((rows, k), -100, dtype=torch.long)
    for j in range(1, k + 1):
        n = max(0, rows + 1 - j)
        tgt[:n, j - 1] = torch.tensor(seq[plen - 1 + j:plen - 1 + j + n])
    return tgt


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


def padded(seqs: list[list[int]], value: int, device) -> torch.Tensor:
    """(N, longest) the sequences, right-padded with value."""
    width = max(map(len, seqs))
    return to_device(torch.tensor([s + [value] * (width - len(s)) for s in seqs]), device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without waiting: a plain copy from pageable
    memory waits for the GPU's queue to drain, so a training step built of them stalls between its parts."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def body_hidden(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Last-layer hidden states of each sequence (right padding; causal, so padding changes nothing before
    it and needs no mask)."""
    h = model.base_model(input_ids=padded(seqs, 0, model.device), use_cache=False).last_hidden_state
    return [h[j, :len(s)] for j, s in enumerate(seqs)]
