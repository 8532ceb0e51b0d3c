"""The block drafter (collocate/block.py, draft.BlockDrafter): its decoding path (a context cache by position,
one block) gives its training path's logits, training on a model's own answers lowers its loss, and in the
decode loop it drafts from the context the kept tokens left, verify with it is ar, and both backends agree."""
import pytest
import torch

from collocate.block import BlockConfig, BlockModel, backbone_features
from collocate.bundle import MTPBundle
from collocate.decode import DecodeConfig
from collocate.engine import build_decoder
from conftest import copy_model, randomize, tiny_llama, tiny_qwen, with_rank_probs
from test_decode import eager, prompts
from test_fast import fast


def drafter_for(model, **kw):
    torch.manual_seed(0)
    return randomize(BlockModel(BlockConfig.for_backbone(model, **kw)), seed=1, scale=1.0)


def test_taps_spread_over_the_backbone_and_sizes_follow_it():
    from transformers import Qwen2Config

    class Fake:
        def __init__(self, n):
            self.config = Qwen2Config(num_hidden_layers=n, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=100)

    assert BlockConfig.for_backbone(Fake(24)).taps == [1, 6, 11, 16, 21]  # as the public 24-layer drafters
    assert BlockConfig.for_backbone(Fake(28)).taps == [1, 7, 13, 19, 25]
    assert BlockConfig.for_backbone(Fake(4)).taps == [2] and BlockConfig.for_backbone(Fake(2)).taps == [0]
    with pytest.raises(ValueError, match="reads backbone layers 0..-1"):
        BlockConfig.for_backbone(Fake(1))
    c = BlockConfig.for_backbone(Fake(28), layers=2, block_size=8, intermediate_size=96)
    assert (c.layers, c.block_size, c.intermediate_size, c.heads, c.kv_heads, c.head_dim) == (2, 8, 96, 4, 2, 16)
    assert BlockConfig.for_backbone(Fake(28), kv_heads=4).kv_heads == 4  # its own K/V heads, in its config
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        BlockModel(BlockConfig.for_backbone(Fake(28), kv_heads=3))


def test_every_path_reads_the_same_tapped_states_and_none_reads_the_last_layer(tmp_path):
    """Training (HF's hidden states), the eager backend and the fast one read the same states at the layers
    a block drafter may tap, also where the final norm is not ones; the last layer, which HF gives only
    after the final norm (the fast engine before it), is refused in training and in a bundle."""
    from collocate.backend import HFBackend
    from collocate.errors import BundleError
    from collocate.fast import StaticBackend
    from collocate.train.config import TrainConfig
    from collocate.train.pipeline import block_config

    model = tiny_qwen()
    model.model.norm.weight.copy_(torch.linspace(0.5, 2.0, model.config.hidden_size))
    ids = torch.randint(3, 96, (12,))
    want = backbone_features(model, ids, [0])
    for backend in (HFBackend(model), StaticBackend(model, max_len=64, graphs=False, compile=False)):
        backend.reset()
        torch.testing.assert_close(backend.forward(ids, torch.tensor(0), None, None, taps=(0,)).taps, want)
    with pytest.raises(ValueError, match="reads backbone layers 0..0"):
        block_config(model, None, TrainConfig(out=str(tmp_path), drafter="block", k=4, block_taps=(1,)))
    bundle = block_bundle(model, steps=1, answers=1)
    bundle.config.block["taps"] = [1]
    with pytest.raises(BundleError, match="reads backbone layers 0..0"):
        bundle.check_backbone(model)


