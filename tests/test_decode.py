import pytest
import torch
from transformers import DynamicCache

from collocate.bundle import MTPBundle
from collocate.decode import DecodeConfig, DecodeError
from collocate.api import Generator
from collocate.engine import build_decoder
from conftest import copy_model, randomize, tiny_llama, tiny_qwen, tiny_tokenizer, with_rank_probs


def eager(model, bundle=None, eos=(2,), tokenizer=None):
    return build_decoder(model, tokenizer, bundle, engine="eager", eos_token_ids=list(eos))


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
    dec = eager(model)
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
    dec = eager(model, bundle)
    drafted = accepted = 0
    for p in prompts(12, seed=1):
        ar = dec.generate(p, DecodeConfig(max_new_tokens=48)).tokens
        v = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=48, adaptive=adaptive))
        assert v.tokens == ar
        drafted, accepted = drafted + v.stats.drafted, accepted + v.stats.draft_accepted
    assert drafted > 0 and accepted < drafted / 2  # random heads: most drafts are rejected


def test_perfect_heads_get_drafts_accepted_and_random_heads_do_not():
    """A model that repeats its last token forever: zero-initialised heads (the identity, decoded by the
    backbone's LM head) then predict every future token right, and random heads almost never do."""
    model = copy_model()
    p = prompts(1, seed=3)[0]
    ar = eager(model).generate(p, DecodeConfig(max_new_tokens=40)).tokens
    assert set(ar) == {p[-1]}
    perfect = MTPBundle.for_backbone(model, k=4, base_model="copy")
    random = randomize(MTPBundle.for_backbone(model, k=4, base_model="copy"), seed=1, scale=4.0)
    for candidates in (1, 3):
        cfg = DecodeConfig(mode="verify", max_new_tokens=40, candidates=candidates)
        good = eager(model, perfect).generate(p, cfg)
        assert good.tokens == ar
        assert good.stats.steps == 11  # the prefill's token, then 3 drafts + 1 a step
        assert good.stats.draft_accepted == 3 * (good.stats.steps - 1) > 0
    bad = eager(model, random).generate(p, DecodeConfig(mode="verify", max_new_tokens=40))
    assert bad.tokens == ar and bad.stats.drafted > 0
    assert bad.stats.draft_accepted == 0 and bad.stats.steps == 40


def test_cache_keeps_exactly_the_accepted_tokens_at_every_step():
    """After each step the HF cache holds the prompt and every emitted token but the newest, exactly as a
    fresh forward over them gives it: rejected drafts, candidates and tree branches leave no trace."""
    model = tiny_llama()
    for candidates, tree in ((1, None), (4, None), (1, 20)):
        dec = eager(model, with_rank_probs(bundle_for(model, seed=2)))
        p = prompts(1)[0]
        cfg = DecodeConfig(mode="verify", max_new_tokens=30, candidates=candidates, tree_size=tree)
        out, steps = [], dec.stream(p, cfg)
        for chunk in steps:
            out += chunk
            if len(out) == 30:  # the last step's tokens may be cut by the budget, not its cache
                break
            cache, fed = dec.backend.cache, p + out[:-1]
            assert cache.get_seq_length() == len(fed)
            ref = DynamicCache(config=model.config)
            model.model(torch.tensor([fed]), use_cache=True, **{dec.backend.cache_kw: ref})
            for layer, want in zip(cache.layers, ref.layers):
                torch.testing.assert_close(layer.keys, want.keys, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.values, want.values, rtol=1e-5, atol=1e-5)


