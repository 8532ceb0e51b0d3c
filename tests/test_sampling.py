"""Sampling: temperature 0 is greedy; `verify` with speculative sampling draws from `ar`'s distribution
(a chi-square test at a stated level, which a deliberately wrong acceptance rule fails); seeds repeat."""
import pytest
import torch

import collocate.step
from collocate.bundle import MTPBundle
from collocate.decode import DecodeConfig, DecodeError
from collocate.rules import draw
from conftest import copy_model, tiny_llama, with_rank_probs
from test_decode import eager, prompts
from test_fast import fast

ALPHA = 1e-3  # significance level of each comparison (Bonferroni over the positions compared)
RUNS = 400
NEW = 4


def chi2_pvalue(a: list[int], b: list[int]) -> float:
    """Two-sample chi-square test of equal distributions; categories with fewer than 10 expected in
    either sample are pooled into one."""
    cats = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(c) for c in cats], [b.count(c) for c in cats]], dtype=torch.float64)
    small = counts.sum(0) < 20
    if small.any():
        counts = torch.cat([counts[:, ~small], counts[:, small].sum(1, keepdim=True)], 1)
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = counts.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def samples(dec, cfg_kw: dict, prompt: list[int], seeds) -> list[list[int]]:
    return [dec.generate(prompt, DecodeConfig(max_new_tokens=NEW, seed=s, **cfg_kw)).tokens for s in seeds]


def distributions_match(a, b) -> bool:
    pvalues = [chi2_pvalue([x[j] for x in a], [x[j] for x in b]) for j in range(1, NEW)]
    return min(pvalues) > ALPHA / (NEW - 1)


@pytest.fixture(scope="module")
def setting():
    """A model that mostly repeats its last token (at temperature 1 about 63% of the mass), and heads
    that guess it: most drafts are kept, and the rejected ones test the residual draw."""
    model = copy_model()
    bundle = with_rank_probs(MTPBundle.for_backbone(model, k=4, base_model="copy"))
    dec = eager(model, bundle, eos=())  # no end token: every answer has NEW tokens
    prompt = prompts(1, seed=3)[0]
    ar = samples(dec, dict(mode="ar", temperature=1.0), prompt, range(RUNS))
    return dec, prompt, ar


@pytest.mark.parametrize("extra", [dict(), dict(tree_size=10), dict(candidates=4)])
def test_verify_samples_from_ars_distribution(setting, extra):
    dec, prompt, ar = setting
    v = samples(dec, dict(mode="verify", temperature=1.0, **extra), prompt, range(RUNS, 2 * RUNS))
    assert sum(len(x) for x in v) == RUNS * NEW
    assert distributions_match(ar, v)


def from_full_distribution(probs, fed, tree, row, u):
    """A wrong rule: the token after a rejection drawn from the full distribution, not the residual."""
    return draw(probs.index_select(0, row)[0], u)


def test_a_wrong_acceptance_rule_fails_the_test(setting, monkeypatch):
    """Drawing the token after a rejection from the full distribution (not the residual) over-weights the
    drafts: the same test rejects it."""
    dec, prompt, ar = setting
    monkeypatch.setattr(collocate.step, "residual_draw", from_full_distribution)
    v = samples(dec, dict(mode="verify", temperature=1.0), prompt, range(RUNS, 2 * RUNS))
    assert not distributions_match(ar, v)


def test_temperature_zero_is_greedy_and_seeds_repeat():
    model = tiny_llama()
    bundle = with_rank_probs(MTPBundle.for_backbone(model, k=4, base_model="t"))
    ref, dec = eager(model, bundle), fast(model, bundle)
    for p in prompts(3, seed=4):
        greedy = ref.generate(p, DecodeConfig(max_new_tokens=24)).tokens
        assert ref.generate(p, DecodeConfig(max_new_tokens=24, temperature=0.0, seed=5)).tokens == greedy
        for extra in (dict(mode="ar"), dict(mode="verify"), dict(mode="verify", tree_size=12, top_k=30, top_p=0.9)):
            cfg = DecodeConfig(max_new_tokens=24, temperature=0.9, seed=11, **extra)
            a, b = ref.generate(p, cfg), dec.generate(p, cfg)
            assert a.tokens == b.tokens == ref.generate(p, cfg).tokens  # same seed, same answer, both backends
            assert a.tokens != ref.generate(p, DecodeConfig(max_new_tokens=24, temperature=0.9, seed=12,
                                                            **extra)).tokens


def test_top_k_and_top_p_restrict_the_draw():
    from collocate.rules import Sampling, filtered_probs

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    s = lambda k, p: Sampling(torch.tensor(1.0), torch.tensor(k), torch.tensor(p), torch.tensor(0), torch.tensor(0))  # noqa: E731
    assert (filtered_probs(logits, s(2, 1.0), use_top_k=True, use_top_p=False)[0] > 0).tolist() == [1, 1, 0, 0, 0]
    full = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = filtered_probs(logits, s(0, 0.8), use_top_k=False, use_top_p=True)[0] > 0
    assert kept.tolist() == [1, 1, 0, 0, 0] and full[:1].sum() < 0.8 <= full[:2].sum()
    for bad, match in ((dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k")):
        with pytest.raises(DecodeError, match=match):
            DecodeConfig(**bad)


@pytest.fixture(scope="module")
def block_setting(setting):
    """The same model and ar samples, with a block drafter trained a little on answers sampled from the prompt
    (so its drafts are often kept, and the rejected ones test the residual draw)."""
    from test_block import block_bundle

    dec, prompt, ar = setting
    model = dec.backend.model
    return eager(model, block_bundle(model, prompt=prompt, answers=64, steps=300), eos=()), prompt, ar


@pytest.mark.parametrize("extra", [dict(), dict(tree_size=10)])
def test_verify_with_a_block_drafter_samples_from_ars_distribution(block_setting, extra):
    dec, prompt, ar = block_setting
    v = samples(dec, dict(mode="verify", temperature=1.0, **extra), prompt, range(RUNS, 2 * RUNS))
    assert distributions_match(ar, v)


def test_a_wrong_acceptance_rule_fails_with_a_block_drafter(block_setting, monkeypatch):
    dec, prompt, ar = block_setting
    monkeypatch.setattr(collocate.step, "residual_draw", from_full_distribution)
    v = samples(dec, dict(mode="verify", temperature=1.0), prompt, range(RUNS, 2 * RUNS))
    assert not distributions_match(ar, v)