def test_decoding_from_the_cache_gives_the_training_logits():
    for make, kv in ((tiny_llama, None), (tiny_qwen, None), (tiny_qwen, 4)):  # (4: its own K/V heads, one a query head)
        model = make()
        drafter = drafter_for(model, layers=2, block_size=6, kv_heads=kv)
        assert drafter.c.kv_heads == (kv or model.config.num_key_value_heads)
        embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
        tokens = torch.randint(3, 96, (40,))
        feats = backbone_features(model, tokens, drafter.c.taps)
        anchors = torch.tensor([1, 7, 20, 38])
        with torch.no_grad():
            trained = drafter.logits(embed, lm_head, tokens, feats, anchors)  # (4, 5, V)
            torch.testing.assert_close(drafter.logits(embed, lm_head, tokens, feats, anchors, fused=True), trained,
                                       rtol=1e-4, atol=1e-5)  # training's attention in one kernel: the same
            cache = drafter.allocate(64, tokens.device, torch.float32)
            for i, a in enumerate(anchors.tolist()):
                drafter.extend(cache, feats[:a], torch.arange(a))
                drafter.extend(cache, torch.randn(3, feats.shape[1]), torch.arange(a, a + 3))  # a rejected draft's rows
                decoded = drafter.draft(cache, embed, lm_head, tokens[a], torch.tensor(a), attn_len=48)
                torch.testing.assert_close(decoded, trained[i], rtol=1e-4, atol=1e-4)


