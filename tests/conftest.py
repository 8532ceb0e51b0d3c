"""Tiny randomly initialised models built in code: the unit tests run on these in seconds."""
import importlib.util
import os
import sys
from pathlib import Path

# `make test` runs one worker a core (pytest-xdist): each takes its share of the cores, and so do the
# commands the tests start, instead of every worker's torch spreading over all of them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # (as xdist counts)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

if WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tiny_llama(seed=0, vocab=96, hidden=32, tie=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def tiny_qwen(seed=0, vocab=96, hidden=32):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False)


def copy_model():
    """A tiny Llama that repeats its last token forever: attention and MLP add nothing, and the tied
    embedding rows have one norm, so each position's logits peak at its own token."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = model.model.embed_tokens.weight
        e.copy_(torch.nn.functional.normalize(torch.randn(e.shape), dim=-1))
    return model


def randomize(module, seed=0, scale=0.5):
    """Give a zero-initialised module random weights, so heads disagree with the backbone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(p.shape[-1], 1) ** 0.5)
    return module


def with_rank_probs(bundle, probs=(0.3, 0.1, 0.08, 0.06, 0.05, 0.04)):
    """What a training report gives `--tree`: each head's held-out hit rate per rank."""
    bundle.heldout = {f"+{o}": {"top1": probs[0], "top5": sum(probs[:5]), "rank_probs": list(probs)}
                      for o in range(2, bundle.k + 1)}
    return bundle


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def qwen():
    return tiny_qwen()


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 96 ids: 'w3 w17 ...' <-> [3, 17, ...]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 96)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny(path, seed=0):
    """A tiny Llama + tokenizer saved as a local HF folder, loadable by load_backbone."""
    model = tiny_llama(seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def write_prompts(path, n, seed=0):
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(2, 9)))}) + "\n")
    return str(path)


def bench_script(name: str):
    """A script of bench/ (not a package) as a module, e.g. bench_script("frontier")."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    return module


class Server:
    """uvicorn in a thread, on a free port; stopped as SIGTERM would stop it (graceful shutdown)."""

    def __init__(self, app):
        import socket
        import threading
        import time

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
