"""The fast engine's step logic, run on the CPU without graphs, equals the eager reference."""
import shutil

import pytest
import torch

from collocate.decode import DecodeConfig, Decoder
from collocate.fast import FastDecoder, StaticLM, fast_or_eager
from conftest import randomize, tiny_llama, tiny_qwen
from test_decode import bundle_for, prompts

MODES = [("ar", None, False), ("verify", None, False), ("verify", None, True), ("verify", 0.3, True),
         ("clp", None, False), ("clp", 0.5, False), ("gate", 0.0, False), ("gate", None, False),
         ("compete", 0.0, False), ("compete", 0.5, False)]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_static_forward_matches_hf_hidden_states(make):
    model = make()
    lm = StaticLM(model, max_len=64)
    ids = torch.randint(3, 96, (10,))
    ref = model.base_model(ids[None]).last_hidden_state[0]
    torch.testing.assert_close(lm.forward(ids, torch.arange(10)), ref, rtol=1e-5, atol=1e-5)
    # the same sequence fed in pieces through the cache
    h1 = lm.forward(ids[:6], torch.arange(6))
    h2 = lm.forward(ids[6:], torch.arange(6, 10))
    torch.testing.assert_close(torch.cat([h1, h2]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
@pytest.mark.parametrize("mode,threshold,adaptive", MODES)
def test_fast_engine_equals_eager_token_for_token(make, mode, threshold, adaptive):
    model = make()
    bundle = bundle_for(model, compete=True, seed=3)
    bundle.clp = randomize(bundle.clp, seed=4, scale=20.0)  # CLP that sometimes accepts
    eager = Decoder(model, bundle=bundle, eos_token_ids=[2])
    fast = FastDecoder(model, bundle=bundle, eos_token_ids=[2], graphs=False, max_len=128)
    for p in prompts(4, seed=9):
        cfg = DecodeConfig(mode=mode, max_new_tokens=40, threshold=threshold, adaptive=adaptive)
        a, b = eager.generate(p, cfg), fast.generate(p, cfg)
        assert b.tokens == a.tokens
        for field in ("steps", "head_accepted", "head_wrong", "head_checked", "drafted", "draft_accepted"):
            assert getattr(b.stats, field) == getattr(a.stats, field), field
        assert b.proposals == a.proposals


def test_fast_or_eager_falls_back_on_cpu(llama):
    assert type(fast_or_eager(llama)) is Decoder


def test_fused_projections_leave_the_hf_model_unchanged_and_are_reused(qwen):
    ids = torch.randint(3, 96, (1, 12))
    before = qwen(ids).logits
    lm = StaticLM(qwen, max_len=32)
    torch.testing.assert_close(qwen(ids).logits, before, rtol=0, atol=0)  # same values, now views
    again = StaticLM(qwen, max_len=32)  # a second engine on the same model adds no copy
    assert again.layers[0].gate_up_w.data_ptr() == lm.layers[0].gate_up_w.data_ptr()
    assert again.layers[0].qkv_b.data_ptr() == lm.layers[0].qkv_b.data_ptr()


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_compiled_layers_give_the_same_tokens(qwen):
    """The GPU path's torch.compile, run by inductor's CPU backend: same tokens as the eager reference."""
    bundle = bundle_for(qwen, compete=True, seed=3)
    eager = Decoder(qwen, bundle=bundle, eos_token_ids=[2])
    fast = FastDecoder(qwen, bundle=bundle, eos_token_ids=[2], graphs=False, compile=True, max_len=128)
    for cfg in (DecodeConfig(mode="ar", max_new_tokens=12), DecodeConfig(mode="verify", max_new_tokens=12)):
        p = prompts(1, seed=5)[0]
        assert fast.generate(p, cfg).tokens == eager.generate(p, cfg).tokens
    assert fast.compile_on  # it compiled, and did not fall back


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
@pytest.mark.parametrize("k,candidates", [(4, 2), (4, 8), (2, 5)])
def test_verify_with_candidates_is_lossless(make, k, candidates):
    """Runner-up drafts for +2 sit in spare cache slots beside the chain; output stays ar's exactly."""
    model = make()
    bundle = bundle_for(model, k=k, seed=3)
    eager = Decoder(model, bundle=bundle, eos_token_ids=[2])
    fast = FastDecoder(model, bundle=bundle, eos_token_ids=[2], graphs=False, max_len=128)
    steps_plain = steps_wide = 0
    for p in prompts(6, seed=11):
        ar = eager.generate(p, DecodeConfig(mode="ar", max_new_tokens=60)).tokens
        plain = fast.generate(p, DecodeConfig(mode="verify", max_new_tokens=60))
        wide = fast.generate(p, DecodeConfig(mode="verify", max_new_tokens=60, candidates=candidates))
        assert wide.tokens == ar and plain.tokens == ar
        steps_plain, steps_wide = steps_plain + plain.stats.steps, steps_wide + wide.stats.steps
    assert steps_wide < steps_plain  # runner-ups were kept (random heads over 96 ids hit often enough)


def test_candidates_are_checked_by_the_fast_engine_only(llama):
    from collocate.decode import DecodeError

    bundle = bundle_for(llama, seed=3)
    with pytest.raises(DecodeError, match="fast engine"):
        Decoder(llama, bundle=bundle).generate([5, 6], DecodeConfig(mode="verify", candidates=3))
    for bad in (dict(mode="verify", candidates=0), dict(mode="clp", candidates=2),
                dict(mode="verify", adaptive=True, candidates=2), dict(mode="verify", candidates=99)):
        with pytest.raises(DecodeError):
            DecodeConfig(**bad)


def test_a_prompt_longer_than_the_fast_cache_says_how_to_fit_it(llama):
    from collocate.decode import DecodeError

    fast = FastDecoder(llama, eos_token_ids=[2], graphs=False, max_len=32)
    with pytest.raises(DecodeError, match="max_len"):
        fast.generate(list(range(3, 40)), DecodeConfig(max_new_tokens=4))
    with pytest.raises(DecodeError, match="empty prompt"):
        fast.generate([], DecodeConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_len counts cache slots"):
        FastDecoder(llama, eos_token_ids=[2], graphs=False, max_len=7)


def test_cache_slots_are_aligned_and_padding_slots_stay_unseen(llama):
    """Attention reads every slot, so their count is a multiple of SLOT_MULTIPLE; the padding slots past
    the spare ones are masked, so a cache with them gives the same tokens as the eager decoder."""
    from collocate.fast import SLOT_MULTIPLE

    lm = StaticLM(llama, 50, spare=7)
    assert lm.k_cache.shape[3] % SLOT_MULTIPLE == 0 and lm.k_cache.shape[3] >= 57
    assert lm.spare_slots.tolist() == list(range(50, 57))
    assert StaticLM(llama, 50, spare=7, slot_multiple=1).k_cache.shape[3] == 57  # as the engine was on 2026-11-29
    fast = FastDecoder(llama, eos_token_ids=[2], graphs=False, max_len=50)
    cfg = DecodeConfig(max_new_tokens=12)
    prompt = list(range(3, 20))
    assert fast.generate(prompt, cfg).tokens == Decoder(llama, eos_token_ids=[2]).generate(prompt, cfg).tokens