def test_training_on_the_models_own_answers_lowers_the_loss():
    model = copy_model()  # (its answers repeat the prompt's last token: a pattern a drafter can learn fast)
    drafter = drafter_for(model, layers=1, block_size=4)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    seqs = [model.generate(torch.randint(3, 96, (1, 6), generator=g), max_new_tokens=40, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[0] for _ in range(4)]
    feats = [backbone_features(model, s, drafter.c.taps).detach() for s in seqs]
    opt = torch.optim.AdamW(drafter.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        s, f = seqs[step % 4], feats[step % 4]
        loss, _ = drafter.loss(embed, lm_head, s, f, torch.arange(1, s.shape[0] - 1, 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8, (losses[:8], losses[-8:])


def test_a_steps_answers_in_one_pass_give_each_answer_its_own_logits_and_loss():
    """Training runs a step's answers together, padded to the longest: each answer's logits are those it gets
    alone, padding (rows past an answer, anchors of -1) changes nothing and teaches nothing, and the loss is
    the mean of each answer's own loss, hits the sum of each answer's."""
    model = tiny_qwen()
    drafter = drafter_for(model, layers=2, block_size=4)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    seqs = [torch.randint(3, 96, (n,)) for n in (30, 18, 25)]
    anchors = [torch.tensor([2, 9, 27]), torch.tensor([1, 16]), torch.tensor([0, 5, 12])]
    feats = [backbone_features(model, s, drafter.c.taps).detach() for s in seqs]
    tokens = torch.stack([torch.cat([s, torch.full((30 - len(s),), -100)]) for s in seqs])
    padded = torch.stack([torch.cat([f, torch.randn(30 - len(f), f.shape[1])]) for f in feats])  # rows never read
    at = torch.nn.utils.rnn.pad_sequence(anchors, batch_first=True, padding_value=-1)  # (3, 3): one -1
    with torch.no_grad():
        together = drafter.logits(embed, lm_head, tokens, padded, at)  # (3, 3, 3, V)
        loss, hits = drafter.loss(embed, lm_head, tokens, padded, at)
        want_loss, want_hits = 0.0, 0
        for j, (s, f, a) in enumerate(zip(seqs, feats, anchors)):
            torch.testing.assert_close(together[j, :len(a)], drafter.logits(embed, lm_head, s, f, a), rtol=1e-5, atol=1e-5)
            alone, h = drafter.loss(embed, lm_head, s, f, a)
            want_loss, want_hits = want_loss + alone / 3, want_hits + h
        assert (drafter.targets(tokens, at)[1, 2] == -100).all()  # the padded anchor learns nothing
    torch.testing.assert_close(loss, want_loss)
    assert torch.equal(hits, want_hits)


def test_a_steps_answers_through_the_backbone_together_give_each_its_own_states():
    """Training runs a step's answers through the backbone in one batch, right-padded and with no mask (the
    attention is causal): each answer's tapped and last states are those it gets alone."""
    from collocate.train.block import tapped_states

    for make in (tiny_qwen, tiny_llama):
        model = make()
        seqs = [torch.randint(3, 96, (n,)).tolist() for n in (7, 19, 12)]
        with torch.no_grad():
            feats, last = tapped_states(model, seqs, [0, 1])
            for j, s in enumerate(seqs):
                alone = model.base_model(input_ids=torch.tensor([s]), output_hidden_states=True)
                torch.testing.assert_close(feats[j, :len(s)], backbone_features(model, torch.tensor(s), [0, 1]))
                torch.testing.assert_close(last[j, :len(s)], alone.last_hidden_state[0])


def test_a_step_in_one_pass_or_one_answer_at_a_time_gives_the_same_loss_and_gradients():
    """train/block.py runs a step's answers through the drafter in one padded pass on a GPU and one at a time
    (each trimmed to its own length and blocks) on a CPU, with its attention in one kernel or not: the same
    loss, hits and gradients."""
    from collocate.train.block import padded, passes, step_terms
    model = tiny_qwen()
    drafter = drafter_for(model, layers=2, block_size=4)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    seqs = [(torch.randint(3, 96, (n,)).tolist(), 4) for n in (30, 18, 25)]
    feats = torch.stack([torch.cat([backbone_features(model, torch.tensor(s), drafter.c.taps),
                                    torch.randn(30 - len(s), len(drafter.c.taps) * 32)]) for s, _ in seqs]).detach()
    tokens = padded([s for s, _ in seqs], -100, "cpu")
    anchors = torch.nn.utils.rnn.pad_sequence([torch.tensor(a) for a in ([4, 9, 27], [5, 16], [4, 12])],
                                              batch_first=True, padding_value=-1)
    got = []
    for together, fused in ((True, False), (False, False), (True, True), (False, True)):
        drafter.zero_grad()
        terms = step_terms(drafter, embed, lm_head, seqs, tokens, feats, anchors, together=together, fused=fused)
        terms.mean().backward()
        got.append((terms.mean().detach(), terms.hits, [p.grad.clone() for p in drafter.parameters()]))
    assert [(p.width, p.blocks) for p in passes(seqs, anchors, False)] == [(30, 3), (18, 2), (25, 2)]
    assert [(p.rows, p.width, p.blocks) for p in passes(seqs, anchors, True)] == [(slice(0, 3), 30, 3)]
    for other in got[1:]:
        torch.testing.assert_close(got[0][0], other[0])
        assert torch.equal(got[0][1], other[1])
        for a, b in zip(got[0][2], other[2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_kl_term_reads_the_backbone_where_each_slot_drafts():
    """With the backbone's logits as teacher, slot k of the block at a learns the distribution at a+k-1 (the
    one that gives token a+k): a teacher equal there to the drafter's own logits adds nothing, another adds."""
    model = tiny_qwen()
    drafter = drafter_for(model, layers=1, block_size=4)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    tokens = torch.randint(3, 96, (30,))
    feats = backbone_features(model, tokens, drafter.c.taps).detach()
    anchors = torch.tensor([2, 9, 27])  # the last block runs past the end: its slots there count for nothing
    with torch.no_grad():
        own = drafter.logits(embed, lm_head, tokens, feats, anchors)  # (3, 3, V)
        teacher = torch.randn(30, own.shape[-1])
        for i, a in enumerate(anchors.tolist()):
            for k in range(1, 4):
                if a + k < 30:
                    teacher[a + k - 1] = own[i, k - 1]
        ce, hits = drafter.loss(embed, lm_head, tokens, feats, anchors)
        same, hits2 = drafter.loss(embed, lm_head, tokens, feats, anchors, teacher=teacher, kl_weight=1.0)
        other, _ = drafter.loss(embed, lm_head, tokens, feats, anchors, teacher=torch.randn(30, own.shape[-1]),
                                kl_weight=1.0)
    torch.testing.assert_close(same, ce, rtol=1e-5, atol=1e-5)
    assert torch.equal(hits, hits2) and other > ce + 0.1


def test_a_drafter_started_from_the_backbones_last_layers_reads_the_context_as_the_first_of_them():
    """--block-init backbone: each layer starts as one of the backbone's last ones and fc passes the deepest
    tap through, so the first layer's context values are that backbone layer's own values of it; a drafter
    whose sizes are not the backbone's, or that has more layers, is refused."""
    model = tiny_llama()
    drafter = drafter_for(model, layers=2).init_from(model, layers=True)
    theirs = model.model.layers[-2:]
    for mine, src in zip(drafter.layers, theirs):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "input_layernorm"):
            assert torch.equal(mine.get_submodule(name).weight, src.get_submodule(name).weight), name
    tokens = torch.randint(3, 96, (12,))
    feats = backbone_features(model, tokens, drafter.c.taps)
    d, deepest = model.config.hidden_size, drafter.c.taps.index(max(drafter.c.taps))
    with torch.no_grad():
        _, v = drafter.layers[0].kv(drafter.context(feats), torch.arange(12))
        want = theirs[0].self_attn.v_proj(theirs[0].input_layernorm(feats[:, deepest * d:(deepest + 1) * d]))
    torch.testing.assert_close(v, want.view(12, drafter.c.kv_heads, -1).transpose(0, 1))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight is"):
        drafter_for(model, layers=1, intermediate_size=48).init_from(model, layers=True)
    with pytest.raises(ValueError, match="cannot start 3 block-drafter layers from a backbone of 2"):
        drafter_for(model, layers=3).init_from(model, layers=True)


def test_weights_are_named_as_dflash_checkpoints_name_them():
    names = set(drafter_for(tiny_llama(), layers=2).state_dict())
    per_layer = {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"} \
        | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert names == {f"layers.{i}.{n}" for i in range(2) for n in per_layer} | {"fc.weight", "hidden_norm.weight", "norm.weight"}


def block_bundle(model, *, block_size=5, vocab=0, steps=200, answers=32, prompt=None, token_cond=False):
    """A block-drafter bundle trained a little on the model's own greedy answers, so that some drafts are
    kept (and a kept row's context matters to the next draft); given a prompt, on answers sampled from it
    (at temperature 1), so that its drafts there carry the model's mass. token_cond: its slots follow the
    token before them."""
    c = BlockConfig.for_backbone(model, layers=1, block_size=block_size, token_cond=token_cond)
    torch.manual_seed(1)  # (the layers' own initialisation, as training starts from)
    bundle = MTPBundle.for_backbone(model, k=block_size, base_model="tiny", has_gates=False, drafter="block",
                                    block=c.as_dict(), draft_vocab=vocab)
    randomize(bundle.clp, seed=1, scale=1.0)
    bundle.heads.init_from(model)
    if vocab:
        bundle.draft_ids.copy_(torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(1))[:vocab])
    block, embed, lm_head = bundle.heads.requires_grad_(True), model.get_input_embeddings(), model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    if prompt is None:
        seqs = [model.generate(torch.randint(3, 96, (1, 6), generator=g), max_new_tokens=60, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0] for _ in range(answers)]
    else:
        torch.manual_seed(2)
        seqs = list(model.generate(torch.tensor([prompt] * answers), max_new_tokens=12, do_sample=True, top_k=0,
                                   temperature=1.0, pad_token_id=0, eos_token_id=None))
    feats = [backbone_features(model, s, c.taps) for s in seqs]
    opt = torch.optim.AdamW(block.parameters(), lr=1e-2)
    for step in range(steps):
        s, f = seqs[step % answers], feats[step % answers]
        loss, _ = block.loss(embed, lm_head, s, f, torch.arange(1, s.shape[0] - 1, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return with_rank_probs(bundle.eval().requires_grad_(False))


@pytest.fixture(scope="module", params=[tiny_llama, tiny_qwen])
def trained(request):
    model = request.param()
    return model, block_bundle(model)


def test_block_verify_is_ar_and_both_backends_agree(trained):
    """Chain and tree verify with the block drafter give ar's tokens (float32), and the fast backend gives
    the eager one's tokens, stats and proposals in every mode the block drafter runs."""
    model, bundle = trained
    ref, dec = eager(model, bundle), fast(model, bundle)
    steps = 0
    for p in prompts(4, seed=9):
        ar = ref.generate(p, DecodeConfig(mode="ar", max_new_tokens=40))
        for cfg in (DecodeConfig(mode="verify", max_new_tokens=40), DecodeConfig(mode="verify", max_new_tokens=40, tree_size=12),
                    DecodeConfig(mode="verify", max_new_tokens=40, tree_size=12, tree_depth=2),
                    DecodeConfig(mode="verify", max_new_tokens=40, candidates=3)):
            a, b = ref.generate(p, cfg), dec.generate(p, cfg)
            assert a.tokens == ar.tokens and b.tokens == a.tokens
            assert a.stats.counts() == b.stats.counts() and a.proposals == b.proposals
            steps += a.stats.steps
        for cfg in (DecodeConfig(mode="clp", max_new_tokens=40, threshold=0.0), DecodeConfig(mode="verify", adaptive=True,
                                                                                              max_new_tokens=40, threshold=0.0)):
            a, b = ref.generate(p, cfg), dec.generate(p, cfg)
            assert b.tokens == a.tokens and a.stats.counts() == b.stats.counts() and a.proposals == b.proposals
    assert steps < 0.8 * 4 * 4 * 40  # drafts were kept: the kept rows' context was read


def test_each_draft_reads_the_context_the_kept_tokens_left(trained):
    """Every chain the decoder drafted is the argmax of the block's training-path logits at that anchor over
    the final sequence (up to a float32 near-tie: the fast backend sums in another order): the step wrote
    each kept row's states at its position, and no rejected row was read; a long prompt's pieces each wrote
    theirs (the fast backend in pieces of 64 rows)."""
    from collocate.decode import Decoder
    from collocate.fast import StaticBackend

    model, bundle = trained
    block, embed, lm_head = bundle.heads, model.get_input_embeddings(), model.get_output_embeddings()
    pieces = Decoder(StaticBackend(model, max_len=250, graphs=False, piece=64), None, bundle, eos_token_ids=[2])
    long = (prompts(1, seed=4)[0] * 200)[:150]
    for dec, ps in ((eager(model, bundle), prompts(3, seed=5)), (fast(model, bundle), prompts(3, seed=5)),
                    (pieces, [long])):
        for p in ps:
            out = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=40))
            seq = torch.tensor(p + out.tokens)
            feats = backbone_features(model, seq, block.c.taps)
            checked = [(i, chain) for i, chain in out.proposals if len(p) + i < len(seq)]
            anchors = torch.tensor([len(p) + i for i, _ in checked])
            logits = block.logits(embed, lm_head, seq, feats, anchors)  # (anchors, B-1, V)
            for row, (_, chain) in zip(logits, checked):
                for slot, token in enumerate(chain):  # the same token, or one within a near-tie of it
                    assert row[slot, token] >= row[slot].max() - 1e-4, (len(p), slot, token, row[slot].argmax())


def test_block_bundle_saves_as_format_4_and_refuses_what_does_not_fit(tmp_path):
    import json

    from collocate.errors import BundleError

    model = tiny_llama()
    c = BlockConfig.for_backbone(model, layers=1, block_size=5)
    bundle = randomize(MTPBundle.for_backbone(model, k=5, base_model="tiny", has_gates=False, drafter="block",
                                              block=c.as_dict()), seed=1)
    bundle.save_pretrained(tmp_path / "b")
    raw = json.loads((tmp_path / "b" / "config.json").read_text())
    assert raw["format_version"] == 4 and raw["drafter"] == "block" and raw["block"]["taps"] == c.taps
    loaded = MTPBundle.from_pretrained(tmp_path / "b", backbone=model)
    for name, t in bundle.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t)
    with pytest.raises(BundleError, match="LM-head weights differ"):  # a block drafter for another backbone
        MTPBundle.from_pretrained(tmp_path / "b", backbone=tiny_llama(seed=5))
    for change, word in (({"k": 6}, "block_size 5, k 6"), ({"block": {}}, "sizes in 'block'"),
                         ({"format_version": 3}, "format 4 or later"), ({"block": {**c.as_dict(), "wings": 2}}, "not a block"),
                         ({"drafter": "blocky"}, "unknown drafter type"), ({"format_version": 6}, "Upgrade collocate"),
                         ({"block": {**c.as_dict(), "token_cond": True}}, "format 5 or later")):
        (tmp_path / "b" / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(BundleError, match=word):
            MTPBundle.from_pretrained(tmp_path / "b")


def test_exact_verify_with_a_block_drafter_is_bitwise_ar(trained):
    """--exact in bf16: verify with the block drafter's chain (and a tree of its slots) gives ar's tokens."""
    import copy

    from collocate.modes import EXACT_WIDTH

    model, bundle = (copy.deepcopy(x) for x in trained)
    dec = fast(model.to(torch.bfloat16), bundle)
    kept = 0
    for p in prompts(3, seed=9):
        ar = dec.generate(p, DecodeConfig(max_new_tokens=40, exact=True))
        for extra in (dict(), dict(tree_size=EXACT_WIDTH - 1)):
            v = dec.generate(p, DecodeConfig(mode="verify", max_new_tokens=40, exact=True, **extra))
            assert v.tokens == ar.tokens, extra
            kept += v.stats.draft_accepted
    assert kept > 0


def test_a_block_at_the_context_edge_shrinks_to_the_root(trained):
    """Near the cache's end a block no longer fits: the step feeds the root alone, both backends give ar's
    tokens up to the last slot and finish by "length" (no error, nothing written past the cache)."""
    model, bundle = trained
    p = (prompts(1, seed=2)[0] * 250)[:250]
    cfg = DecodeConfig(mode="verify", max_new_tokens=40)
    ar = eager(model, bundle, eos=()).generate(p, DecodeConfig(max_new_tokens=40))
    for dec in (eager(model, bundle, eos=()), build_decoder(model, bundle=bundle, engine="fast", eos_token_ids=[],
                                                             graphs=False, max_len=256)):
        out = dec.generate(p, cfg)
        assert out.tokens == ar.tokens and len(out.tokens) == 6 and out.finish_reason == "length"


def test_a_time_budget_runs_the_schedule_on_the_clock():
    """Under --budget-minutes the learning-rate schedule stands at the further of the steps taken and the
    budget's fraction spent, so it ends (warm-up and decay complete) when the budget does."""
    from collocate.train.block import scheduled_step

    assert scheduled_step(10, 100, 5.0, None) == 10  # no budget: steps alone
    assert scheduled_step(10, 100, 30.0, 60.0) == 50 and scheduled_step(80, 100, 30.0, 60.0) == 80
    assert scheduled_step(10, 100, 90.0, 60.0) == 100  # past the budget: the schedule's end


def test_the_clps_positions_come_from_few_answers_at_random():
    """block_policy_data's `limit` anchors come from as few answers as hold them at SAMPLED each (every
    answer through the backbone for a few anchors each cost a 1.5B GPU round 3 minutes), none twice."""
    import random

    from collocate.train.block import SAMPLED, sampled_answers

    answers = [(list(range(10 + i % 50 + 40)), 10) for i in range(1000)]  # 40..89 answer tokens each
    picked = sampled_answers(answers, 4000, random.Random(0))
    assert sum(min(SAMPLED, len(s) - 1 - p) for s, p in picked) >= 4000 > sum(
        min(SAMPLED, len(s) - 1 - p) for s, p in picked[:-1])
    assert len(picked) == 4000 // SAMPLED + (4000 % SAMPLED > 0) and len({id(a) for a in picked}) == len(picked)
    assert picked != answers[:len(picked)] and sampled_answers(answers, 4000, random.Random(0)) == picked


def test_an_epochs_steps_take_every_answer_once_and_answers_of_about_one_length():
    """epoch_steps: each answer once an epoch, steps of --batch anchors, a new order each epoch, and far less
    padding than steps of shuffled answers (a step runs at its longest answer's length)."""
    import random

    from collocate.train.block import block_steps, epoch_steps
    from collocate.train.config import TrainConfig

    rng = random.Random(1)
    answers = [(list(range(rng.randint(60, 500))), 40) for _ in range(3000)]
    cfg = TrainConfig(out="x", model="m", anchors=16, batch=64)
    steps = epoch_steps(answers, cfg, 0)
    assert sorted(i for step in steps for i in step) == list(range(3000))
    assert sum(sum(min(16, len(answers[i][0]) - 41) for i in step) < 64 for step in steps) <= 1  # (the last)
    assert epoch_steps(answers, cfg, 0) == steps != epoch_steps(answers, cfg, 1)

    def padding(steps):
        return sum(max(len(answers[i][0]) for i in st) * len(st) - sum(len(answers[i][0]) for i in st) for st in steps)

    order = list(range(3000))
    rng.shuffle(order)
    plain = [[order[j] for j in st] for st in block_steps([answers[i] for i in order], cfg)]
    assert padding(steps) < padding(plain) / 4


def test_a_token_conditioned_block_drafts_what_it_trained_and_verify_is_ar(tmp_path):
    """--block-tc: each slot's state follows the token before it. Decoding drafts its chain depth by depth
    and gets, at every depth, the training path's logits given the tokens it drafted; verify with its chain
    and trees gives ar's tokens (float32) on both backends, which agree; the bundle saves as format 5 and
    loads back; the DFlash export refuses it (vLLM and SGLang draft a block without the tokens)."""
    from collocate.errors import BundleError
    from collocate.export import export_dflash

    model = tiny_qwen()
    bundle = block_bundle(model, token_cond=True)
    block, embed, lm_head = bundle.heads, model.get_input_embeddings(), model.get_output_embeddings()
    assert block.tc is not None and block.tc.out.weight.abs().sum() > 0  # (it trained: the update is not zero)
    ids = torch.randint(3, 96, (30,))
    feats = backbone_features(model, ids, block.c.taps)
    a = 17
    with torch.no_grad():
        cache = block.allocate(64, ids.device, torch.float32)
        block.extend(cache, feats[:a], torch.arange(a))
        x = block.draft_states(cache, embed, ids[a], torch.tensor(a), attn_len=48)
        drafted, s = [ids[a]], None
        for slot in range(1, block.c.block_size):  # the chain, as BlockDrafter drafts it
            s = block.step(x, s if s is not None else x[:1], embed(drafted[-1].view(1)), slot)
            drafted.append(lm_head(block.norm(s)).argmax(-1)[0])
        seq = torch.cat([ids[:a], torch.stack(drafted)])  # the training path reads the drafted tokens
        want = block.logits(embed, lm_head, seq, backbone_features(model, seq, block.c.taps), torch.tensor([a]))[0]
        assert torch.equal(want.argmax(-1), torch.stack(drafted[1:]))
    ref, dec = eager(model, bundle), fast(model, bundle)
    steps = 0
    for p in prompts(3, seed=9):
        ar = ref.generate(p, DecodeConfig(mode="ar", max_new_tokens=40))
        for cfg in (DecodeConfig(mode="verify", max_new_tokens=40), DecodeConfig(mode="verify", max_new_tokens=40, tree_size=12),
                    DecodeConfig(mode="verify", max_new_tokens=40, tree_size=12, tree_depth=2)):
            r, b = ref.generate(p, cfg), dec.generate(p, cfg)
            assert r.tokens == ar.tokens and b.tokens == r.tokens
            assert r.stats.counts() == b.stats.counts() and r.proposals == b.proposals
            steps += r.stats.steps
        cfg = DecodeConfig(mode="verify", adaptive=True, max_new_tokens=40, threshold=0.0)  # (the CLP reads its chain)
        r, b = ref.generate(p, cfg), dec.generate(p, cfg)
        assert r.tokens == ar.tokens and b.tokens == r.tokens and r.proposals == b.proposals
    assert steps < 0.8 * 3 * 3 * 40  # drafts were kept
    bundle.save_pretrained(tmp_path / "b")
    again = MTPBundle.from_pretrained(tmp_path / "b")
    assert again.config.format_version == 5 and again.heads.c.token_cond
    assert torch.equal(again.heads.tc.out.weight, block.tc.out.weight)
    with pytest.raises(BundleError, match="block-tc"):
        export_dflash(bundle, model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    plain = BlockConfig.for_backbone(model, layers=1, block_size=5)
    assert "token_cond" not in plain.as_dict()  # a plain drafter's config stays format 4's