def test_stop_strings_end_the_answer_at_the_same_token_in_every_mode():
    """The answer ends with the token that completes a stop string, whichever step brought it; the text
    ends before the stop string."""
    model, tok = tiny_llama(tie=False), tiny_tokenizer()  # (tied, the tiny Llama soon repeats one token)
    p = prompts(1, seed=0)[0]
    free = eager(model, eos=()).generate(p, DecodeConfig(max_new_tokens=30)).tokens
    i = next(i for i in range(6, 30) if tok.decode(free[i - 1:i + 1]) not in tok.decode(free[:i]))
    stop = tok.decode(free[i - 1:i + 1])  # two words, seen first at tokens i-1, i
    want = tok.decode(free[: i + 1])
    for mode, candidates in (("ar", 1), ("verify", 1), ("verify", 3)):
        dec = eager(model, bundle_for(model, seed=2), eos=(), tokenizer=tok)
        r = dec.generate(p, DecodeConfig(mode=mode, max_new_tokens=30, stop=(stop,), candidates=candidates))
        assert (r.finish_reason, r.tokens, r.text) == ("stop", free[: i + 1], want[: want.index(stop)])
        streamed = Generator(dec).stream(p, DecodeConfig(mode=mode, max_new_tokens=30, stop=(stop,),
                                                         candidates=candidates))
        assert "".join(streamed) == r.text  # the stream holds back what a stop string could still claim
    r = dec.generate(p, DecodeConfig(mode="clp", threshold=0.0, max_new_tokens=30, stop=(stop,)))
    assert r.finish_reason != "stop" or stop in tok.decode(r.tokens) and stop not in tok.decode(r.tokens[:-1])


def test_eos_inside_accepted_span_is_cut():
    model = tiny_llama()
    p = prompts(1, seed=5)[0]
    free = eager(model, eos=()).generate(p, DecodeConfig(max_new_tokens=30)).tokens
    eos = free[7]  # pretend a token the model emits mid-stream is EOS
    for mode in ("ar", "verify", "clp", "gate"):
        dec = eager(model, MTPBundle.for_backbone(model, k=4, base_model="t", has_gates=True), eos=(eos,))
        r = dec.generate(p, DecodeConfig(mode=mode, max_new_tokens=30, threshold=0.0 if mode == "gate" else None))
        assert r.finish_reason == "eos" and r.tokens[-1] == eos and eos not in r.tokens[:-1]


def test_max_new_tokens_honoured_in_multi_token_steps():
    model = tiny_llama()
    dec = eager(model, MTPBundle.for_backbone(model, k=4, base_model="t", has_gates=True), eos=())
    for mode in ("ar", "verify", "clp", "gate"):
        for n in (1, 5, 7):
            r = dec.generate(prompts(1)[0], DecodeConfig(mode=mode, max_new_tokens=n, threshold=0.0))
            assert len(r.tokens) == n and r.finish_reason == "length"


def test_unverified_modes_count_wrong_head_tokens():
    model = tiny_llama()
    dec = eager(model, bundle_for(model, compete=True))
    for mode in ("gate", "compete"):
        r = dec.generate(prompts(1)[0], DecodeConfig(mode=mode, max_new_tokens=40, threshold=0.0))
        assert r.stats.head_accepted > 0 and r.stats.head_checked > 0
        assert 0.5 < r.stats.wrong_share <= 1.0  # random heads are mostly wrong
        assert r.stats.tau > 1.0


def test_clear_errors(llama):
    plain = MTPBundle.for_backbone(llama, k=4, base_model="tiny")
    dec = eager(llama, plain)
    with pytest.raises(DecodeError, match="empty prompt"):
        dec.generate([], DecodeConfig())
    with pytest.raises(DecodeError, match="does not fit the model's context of 256"):
        dec.generate([5] * 300, DecodeConfig())
    with pytest.raises(DecodeError, match="needs gates"):
        dec.generate([5], DecodeConfig(mode="gate"))
    with pytest.raises(DecodeError, match="needs an MTP bundle"):
        eager(llama).generate([5], DecodeConfig(mode="clp"))
    with pytest.raises(DecodeError, match="unknown mode"):
        DecodeConfig(mode="fast")
    with pytest.raises(DecodeError, match="mode .verify. only"):
        DecodeConfig(mode="clp", adaptive=True)
    with pytest.raises(DecodeError, match=r"threshold must lie in \[0, 1\]"):
        DecodeConfig(mode="clp", threshold=1.5)
