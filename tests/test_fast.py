"""The two backends under the one loop: the fast one (static cache; on the CPU without graphs) gives the
eager reference's tokens and stats."""
import shutil

import pytest
import torch

from collocate.decode import DecodeConfig, DecodeError, Decoder
from collocate.engine import build_decoder
from collocate.fast import StaticBackend, StaticLM
from conftest import randomize, tiny_llama, tiny_qwen, with_rank_probs
from test_decode import bundle_for, eager, prompts


def same_stats(a, b) -> bool:
    """Every count but the time."""
    return a.stats.counts() == b.stats.counts()


def fast(model, bundle=None, *, max_len=128, **kw):
    return build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[2], graphs=False, max_len=max_len, **kw)

MODES = [("ar", None, False), ("verify", None, False), ("verify", None, True), ("verify", 0.3, True),
         ("clp", None, False), ("clp", 0.5, False), ("gate", 0.0, False), ("gate", None, False),
         ("compete", 0.0, False), ("compete", 0.5, False)]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_static_forward_matches_hf_hidden_states(make):
    model = make()
    lm = StaticLM(model, max_len=64)
    ids = torch.randint(3, 96, (10,))
    ref = model.base_model(ids[None]).last_hidden_state[0]
    torch.testing.assert_close(lm.forward(ids, torch.tensor(0)), ref, rtol=1e-5, atol=1e-5)
    # the same sequence fed in pieces through the cache
    h1 = lm.forward(ids[:6], torch.tensor(0))
    h2 = lm.forward(ids[6:], torch.tensor(6))
    torch.testing.assert_close(torch.cat([h1, h2]), ref, rtol=1e-5, atol=1e-5)


def test_exact_layout_reads_each_rows_path_in_depth_order():
    """--exact's attention: row r's key column pos0 + j reads the feed row at depth j on r's path (then
    nothing: masked by position), and the result is the tree attention's (float32; only the order of the
    sums differs)."""
    from collocate.draft import DraftTree

    model = tiny_qwen()
    lm = StaticLM(model, max_len=64)
    tree = DraftTree((0, 0, 1, 2, 2))  # rows 1, 2 under the root; 3 under 1; 4 and 5 under 2
    assert tree.paths == ((0, 0, 0), (0, 1, 1), (0, 2, 2), (0, 1, 3), (0, 2, 4), (0, 2, 5))
    t, pos0, ids = tree.tensors("cpu"), torch.tensor(7), torch.randint(3, 96, (6,))
    lm.forward(torch.randint(3, 96, (7,)), torch.tensor(0))  # a context of 7
    cols = lm.inputs(ids, pos0, t.depths, None, t.paths, 16).cols
    assert cols[:, :7].tolist() == [list(range(7))] * 6
    assert cols[5, 7:10].tolist() == [7, 9, 12] and cols[3, 7:10].tolist() == [7, 8, 10]
    exact = lm.hidden(ids, pos0, depths=t.depths, paths=t.paths, attn_len=16).last
    plain = lm.hidden(ids, pos0, depths=t.depths, visible=t.visible, attn_len=16).last
    torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [16, 64])
