import pytest
import torch
from transformers import DynamicCache

from collocate.bundle import MTPBundle
from collocate.decode import DecodeConfig, DecodeError, Decoder
from conftest import randomize, tiny_llama, tiny_qwen


def bundle_for(model, k=4, gates=True, compete=False, seed=0):
    b = MTPBundle.for_backbone(model, k=k, base_model="tiny", has_gates=gates, compete=compete)
    return randomize(b, seed=seed, scale=4.0)


def prompts(n, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_ar_equals_hf_generate(make):
    model = make()
    dec = Decoder(model, eos_token_ids=[2])
    for p in prompts(6):
        ours = dec.generate(p, DecodeConfig(max_new_tokens=40)).tokens
        ref = model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(p):].tolist()
        assert ours == ref


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
@pytest.mark.parametrize("adaptive", [False, True])
def test_verify_is_lossless_with_random_heads(make, adaptive):
    model = make()
    bundle = bundle_for(model)
    dec = Decoder(model, bundle=bundle, eos_token_ids=[2])
    drafted = accepted = 0
    for p in prompts(12, seed=1):
        ar = dec.generate(p, DecodeConfig(max_new_tokens=48)).tokens
        v = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=48, adaptive=adaptive))
        assert v.tokens == ar
        drafted, accepted = drafted + v.stats.drafted, accepted + v.stats.draft_accepted
    assert drafted > 0 and accepted < drafted / 2  # random heads: most drafts are rejected


def test_verify_accepts_drafts_from_perfect_heads():
    """Zero-init heads copy the backbone's next-token guess: on a repeating sequence they hit."""
    model = tiny_llama()
    dec = Decoder(model, bundle=MTPBundle.for_backbone(model, k=3, base_model="tiny"), eos_token_ids=[2])
    p = prompts(1, seed=3)[0]
    v = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=60))
    assert v.tokens == dec.generate(p, DecodeConfig(max_new_tokens=60)).tokens
    assert v.stats.steps <= v.stats.new_tokens


def layer_keys(cache, i):
    return cache.layers[i].keys


def test_cache_rollback_exact_at_every_step():
    model = tiny_llama()
    dec = Decoder(model, bundle=bundle_for(model, seed=2), eos_token_ids=[2])
    seen = []

    def check(cache, tokens):
        fed = tokens[:-1]  # the newest token has not been fed yet
        assert cache.get_seq_length() == len(fed)
        ref = DynamicCache(config=model.config)
        model.model(torch.tensor([fed]), use_cache=True, **{Decoder(model).cache_kw: ref})
        for i in range(model.config.num_hidden_layers):
            torch.testing.assert_close(layer_keys(cache, i), layer_keys(ref, i), rtol=1e-5, atol=1e-5)
        seen.append(len(tokens))

    result = dec.generate(prompts(1)[0], DecodeConfig(mode="verify", max_new_tokens=30), on_step=check)
    assert len(seen) == result.stats.steps and result.stats.drafted > result.stats.draft_accepted


def test_eos_inside_accepted_span_is_cut():
    model = tiny_llama()
    p = prompts(1, seed=5)[0]
    free = Decoder(model, eos_token_ids=[]).generate(p, DecodeConfig(max_new_tokens=30)).tokens
    eos = free[7]  # pretend a token the model emits mid-stream is EOS
    for mode in ("ar", "verify", "clp", "gate"):
        dec = Decoder(model, bundle=MTPBundle.for_backbone(model, k=4, base_model="t", has_gates=True),
                      eos_token_ids=[eos])
        r = dec.generate(p, DecodeConfig(mode=mode, max_new_tokens=30, threshold=0.0 if mode == "gate" else None))
        assert r.finish_reason == "eos" and r.tokens[-1] == eos and eos not in r.tokens[:-1]


def test_max_new_tokens_honoured_in_multi_token_steps():
    model = tiny_llama()
    dec = Decoder(model, bundle=MTPBundle.for_backbone(model, k=4, base_model="t", has_gates=True),
                  eos_token_ids=[])
    for mode in ("ar", "verify", "clp", "gate"):
        for n in (1, 5, 7):
            r = dec.generate(prompts(1)[0], DecodeConfig(mode=mode, max_new_tokens=n, threshold=0.0))
            assert len(r.tokens) == n and r.finish_reason == "length"


def test_unverified_modes_count_wrong_head_tokens():
    model = tiny_llama()
    dec = Decoder(model, bundle=bundle_for(model, compete=True), eos_token_ids=[2])
    for mode in ("gate", "compete"):
        r = dec.generate(prompts(1)[0], DecodeConfig(mode=mode, max_new_tokens=40, threshold=0.0))
        assert r.stats.head_accepted > 0 and r.stats.head_checked > 0
        assert 0.5 < r.stats.wrong_share <= 1.0  # random heads are mostly wrong
        assert r.stats.tau > 1.0


def test_clear_errors(llama):
    plain = MTPBundle.for_backbone(llama, k=4, base_model="tiny")
    dec = Decoder(llama, bundle=plain, eos_token_ids=[2])
    with pytest.raises(DecodeError, match="empty prompt"):
        dec.generate([], DecodeConfig())
    with pytest.raises(DecodeError, match="does not fit the model's context of 256"):
        dec.generate([5] * 300, DecodeConfig())
    with pytest.raises(DecodeError, match="needs gates"):
        dec.generate([5], DecodeConfig(mode="gate"))
    with pytest.raises(DecodeError, match="needs an MTP bundle"):
        Decoder(llama).generate([5], DecodeConfig(mode="clp"))
    with pytest.raises(DecodeError, match="unknown mode"):
        DecodeConfig(mode="fast")
    with pytest.raises(DecodeError, match="mode .verify. only"):
        DecodeConfig(mode="clp", adaptive=True)
    with pytest.raises(DecodeError, match=r"threshold must lie in \[0, 1\]"):
        DecodeConfig(mode="clp", threshold=1.5)
