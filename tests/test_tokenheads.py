"""Token-conditioned heads (heads.TokenHeads) as a drafter, draft trees from the bundle, and --exact."""
import shutil
from collections import Counter

import pytest
import torch

from collocate.bundle import BundleError, MTPBundle
from collocate.decode import EXACT_WIDTH, DecodeConfig, DecodeError
from collocate.draft import DraftTree, HeadDrafter, TokenDrafter, top_indices
from collocate.heads import TokenHeads
from conftest import copy_model, randomize, tiny_llama, tiny_qwen, with_rank_probs
from test_decode import eager, prompts
from test_fast import fast, same_stats


def tc_bundle(model, design="tc-depth", *, vocab=0, seed=1, k=4):
    b = MTPBundle.for_backbone(model, k=k, base_model="tiny", has_gates=True, drafter=design, draft_vocab=vocab)
    randomize(b, seed=seed, scale=4.0)
    if vocab:  # a draft vocabulary that leaves some tokens out
        b.draft_ids.copy_(torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(seed))[:vocab])
    return with_rank_probs(b)


def walk(bundle, model, h, root, path):
    """Slow reference: the token at a rank path, one state update per step along it."""
    lm, embed, heads = model.get_output_embeddings(), model.get_input_embeddings(), bundle.heads
    s, tok = h, root
    for depth, rank in enumerate(path):
        s = heads.update(s[None], embed(tok.view(1)), depth)[0].to(h.dtype)
        logits = lm(s)
        if bundle.draft_ids is not None:
            outside = torch.ones_like(logits, dtype=torch.bool)
            outside[bundle.draft_ids] = False
            logits = logits.masked_fill(outside, float("-inf"))
        tok = logits.topk(rank + 1).indices[rank]
    return int(tok)


@pytest.mark.parametrize("design,vocab", [("tc-depth", 0), ("tc-shared", 0), ("tc-shared", 50), ("tc-wide", 50)])
def test_token_drafter_equals_a_walk_along_each_path(design, vocab):
    """The depth-by-depth batched drafter gives every node the token a walk down its own path gives."""
    model = tiny_llama()
    bundle = tc_bundle(model, design, vocab=vocab)
    drafter = TokenDrafter(bundle, model.get_output_embeddings(), model.get_input_embeddings())
    tree = drafter.tree(nodes=30)  # no stored tree: the best 30 nodes from the rank statistics
    h, root = torch.randn(32), torch.tensor(7)
    draft = drafter.propose(tree.tensors(h.device), h=h, root=root)
    rows = rank_paths(tree)
    for i, path in enumerate(rows):
        assert int(draft.tokens[i]) == walk(bundle, model, h, root, path), (i, path)


@pytest.mark.parametrize("v", [32768, 151936, 50, 7])
def test_top_k_in_two_rounds_is_one_top_k(v):
    """The drafter's top-k in two rounds (each piece's top, then the top of those) gives torch.topk's
    indices in torch.topk's order: a 32K draft vocabulary, Qwen's whole one, a tiny one, one that does not split."""
    torch.manual_seed(v)
    logits = torch.randn(11, v)
    for top in (1, 2, 6, 10):
        if top <= v:
            assert torch.equal(top_indices(logits, top), logits.topk(top, dim=-1).indices), top


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_drafting_equals_eager():
    """Drafting traced whole by torch.compile (as the fast backend's compiled steps trace it) gives eager's
    tokens and chain logits, for a tree cut in depth and for a chain (CPU inductor here; bench/cuda_check.py
    on CUDA)."""
    model = tiny_llama()
    bundle = tc_bundle(model, "tc-shared", vocab=50)
    drafter = TokenDrafter(bundle, model.get_output_embeddings(), model.get_input_embeddings())
    compiled = torch.compile(drafter.propose, fullgraph=True, dynamic=False)
    h, root = torch.randn(32), torch.tensor(7)
    for tree, has_chain_logits in ((drafter.tree(nodes=24, depth=2), False), (DraftTree.chain(bundle.k - 1), True)):
        t = tree.tensors(h.device)
        with torch.inference_mode():
            eager_draft = drafter.propose(t, h=h, root=root)
            compiled_draft = compiled(t, h=h, root=root)
        assert torch.equal(eager_draft.tokens, compiled_draft.tokens)
        if has_chain_logits:  # (a CLP reading head confidences needs them)
            torch.testing.assert_close(eager_draft.chain_logits, compiled_draft.chain_logits)
        else:
            assert eager_draft.chain_logits is None and compiled_draft.chain_logits is None