def test_exact_tree_rows_are_ar_rows_bit_for_bit_past_the_window(width):
    """--exact in bf16 after a context of 150: a tree node off the leading chain gives the hidden state
    ar's one-token step gives for the same token at the same position, bit for bit, though its weighted
    sum splits at its window (the slots before it as they lie, the window in the row's own order). The
    plain tree attention, reading the same keys in the feed's order, does not."""
    from collocate.draft import DraftTree

    lm = StaticLM(tiny_qwen().to(torch.bfloat16), max_len=256)
    g = torch.Generator().manual_seed(3)
    context, (a, b, c) = torch.randint(3, 96, (150,), generator=g), torch.randint(3, 96, (3,), generator=g).tolist()
    lm.forward(context, torch.tensor(0))

    def padded(parents):  # as --exact feeds it: the rows past the draft hang off the root
        return DraftTree(parents + (0,) * (width - 1 - len(parents))).tensors("cpu")

    ar = []
    for i, tok in enumerate((a, b, c)):  # ar --exact: the root and width - 1 rows of padding, a step a token
        t = padded(())
        ids = torch.tensor([tok] + [3] * (width - 1))
        ar.append(lm.hidden(ids, torch.tensor(150 + i), depths=t.depths, paths=t.paths, attn_len=256).last[0])
    t = padded((0,) * (width - 2) + (width - 2,))  # a; siblings x...; b at row width - 2, c under it (the last row)
    ids = torch.tensor([a] + [5] * (width - 3) + [b, c])
    tree = lm.hidden(ids, torch.tensor(150), depths=t.depths, paths=t.paths, attn_len=256).last
    assert all(torch.equal(tree[row], ar[i]) for i, row in enumerate((0, width - 2, width - 1)))
    plain = lm.hidden(ids, torch.tensor(150), depths=t.depths, visible=t.visible, attn_len=256).last
    assert not torch.equal(plain[-1], ar[2])


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
@pytest.mark.parametrize("mode,threshold,adaptive", MODES)
def test_fast_engine_equals_eager_token_for_token(make, mode, threshold, adaptive):
    model = make()
    bundle = bundle_for(model, compete=True, seed=3)
    bundle.clp = randomize(bundle.clp, seed=4, scale=20.0)  # CLP that sometimes accepts
    ref, dec = eager(model, bundle), fast(model, bundle)
    for p in prompts(4, seed=9):
        cfg = DecodeConfig(mode=mode, max_new_tokens=40, threshold=threshold, adaptive=adaptive)
        a, b = ref.generate(p, cfg), dec.generate(p, cfg)
        assert b.tokens == a.tokens and same_stats(a, b) and b.proposals == a.proposals


def test_engine_auto_is_eager_on_cpu(llama):
    assert build_decoder(llama).backend.describe() == "eager"
    with pytest.raises(ValueError, match="engine must be one of auto, eager, fast"):
        build_decoder(llama, engine="turbo")


@pytest.mark.parametrize("mode", ["ar", "verify", "verify-c5"])
def test_context_edge_gives_the_same_tokens_on_both_backends(mode):
    """Context 256, a 240-token prompt: the answer fills the context (16 tokens) on both backends, the
    fast one with a cache of 263 slots; near the edge the loop stops drafting."""
    model = tiny_llama()
    bundle = bundle_for(model, seed=3)
    cfg = DecodeConfig(mode=mode.split("-")[0], max_new_tokens=40, candidates=5 if mode.endswith("c5") else 1)
    p = (prompts(1, seed=2)[0] * 240)[:240]
    a = eager(model, bundle, eos=()).generate(p, cfg)
    b = build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[], graphs=False, max_len=263).generate(p, cfg)
    assert len(a.tokens) == 16 and b.tokens == a.tokens and same_stats(a, b)
    assert a.finish_reason == b.finish_reason == "length"


def test_fused_projections_leave_the_hf_model_unchanged_and_are_reused(qwen):
    ids = torch.randint(3, 96, (1, 12))
    before = qwen(ids).logits
    lm = StaticLM(qwen, max_len=32)
    torch.testing.assert_close(qwen(ids).logits, before, rtol=0, atol=0)  # same values, now views
    again = StaticLM(qwen, max_len=32)  # a second engine on the same model adds no copy
    assert again.layers[0].gate_up_w.data_ptr() == lm.layers[0].gate_up_w.data_ptr()
    assert again.layers[0].qkv_b.data_ptr() == lm.layers[0].qkv_b.data_ptr()


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_compiled_steps_give_the_same_tokens(qwen):
    """The GPU path's torch.compile (the layers, the forward's inputs and final norm, and the step's whole
    tail: accept rule, token-conditioned drafting of a tree, next feed), run by inductor's CPU backend: the
    eager reference's tokens and stats, with no graph break, and a prompt of a new length compiles nothing
    (without graphs a prompt is not padded and runs the plain layers; a padded one compiles per width, as
    any step width does)."""
    from torch._dynamo.utils import counters
    from test_tokenheads import tc_bundle

    bundle = tc_bundle(qwen, "tc-shared", vocab=50)
    ref, dec = eager(qwen, bundle), fast(qwen, bundle, compile=True)
    counters.clear()
    cfg = DecodeConfig(mode="verify", max_new_tokens=12, tree_size=12)  # (ar's step is a subset of this one's)
    p = prompts(1, seed=5)[0]
    a, b = ref.generate(p, cfg), dec.generate(p, cfg)
    assert b.tokens == a.tokens and same_stats(a, b) and b.proposals == a.proposals
    assert dec.backend.compile_on  # it compiled, and did not fall back
    assert counters["stats"]["unique_graphs"] >= 4 and not counters["graph_break"]  # layer, inputs, norm, tail
    graphs, q = counters["stats"]["unique_graphs"], (p * 4)[:len(p) + 5]
    a, b = ref.generate(q, cfg), dec.generate(q, cfg)
    assert b.tokens == a.tokens and same_stats(a, b) and counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
