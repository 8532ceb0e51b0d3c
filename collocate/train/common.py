"""What every training stage shares: atomic writes (a killed run leaves whole files or none) and which
process of a data-parallel launch this is."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm


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


@functools.cache
def _malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory(device) -> None:
    """On the CPU, give the process's free heap pages back (glibc): batches of ever-different shapes scatter
    freed tensors over malloc's arenas, and without a trim per batch RSS grows batch after batch until the
    kernel kills the run (bench/README.md, sixteenth session). A GPU's tensors are not malloc's: nothing to do."""
    trim = _malloc_trim() if torch.device(device).type == "cpu" else None
    if trim is not None:
        trim(0)


def say(msg: str) -> None:
    if is_main():
        tqdm.write(f"collocate train: {msg}")


def embedding_for(embed):
    """The input embedding as a function that answers on the device of the ids it is given: with
    --device-map the embedding and the LM head (where the heads train) may sit on different GPUs."""
    where = embed.weight.device
    return lambda ids: embed(ids.to(where)).to(ids.device)