def rank_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    out = []
    for i, p in enumerate(tree.parents):
        out.append((out[p - 1] if p else ()) + (tree.ranks[i],))
    return out


@pytest.mark.parametrize("make,design", [(tiny_llama, "tc-depth"), (tiny_qwen, "tc-depth"), (tiny_llama, "tc-shared"),
                                         (tiny_qwen, "tc-shared"), (tiny_qwen, "tc-wide")])
def test_token_conditioned_verify_is_lossless_on_both_backends(make, design):
    """Chain, adaptive, candidates and tree: ar's tokens, with the same counts on both backends."""
    model = make()
    bundle = tc_bundle(model, design, vocab=0 if design == "tc-depth" else 60)
    ref, dec = eager(model, bundle), fast(model, bundle)
    configs = [dict(), dict(adaptive=True), dict(candidates=4), dict(tree_size=24), dict(tree_size=24, tree_depth=2)]
    for p in prompts(4, seed=5):
        ar = ref.generate(p, DecodeConfig(max_new_tokens=40)).tokens
        for extra in configs:
            cfg = DecodeConfig(mode="verify", max_new_tokens=40, **extra)
            a, b = ref.generate(p, cfg), dec.generate(p, cfg)
            assert a.tokens == b.tokens == ar and same_stats(a, b), extra
        for mode in ("clp", "gate"):  # unverified: the same tokens on both backends
            cfg = DecodeConfig(mode=mode, max_new_tokens=40)
            assert ref.generate(p, cfg).tokens == dec.generate(p, cfg).tokens


def test_perfect_token_heads_get_every_draft_accepted():
    """On a model that repeats its last token, fresh token-conditioned heads (each block the identity)
    predict every future token; a tree of them keeps its whole chain each step."""
    model = copy_model()
    p = prompts(1, seed=3)[0]
    ar = eager(model).generate(p, DecodeConfig(max_new_tokens=40)).tokens
    for design in ("tc-depth", "tc-shared"):
        bundle = with_rank_probs(MTPBundle.for_backbone(model, k=4, base_model="copy", drafter=design))
        for extra in (dict(), dict(tree_size=10)):
            r = eager(model, bundle).generate(p, DecodeConfig(mode="verify", max_new_tokens=40, **extra))
            assert r.tokens == ar and r.stats.steps == 11 and r.stats.draft_accepted == 30


def test_tree_is_stored_best_first_and_cut_by_tree_size(tmp_path, llama):
    bundle = with_rank_probs(MTPBundle.for_backbone(llama, k=4, base_model="tiny"))
    bundle.config.tree = [[0], [0, 0], [1], [0, 0, 0], [0, 1]]
    bundle.save_pretrained(tmp_path)
    loaded = HeadDrafter(MTPBundle.from_pretrained(tmp_path, backbone=llama))  # the drafter answers for its tree
    assert loaded.tree(nodes=3) == DraftTree.from_paths([(0,), (0, 0), (1,)]) == DraftTree((0, 1, 0), (0, 0, 1))
    assert loaded.tree(nodes=3).chain_rows == 2  # the argmax chain comes first
    for bad in (0, -3, 65):  # (the size's range is checked once, where the option is declared)
        with pytest.raises(DecodeError, match=r"tree size .* 1\.\.64"):
            DecodeConfig(mode="verify", tree_size=bad)
    # --tree-depth: the stored paths no deeper than that, best first; too few stored: chosen afresh from
    # the held-out rank statistics, and without them the tree is smaller
    assert loaded.tree(nodes=3, depth=2) == DraftTree.from_paths([(0,), (0, 0), (1,)])
    shallow = HeadDrafter(bundle).tree(nodes=4, depth=1)  # (the report's statistics are in memory here, not saved)
    assert shallow.n == 4 and shallow.max_depth == 1 and shallow.ranks == (0, 1, 2, 3)
    assert loaded.tree(nodes=4, depth=1) == DraftTree.from_paths([(0,), (1,)])
    with pytest.raises(BundleError, match=r"tree depth must lie in 1\.\.3"):
        loaded.tree(nodes=8, depth=4)
    for bad in (dict(tree_size=8, tree_depth=0), dict(tree_depth=2)):
        with pytest.raises(DecodeError, match="--tree-depth"):
            DecodeConfig(mode="verify", **bad)