@pytest.mark.parametrize("k,candidates", [(4, 2), (4, 8), (2, 5)])
def test_verify_with_candidates_is_lossless(make, k, candidates):
    """Runner-up drafts for +2 ride beside the chain as siblings of its first node (a tree of depth 1
    there); output stays ar's exactly, on both backends."""
    model = make()
    bundle = bundle_for(model, k=k, seed=3)
    ref, dec = eager(model, bundle), fast(model, bundle)
    steps_plain = steps_wide = 0
    for p in prompts(6, seed=11):
        ar = ref.generate(p, DecodeConfig(mode="ar", max_new_tokens=60)).tokens
        plain = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=60))
        cfg = DecodeConfig(mode="verify", max_new_tokens=60, candidates=candidates)
        wide, wide_eager = dec.generate(p, cfg), ref.generate(p, cfg)
        assert wide.tokens == ar and plain.tokens == ar and wide_eager.tokens == ar
        assert same_stats(wide, wide_eager)
        steps_plain, steps_wide = steps_plain + plain.stats.steps, steps_wide + wide.stats.steps
    assert steps_wide < steps_plain  # runner-ups were kept (random heads over 96 ids hit often enough)


def test_impossible_candidate_settings_are_refused():
    for bad in (dict(mode="verify", candidates=0), dict(mode="clp", candidates=2),
                dict(mode="verify", adaptive=True, candidates=2), dict(mode="verify", candidates=99)):
        with pytest.raises(DecodeError):
            DecodeConfig(**bad)


def test_a_prompt_longer_than_the_fast_cache_says_how_to_fit_it(llama):
    dec = fast(llama, max_len=32)
    with pytest.raises(DecodeError, match="max_len"):
        dec.generate(list(range(3, 40)), DecodeConfig(max_new_tokens=4))
    with pytest.raises(DecodeError, match="empty prompt"):
        dec.generate([], DecodeConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_len counts cache slots"):
        fast(llama, max_len=1)


def test_cache_slots_are_aligned_and_padding_slots_stay_unseen(llama):
    """Attention reads every slot, so their count is a multiple of SLOT_MULTIPLE; the padding slots past
    max_len are masked, so a cache with them gives the same tokens as the eager decoder."""
    from collocate.fast import SLOT_MULTIPLE

    lm = StaticLM(llama, 50)
    assert lm.k_cache.shape[3] % SLOT_MULTIPLE == 0 and lm.k_cache.shape[3] >= 50
    assert StaticLM(llama, 50, slot_multiple=1).k_cache.shape[3] == 50
    cfg = DecodeConfig(max_new_tokens=12)
    prompt = list(range(3, 20))
    assert fast(llama, max_len=50).generate(prompt, cfg).tokens == eager(llama).generate(prompt, cfg).tokens
    assert isinstance(fast(llama).backend, StaticBackend)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_verify_with_a_tree_is_lossless_on_both_backends(make):
    """A static tree from rank statistics (several depths, several guesses each): ar's tokens, and the
    same steps and counts on both backends; a big tree takes fewer steps than the chain."""
    model = make()
    bundle = with_rank_probs(bundle_for(model, seed=3))
    ref, dec = eager(model, bundle), fast(model, bundle)
    steps = {None: 0, 5: 0, 40: 0}
    for p in prompts(6, seed=11):
        ar = ref.generate(p, DecodeConfig(mode="ar", max_new_tokens=60)).tokens
        for nodes in (None, 5, 40):
            cfg = DecodeConfig(mode="verify", max_new_tokens=60, tree_size=nodes)
            a, b = ref.generate(p, cfg), dec.generate(p, cfg)
            assert a.tokens == b.tokens == ar and same_stats(a, b)
            steps[nodes] += a.stats.steps
    assert steps[40] < steps[None]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_attention_reads_the_shortest_length_that_covers_the_step(make):
    """A cache of 1,024 slots: every step's attention reads the shortest of the backend's attention
    lengths that covers the slots it writes (--exact: one length for the whole request, the shortest that
    covers the furthest slot it may write), and the tokens stay the eager
    decoder's across the lengths' edges (a 250-token prompt, answers to 410 tokens)."""
    model = make()
    model.config.max_position_embeddings = 1024  # (rotary positions are computed, not tabled)
    bundle = with_rank_probs(bundle_for(model, seed=3))
    ref, dec = eager(model, bundle), fast(model, bundle, max_len=1024)
    lens = dec.backend.attn_lens
    assert lens == (256, 384, 512, 768, 1024)
    seen, forward = [], dec.backend.forward

    def spy(ids, pos0, tree, attn_len=None, **kw):
        seen.append((int(pos0) + ids.shape[0], attn_len))
        return forward(ids, pos0, tree, attn_len, **kw)

    dec.backend.forward = spy
    p = (prompts(1, seed=2)[0] * 250)[:250]
    for cfg in (DecodeConfig(mode="ar", max_new_tokens=160), DecodeConfig(mode="verify", max_new_tokens=160),
                DecodeConfig(mode="verify", max_new_tokens=160, tree_size=40),
                DecodeConfig(mode="clp", max_new_tokens=160, threshold=0.0)):
        seen.clear()
        a, b = ref.generate(p, cfg), dec.generate(p, cfg)
        assert b.tokens == a.tokens and same_stats(a, b)
        assert all(n == min(x for x in lens if x >= end) for end, n in seen), cfg
        assert {n for _, n in seen} == {256, 384, 512}
    seen.clear()
    dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=20, exact=True))
    assert {n for _, n in seen} == {384}  # 250 + 20 + EXACT_WIDTH slots at most, not the whole cache
    seen.clear()
    dec.generate(p, DecodeConfig(max_new_tokens=160, exact=True))
    assert {n for _, n in seen} == {512}


