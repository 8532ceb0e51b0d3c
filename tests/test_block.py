"""The block drafter (collocate/block.py): its decoding path (a context cache by position, one block)
gives its training path's logits, and a few steps of training on a model's own answers lower its loss."""
import torch

from collocate.block import BlockConfig, BlockDrafter, backbone_features
from conftest import copy_model, randomize, tiny_llama, tiny_qwen


def drafter_for(model, **kw):
    torch.manual_seed(0)
    return randomize(BlockDrafter(BlockConfig.for_backbone(model, **kw)), seed=1, scale=1.0)


def test_taps_spread_over_the_backbone_and_sizes_follow_it():
    from transformers import Qwen2Config

    class Fake:
        def __init__(self, n):
            self.config = Qwen2Config(num_hidden_layers=n, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=100)

    assert BlockConfig.for_backbone(Fake(24)).taps == [1, 6, 11, 16, 21]  # as the public 24-layer drafters
    assert BlockConfig.for_backbone(Fake(28)).taps == [1, 7, 13, 19, 25]
    c = BlockConfig.for_backbone(Fake(28), layers=2, block_size=8, intermediate_size=96)
    assert (c.layers, c.block_size, c.intermediate_size, c.heads, c.kv_heads, c.head_dim) == (2, 8, 96, 4, 2, 16)


def test_decoding_from_the_cache_gives_the_training_logits():
    for make in (tiny_llama, tiny_qwen):
        model = make()
        drafter = drafter_for(model, layers=2, block_size=6)
        embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
        tokens = torch.randint(3, 96, (40,))
        feats = backbone_features(model, tokens, drafter.c.taps)
        anchors = torch.tensor([1, 7, 20, 38])
        with torch.no_grad():
            trained = drafter.logits(embed, lm_head, tokens, feats, anchors)  # (4, 5, V)
            drafter.allocate(64, tokens.device, torch.float32)
            for i, a in enumerate(anchors.tolist()):
                drafter.extend(feats[:a], torch.arange(a))
                drafter.extend(torch.randn(3, feats.shape[1]), torch.arange(a, a + 3))  # a rejected draft's rows
                decoded = drafter.draft(embed, lm_head, tokens[a], torch.tensor(a), attn_len=48)
                torch.testing.assert_close(decoded, trained[i], rtol=1e-4, atol=1e-4)


def test_training_on_the_models_own_answers_lowers_the_loss():
    model = copy_model()  # (its answers repeat the prompt's last token: a pattern a drafter can learn fast)
    drafter = drafter_for(model, block_size=4)
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


def test_weights_are_named_as_dflash_checkpoints_name_them():
    names = set(drafter_for(tiny_llama(), layers=2).state_dict())
    per_layer = {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"} \
        | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert names == {f"layers.{i}.{n}" for i in range(2) for n in per_layer} | {"fc.weight", "hidden_norm.weight", "norm.weight"}