def test_bundle_format_2_round_trip_and_unknown_drafter(tmp_path, llama):
    import json

    for design in ("tc-wide", "tc-shared"):
        b = tc_bundle(llama, design, vocab=40)
        b.save_pretrained(tmp_path)
        c = MTPBundle.from_pretrained(tmp_path, backbone=llama)
        assert c.config == b.config and c.token_conditioned and torch.equal(c.draft_ids, b.draft_ids)
        for (n1, t1), (n2, t2) in zip(b.state_dict().items(), c.state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2)
    wide = tc_bundle(llama, "tc-wide").heads.blocks[0]
    assert wide.inp.out_features == TokenHeads.WIDE * llama.config.hidden_size == wide.depth_bias.shape[1]
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "drafter": "eagle9"}))
    with pytest.raises(BundleError, match="unknown drafter type 'eagle9'.*newer collocate"):
        MTPBundle.from_pretrained(tmp_path)
    with pytest.raises(BundleError, match="independent heads only"):
        MTPBundle.for_backbone(llama, k=3, base_model="tiny", drafter="tc-depth", compete=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_verify_is_bitwise_ar(dtype):
    """--exact: every step, ar's included, feeds EXACT_WIDTH rows, so verify (chain, candidates, tree,
    adaptive; either drafter) gives ar's tokens in bf16 as in float32."""
    model = tiny_qwen().to(dtype)
    for bundle in (with_rank_probs(randomize(MTPBundle.for_backbone(model, k=4, base_model="t"), seed=2, scale=4.0)),
                   tc_bundle(model, "tc-depth")):
        dec = fast(model, bundle)
        for p in prompts(4, seed=9):
            ar = dec.generate(p, DecodeConfig(max_new_tokens=40, exact=True))
            for extra in (dict(), dict(candidates=4), dict(tree_size=EXACT_WIDTH - 1), dict(adaptive=True)):
                v = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=40, exact=True, **extra))
                assert v.tokens == ar.tokens, extra
    assert ar.stats.steps == ar.stats.new_tokens  # ar: one token a step


@pytest.mark.parametrize("width,tree", [(32, dict(tree_size=31)), (64, dict(tree_size=48, tree_depth=3))])
def test_exact_trees_are_bitwise_ar_at_their_width(width, tree):
    """--exact with a tree wider than 16 rows: every step, ar's too, feeds `width` rows, and each row reads
    its keys and values in ar's order, so a node off the leading chain is kept and still gives ar's bits
    (bf16). In float32 the exact tree keeps as many drafts as the plain one: none is refused."""
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_qwen().to(dtype)
        bundle = with_rank_probs(randomize(MTPBundle.for_backbone(model, k=4, base_model="t"), seed=2, scale=4.0),
                                 probs=(0.3, 0.25, 0.2, 0.15, 0.1))
        dec = fast(model, bundle)
        exact, steps = dict(exact=True, exact_width=width), Counter()
        for p in prompts(6, seed=9):
            ar = dec.generate(p, DecodeConfig(max_new_tokens=40, **exact))
            v = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=40, **exact, **tree))
            chain = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=40, **exact))
            assert v.tokens == ar.tokens == chain.tokens
            steps.update(tree=v.stats.draft_accepted, chain=chain.stats.draft_accepted)
            if dtype == torch.float32:
                plain = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=40, **tree))
                assert plain.tokens == v.tokens and plain.stats.steps == v.stats.steps
        # the trees' leading chains are 1 node long: what they keep beyond the chain's is off it
        assert steps["tree"] >= steps["chain"] + 4, steps


