"""CUDA graph capture and replay, and steps queued ahead, against the eager loop: what the CPU tests cannot
run (they drive the fast backend without graphs). bench/cuda_check.py is the wider GPU check."""
import pytest
import torch

from collocate.bundle import MTPBundle
from collocate.decode import DecodeConfig
from collocate.engine import build_decoder
from conftest import randomize, tiny_llama, with_rank_probs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA device (this machine has none); on a GPU this "
                                       "test and bench/cuda_check.py run the captured steps")


def test_captured_and_queued_steps_give_the_eager_loops_tokens():
    model = tiny_llama().cuda()
    bundle = with_rank_probs(randomize(MTPBundle.for_backbone(model, k=4, base_model="tiny", has_gates=True),
                                       seed=3, scale=4.0))
    eager = build_decoder(model, bundle=bundle, engine="eager", eos_token_ids=[2], overlap=False)
    fast = build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[2], max_len=256, overlap=True)
    assert fast.backend.captures
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (1, 17, 90)]
    for kw in (dict(), dict(mode="verify"), dict(mode="verify", tree_size=16), dict(mode="clp", threshold=0.5),
               dict(mode="verify", temperature=0.8, seed=1, tree_size=16)):
        cfg = DecodeConfig(max_new_tokens=40, **kw)
        for p in prompts:
            a, b = eager.generate(p, cfg), fast.generate(p, cfg)
            assert b.tokens == a.tokens and b.stats.counts() == a.stats.counts(), (kw, len(p))
    assert len(fast.backend.graphs) > 0  # it replayed graphs, not plain steps


def test_block_drafter_in_captured_steps_gives_the_eager_loops_tokens():
    """The block drafter's context cache is written and read inside the compiled, captured step."""
    from test_block import block_bundle

    model = tiny_llama()
    bundle = block_bundle(model)
    model = model.cuda()
    eager = build_decoder(model, bundle=bundle, engine="eager", eos_token_ids=[2], overlap=False)
    fast = build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[2], max_len=256, overlap=True)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (1, 17, 90)]
    for kw in (dict(mode="verify"), dict(mode="verify", tree_size=12), dict(mode="verify", temperature=0.8, seed=1)):
        cfg = DecodeConfig(max_new_tokens=40, **kw)
        for p in prompts:
            a, b = eager.generate(p, cfg), fast.generate(p, cfg)
            assert b.tokens == a.tokens and b.stats.counts() == a.stats.counts() and b.proposals == a.proposals, (kw, len(p))


def test_no_request_captures_after_prepare():
    model = tiny_llama().cuda()
    model.config.max_position_embeddings = 1100  # (its rotary tables do not depend on it) prompts of several pieces
    bundle = with_rank_probs(randomize(MTPBundle.for_backbone(model, k=4, base_model="tiny", has_gates=True),
                                       seed=3, scale=4.0))
    fast = build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[], max_len=1100, overlap=True)
    base = torch.randint(3, 96, (1100,), generator=torch.Generator().manual_seed(2)).tolist()
    for cfg in (DecodeConfig(max_new_tokens=16), DecodeConfig(mode="verify", tree_size=16, max_new_tokens=16)):
        fast.prepare(cfg)
        graphs = len(fast.backend.graphs)
        for n in (1, 100, 511, 512, 513, 1024, 1025, 1090):
            fast.generate(base[:n], cfg)
        assert len(fast.backend.graphs) == graphs, cfg