def test_trees_are_data():
    from collocate.draft import DraftTree

    t = DraftTree.best([[0.5, 0.2, 0.1], [0.3, 0.1], [0.2]], 6)
    # the argmax chain first, then by depth: (0) (0,0) (1) (2) (0,1) (1,0)
    assert t.parents == (0, 1, 0, 0, 1, 3) and t.ranks == (0, 0, 1, 2, 1, 0)
    assert t.depths == (0, 1, 2, 1, 1, 2, 2) and t.chain_rows == 2
    assert DraftTree.chain(3).with_siblings(2) == DraftTree((0, 1, 2, 0, 0), (0, 0, 0, 1, 2))
    assert DraftTree.best([[0.9], [0.9], [0.9]], 3) == DraftTree.chain(3)
    with pytest.raises(ValueError, match="every prefix"):
        DraftTree.from_paths([(0,), (1, 0)])
    with pytest.raises(DecodeError, match="--tree-size applies"):
        DecodeConfig(mode="clp", tree_size=8)
    with pytest.raises(DecodeError, match="1..64"):
        DecodeConfig(mode="verify", tree_size=65)
    from collocate.bundle import BundleError

    model = tiny_llama()  # a bundle with no training report has no rank statistics to choose a tree from
    with pytest.raises(BundleError, match="train_report.json"):
        eager(model, bundle_for(model)).generate([5, 6], DecodeConfig(mode="verify", tree_size=8))