@pytest.mark.parametrize("width", [16, 64])
def test_exact_trees_past_the_window_are_bitwise_ar(width):
    """--exact past the copied window: with a context of 100-200 tokens each row's weighted sum splits into
    the slots before its window (read as they lie) and the window (copied in its own order), at a slot set
    by its position alone, so a tree gives ar's tokens (bf16)."""
    model = tiny_qwen().to(torch.bfloat16)
    bundle = with_rank_probs(randomize(MTPBundle.for_backbone(model, k=4, base_model="t"), seed=2, scale=4.0),
                             probs=(0.3, 0.25, 0.2, 0.15, 0.1))
    dec = fast(model, bundle, max_len=256)
    exact, g = dict(exact=True, exact_width=width), torch.Generator().manual_seed(5)
    tree = dict(tree_size=width - 1, tree_depth=3)
    for n in (100, 150, 190):  # (the heads are random: nodes kept off the chain are test_fast's)
        p = torch.randint(3, 96, (n,), generator=g).tolist()
        ar = dec.generate(p, DecodeConfig(max_new_tokens=48, **exact))
        v = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=48, **exact, **tree))
        assert v.tokens == ar.tokens
    lm, t = dec.backend.lm, DraftTree((0, 0, 1) + (0,) * (width - 4)).tensors("cpu")  # the split, by position
    window = lm.inputs(torch.zeros(width, dtype=torch.long), torch.tensor(190), t.depths, None, t.paths, 256).window
    assert window.shape == (width, width) and window[:4, 0].tolist() == [191 - width, 192 - width, 192 - width, 193 - width]


def test_bench_modes_take_exact_and_its_width_together_or_refuse():
    """The bench's --exact --exact-width reach every lossless mode together (each alone would be refused for a
    48-node tree); a width that cannot hold a mode's tree is an error, never a row run without --exact."""
    from collocate.options import from_spec

    cfg = from_spec("verify-t48d3", exact=True, exact_width=64, max_new_tokens=8)
    assert (cfg.exact, cfg.exact_width, cfg.tree_size) == (True, 64, 48)
    assert from_spec("ar", exact=True, exact_width=64).exact_width == 64
    assert not from_spec("clp", exact=True, exact_width=64).exact  # (a mode that reads neither: left out)
    with pytest.raises(ValueError, match="'verify-t48d3': .* a draft of 48 needs --exact-width 64"):
        from_spec("verify-t48d3", exact=True)


def test_exact_refuses_what_it_cannot_keep(llama):
    bundle = MTPBundle.for_backbone(llama, k=4, base_model="tiny")
    with pytest.raises(DecodeError, match="--exact needs the fast engine"):
        eager(llama, bundle).generate([5, 6], DecodeConfig(exact=True))
    with pytest.raises(DecodeError, match="lossless modes"):
        DecodeConfig(mode="clp", exact=True)
    with pytest.raises(DecodeError, match=f"at most {EXACT_WIDTH - 1} draft nodes; a draft of 16 needs --exact-width 32"):
        DecodeConfig(mode="verify", exact=True, tree_size=EXACT_WIDTH)
    with pytest.raises(DecodeError, match="--exact-width applies to ar and verify with --exact"):
        DecodeConfig(mode="verify", exact_width=32)
    with pytest.raises(DecodeError, match="unknown exact width '24'; choose one of 16, 32, 48, 64, 80"):
        DecodeConfig(exact=True, exact_width=24)
    with pytest.raises(DecodeError, match="no room"):  # a prompt at the context's edge
        fast(llama, bundle, max_len=64).generate([5] * 60, DecodeConfig(exact=True))


def test_vocab_slice_is_the_lm_head_at_its_tokens(llama):
    """The draft vocabulary's LM head gives the full head's logits at its tokens; `local` maps ids to
    positions in it, -100 outside it and for -100 itself (no target)."""
    from collocate.heads import VocabSlice

    lm = llama.get_output_embeddings()
    ids = torch.tensor([7, 3, 50, 11])
    vs = VocabSlice(lm, ids)
    x = torch.randn(5, lm.weight.shape[1])
    torch.testing.assert_close(vs(x), lm(x)[:, ids])
    assert vs.local(torch.tensor([50, 7, 8, -100])).tolist() == [2, 0, -100, -100]
