"""Tiny randomly initialised models built in code: the unit tests run on these in seconds."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


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


def randomize(module, seed=0, scale=0.5):
    """Give a zero-initialised module random weights, so heads disagree with the backbone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(p.shape[-1], 1) ** 0.5)
    return module


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def qwen():
    return tiny_qwen()