def test_a_tree_from_counted_paths_takes_what_per_slot_rates_miss():
    """Training stores the rank paths counted right on held-out anchors (policies.path_shares), best first:
    where a slot is right mostly where the slot before it was, the counted tree goes deeper than the one
    from per-slot rates (draft.best_paths) and accepts more; shares never grow down a path, and any prefix
    of the list, or its paths at most D deep, is a tree."""
    from collocate.draft import DraftTree
    from collocate.train.policies import PolicyData, head_accuracy, heldout_paths, path_shares, tree_drafts

    # 100 anchors, slots +2..+4: +2 right (rank 0) at 60, rank 1 at 20; +3 right only where +2 was (50 of
    # the 60), rank 1 at 30 elsewhere; +4 right where +3 was (45); one anchor's +4 has no token
    rank = torch.full((100, 3), 10)
    rank[:60, 0], rank[60:80, 0] = 0, 1
    rank[:50, 1], rank[60:90, 1] = 0, 1
    rank[:45, 2] = 0
    valid = torch.ones(100, 3, dtype=torch.bool)
    valid[99, 2] = False
    data = PolicyData(torch.zeros(100, 1), torch.zeros(100, 3), rank == 0, rank < 5, valid, rank)
    shares = path_shares(data, [2, 3, 4])
    assert shares[(0,)] == 0.6 and shares[(0, 0)] == 0.5 and shares[(1, 1)] == 0.2 and shares[(0, 0, 0)] == 45 / 99
    paths = heldout_paths(shares)
    assert paths[:3] == [(0,), (0, 0), (0, 0, 0)] and all(p[:-1] in paths[:i] for i, p in enumerate(paths) if len(p) > 1)
    DraftTree.from_paths(paths[:4])  # (a tree: every prefix there)
    rank_probs = [v["rank_probs"] for v in head_accuracy(data, [2, 3, 4]).values()]
    # per-slot rates make (0, 0, 0) 0.6 * 0.5 * 0.45 = 0.135 and pick (1,) (0.2) before it; counted, it is
    # right at 45 of 99 anchors
    drafts = tree_drafts(shares, rank_probs, sizes=(3,), depths=(None,))["t3"]
    assert drafts["counted"] == pytest.approx(0.6 + 0.5 + 45 / 99) and drafts["counted"] > drafts["per_slot_product"]


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_steps_queued_ahead_give_the_serial_loops_tokens_and_counts(engine):
    """overlap (on by default on CUDA, forced on here) runs the next step of ar and plain verify before the
    host reads the one before: every mode gives the serial loop's tokens, counts and proposals, answers that
    end at EOS, at the budget and at the context's edge (a 240-token prompt, 16 tokens of room) included;
    an answer's end costs at most one step run for nothing."""
    model = tiny_llama()
    bundle = with_rank_probs(bundle_for(model, seed=3))
    serial, ahead = (build_decoder(model, bundle=bundle, engine=engine, eos_token_ids=[2], graphs=False, max_len=263,
                                   overlap=on) for on in (False, True))
    calls, forward = [0], ahead.backend.forward

    def count(*args, **kw):
        calls[0] += 1
        return forward(*args, **kw)

    ahead.backend.forward = count
    wasted, finishes = [], set()
    long_prompt = (prompts(1, seed=2)[0] * 240)[:240]
    for kw in (dict(mode="ar"), dict(mode="verify", tree_size=20), dict(mode="verify", candidates=3),
               dict(mode="verify", adaptive=True), dict(mode="verify", temperature=0.8, seed=5, tree_size=20)):
        for p in prompts(4, seed=13) + [long_prompt]:
            cfg = DecodeConfig(max_new_tokens=30, **kw)
            calls[0] = 0
            a, b = serial.generate(p, cfg), ahead.generate(p, cfg)
            assert b.tokens == a.tokens and b.stats.counts() == a.stats.counts() and b.proposals == a.proposals
            assert a.stats.steps <= calls[0] <= a.stats.steps + 1, kw
            one_width = kw["mode"] in ("ar", "verify") and not kw.get("adaptive")
            wasted.append((one_width, calls[0] - a.stats.steps))
            finishes.add((a.finish_reason, len(p) + len(a.tokens) == 256))
    assert any(w for one_width, w in wasted if one_width) and not any(w for one_width, w in wasted if not one_width)
    assert finishes == {("eos", False), ("length", False), ("length", True)}


def test_a_prompt_is_fed_padded_to_one_of_a_few_widths(llama):
    """With graphs (on CUDA) the fast backend feeds a prompt as the shortest of a few widths that holds it,
    one graph each; the rows past the prompt change nothing: the eager decoder's tokens, for prompts of
    many lengths up to the context's edge, in ar and in a tree's verify."""
    bundle = with_rank_probs(bundle_for(llama, seed=3))
    ref, dec = eager(llama, bundle), fast(llama, bundle, max_len=250)
    assert dec.backend.prompt_widths == (64, 96, 128, 192, 250) and not dec.backend.pad_prompts  # (no graphs)
    dec.backend.pad_prompts = True
    fed, forward = [], dec.backend.forward

    def spy(ids, pos0, tree, attn_len=None, **kw):
        if tree is None:
            fed.append(ids.shape[0])
        return forward(ids, pos0, tree, attn_len, **kw)

    dec.backend.forward = spy
    base = prompts(1, seed=4)[0] * 250
    for n, width in ((1, 64), (64, 64), (65, 96), (130, 192), (240, 250)):
        for cfg in (DecodeConfig(mode="ar", max_new_tokens=8),
                    DecodeConfig(mode="verify", max_new_tokens=8, tree_size=20)):
            a, b = ref.generate(base[:n], cfg), dec.generate(base[:n], cfg)
            assert b.tokens == a.tokens and same_stats(a, b) and fed[-1] == width


def test_a_long_prompt_is_fed_in_pieces_up_to_the_cache_end(llama):
    """A prompt longer than a piece is fed piece by piece (with graphs: every piece whole, the last padded
    past the prompt), at every length up to the cache's last slot: the eager decoder's tokens, in ar and in
    a tree's verify, and the answer ends by length where the context is full."""
    from collocate.decode import Decoder
    from collocate.fast import StaticBackend

    bundle = with_rank_probs(bundle_for(llama, seed=3))
    ref = eager(llama, bundle)
    for pad in (False, True):
        backend = StaticBackend(llama, max_len=256, graphs=False, piece=64)
        backend.pad_prompts = pad  # (graphs turn it on)
        dec = Decoder(backend, None, bundle, eos_token_ids=[2])
        fed, forward = [], backend.forward

        def spy(ids, pos0, tree, attn_len=None, forward=forward, fed=fed, **kw):
            if tree is None:
                fed.append((int(pos0), ids.shape[0]))
            return forward(ids, pos0, tree, attn_len, **kw)

        backend.forward = spy
        base = prompts(1, seed=4)[0] * 256
        for n in (1, 63, 64, 65, 128, 129, 200, 250, 255):
            for cfg in (DecodeConfig(mode="ar", max_new_tokens=8), DecodeConfig(mode="verify", max_new_tokens=8, tree_size=20)):
                fed.clear()
                a, b = ref.generate(base[:n], cfg), dec.generate(base[:n], cfg)
                assert b.tokens == a.tokens and same_stats(a, b), (pad, n, cfg.mode)
                assert [p for p, _ in fed] == list(range(0, n, 64))  # a piece at each multiple of 64
                widths = {w for _, w in fed}
                assert widths <= ({64, 96, 128, 192, 256} if n <= 64 else {64}) if pad else max(widths) <= 64
                assert b.finish_reason == ("length" if n + 8 > 256 else a.finish_reason)


EXACT_CONFIGS = (DecodeConfig(max_new_tokens=12, exact=True), DecodeConfig(mode="verify", max_new_tokens=12, exact=True, tree_size=8))


@pytest.mark.parametrize("max_len, configs, lengths", [
    (250, (DecodeConfig(mode="ar", max_new_tokens=12), DecodeConfig(mode="verify", max_new_tokens=12, tree_size=20)),
     (1, 5, 63, 64, 65, 128, 129, 191, 192, 200, 240, 249)),
    (700, EXACT_CONFIGS, (1, 5, 64, 65, 200, 229, 230, 300, 357, 358, 500, 640, 673))])  # (--exact: a length a request)
def test_prepare_captures_every_graph_a_request_uses(max_len, configs, lengths):
    """After Decoder.prepare, no request of its mode meets a graph key that was not captured, at any prompt
    length (one piece, several, the last piece near the cache's end) or context length. Graphs are recorded
    by key here (the CPU has none): what a GPU server would capture inside a request."""
    model = tiny_llama()
    model.config.max_position_embeddings = max_len
    bundle = with_rank_probs(bundle_for(model, seed=3))
    backend, seen = StaticBackend(model, max_len=max_len, graphs=False, piece=64), []
    dec = Decoder(backend, None, bundle, eos_token_ids=[2])
    backend.graphs_on = backend.pad_prompts = True  # keys and padding as with graphs

    def run(key, step, *, state):
        seen.append(key)
        return step()

    backend.run = run
    base = prompts(1, seed=4)[0] * max_len
    prepared = set()  # every graph captured so far (a prompt piece's are shared by the modes)
    for cfg in configs:
        seen.clear()
        dec.prepare(cfg)
        prepared |= set(seen)
        for n in lengths:
            seen.clear()
            dec.generate(base[:n], cfg)
            assert set(seen) <= prepared, (cfg.mode, n, set(seen) - prepared)
