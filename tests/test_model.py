"""The decoder: shapes, GQA, causality, packed documents, KV cache, MoE, RoPE/YaRN against transformers."""

import math

import pytest
import torch

from minimind.config import ModelConfig
from minimind.model import KVCache, MiniMindForCausalLM, rope_tables


def build(preset="tiny", *overrides, kernels="torch", **runtime):
    return MiniMindForCausalLM(ModelConfig.from_preset(preset, list(overrides), kernels=kernels, **runtime))


@pytest.mark.parametrize("moe", [False, True])
def test_forward_shapes(moe):
    model = build("tiny", f"use_moe={moe}")
    ids = torch.randint(0, 6400, (3, 17))
    out = model(ids)
    assert out.logits.shape == (3, 17, 6400)
    assert out.aux_loss.shape == ()
    hidden = model(ids, return_hidden=True)
    assert hidden.logits is None and hidden.hidden.shape == (3, 17, 128)
    torch.testing.assert_close(model.lm_head(hidden.hidden), out.logits)


def test_tied_embeddings_share_storage():
    model = build()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = build("tiny", "tie_word_embeddings=false")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_params() == model.num_params() + 6400 * 128


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A q head i must use kv head i // (Hq/Hk): duplicating each kv head's weights into an MHA
    model gives identical logits."""
    gqa = build("tiny").eval()
    c = gqa.config
    assert c.num_key_value_heads < c.num_attention_heads
    mha = build("tiny", f"num_key_value_heads={c.num_attention_heads}").eval()
    group = c.num_attention_heads // c.num_key_value_heads
    sd = gqa.state_dict()
    for name, t in list(sd.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = t.view(c.num_key_value_heads, c.head_dim, c.hidden_size)
            sd[name] = heads.repeat_interleave(group, dim=0).reshape(-1, c.hidden_size)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True])
def test_changing_a_future_token_never_changes_an_earlier_logit(moe):
    model = build("tiny", f"use_moe={moe}").eval()
    ids = torch.randint(0, 6400, (2, 20))
    changed = ids.clone()
    changed[:, 11:] = torch.randint(0, 6400, (2, 9))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11:], b[:, 11:])


@pytest.mark.parametrize("moe", [False, True])
def test_position_ids_restart_equals_separate_sequences(moe):
    model = build("tiny", f"use_moe={moe}").eval()
    doc1, doc2, doc3 = (torch.randint(0, 6400, (1, n)) for n in (7, 5, 4))
    packed = torch.cat([doc1, doc2, doc3], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5), torch.arange(4)]).unsqueeze(0)
    with torch.no_grad():
        got = model(packed, position_ids=pos).logits
        want = torch.cat([model(d).logits for d in (doc1, doc2, doc3)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_equals_full_forward():
    model = build("tiny", "qk_norm=true").eval()
    ids = torch.randint(0, 6400, (2, 12))
    cache = KVCache(model.config, batch_size=2, max_len=32)
    with torch.no_grad():
        full = model(ids).logits
        pos = torch.arange(8).unsqueeze(0).expand(2, 8)
        steps = [model(ids[:, :8], position_ids=pos, kv_cache=cache).logits]
        for t in range(8, 12):
            steps.append(model(ids[:, t : t + 1], position_ids=torch.full((2, 1), t), kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_rows_at_different_positions():
    """Continuous batching: two rows of one decode step sit at different positions."""
    model = build().eval()
    a, b = torch.randint(0, 6400, (1, 9)), torch.randint(0, 6400, (1, 5))
    cache = KVCache(model.config, batch_size=2, max_len=16)
    with torch.no_grad():
        model(a[:, :8], position_ids=torch.arange(8)[None], kv_cache=_Row(cache, 0))
        model(b[:, :4], position_ids=torch.arange(4)[None], kv_cache=_Row(cache, 1))
        step = model(torch.cat([a[:, 8:], b[:, 4:]]), position_ids=torch.tensor([[8], [4]]), kv_cache=cache).logits
        torch.testing.assert_close(step[0, -1], model(a).logits[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1, -1], model(b).logits[0, -1], rtol=1e-5, atol=1e-5)


class _Row:
    """One slot of a KVCache, for prefilling rows one at a time."""

    def __init__(self, cache, row):
        self.cache, self.row, self.max_len = cache, row, cache.max_len

    def update(self, layer, k, v, position_ids):
        self.cache.k[layer, self.row, :, position_ids[0]] = k[0].transpose(0, 1)
        self.cache.v[layer, self.row, :, position_ids[0]] = v[0].transpose(0, 1)
        return self.cache.k[layer, self.row : self.row + 1], self.cache.v[layer, self.row : self.row + 1]


def test_moe_aux_loss_positive_and_every_expert_gets_a_gradient():
    model = build("tiny", "use_moe=true", "n_routed_experts=8", "num_experts_per_tok=1").train()
    ids = torch.randint(0, 6400, (1, 3))  # 3 tokens, top-1 of 8: at least 5 experts get no token
    out = model(ids)
    assert out.aux_loss.item() > 0
    (out.logits.float().pow(2).mean() + out.aux_loss).backward()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        used = torch.zeros(8, dtype=torch.bool)
        for p in (experts.gate_proj, experts.up_proj, experts.down_proj):
            assert p.grad is not None and torch.isfinite(p.grad).all()
            used |= p.grad.flatten(1).abs().sum(1) > 0
        assert 1 <= used.sum() <= 3
        unused = ~used
        assert torch.count_nonzero(experts.gate_proj.grad[unused]) == 0
        assert layer.mlp.gate.weight.grad is not None


def test_moe_aux_loss_is_one_for_a_balanced_router_and_zero_in_eval():
    from minimind.moe import balance_loss

    b, t, e, k = 2, 8, 4, 2
    probs = torch.full((b, t, e), 1 / e)
    idx = torch.tensor([[0, 1], [2, 3]] * (t // 2)).expand(b, t, k)
    assert balance_loss(probs, idx, seq_aux=True).item() == pytest.approx(1.0)
    assert balance_loss(probs, idx, seq_aux=False).item() == pytest.approx(1.0)
    skewed = torch.zeros(b, t, k, dtype=torch.long)
    skewed[..., 1] = 1
    assert balance_loss(torch.softmax(torch.randn(b, t, e), -1), skewed, True) > 0
    model = build("tiny", "use_moe=true").eval()
    assert model(torch.randint(0, 6400, (1, 4))).aux_loss.item() == 0


def test_dropout_changes_training_outputs_only():
    model = build("tiny", "dropout=0.5")
    ids = torch.randint(0, 6400, (1, 8))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_rope_matches_transformers_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from minimind.kernels import rope_ref

    c = ModelConfig.from_preset("tiny")
    cos, sin = rope_tables(c)
    b, t, hq, hk, dh = 2, 9, 4, 2, c.head_dim
    q, k = torch.randn(b, t, hq, dh), torch.randn(b, t, hk, dh)
    pos = torch.randint(0, 100, (b, t))
    got_q, got_k = rope_ref(q, k, cos, sin, pos)
    full_cos, full_sin = torch.cat([cos, cos], -1)[pos], torch.cat([sin, sin], -1)[pos]  # (B, T, Dh)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
    torch.testing.assert_close(got_q, want_q.transpose(1, 2))
    torch.testing.assert_close(got_k, want_k.transpose(1, 2))


def test_yarn_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    c = ModelConfig.from_preset("tiny", ["max_position_embeddings=1024"], rope_scaling=scaling)
    hf = LlamaConfig(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                     max_position_embeddings=1024,
                     rope_parameters={"rope_theta": c.rope_theta, **scaling})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    cos, sin = rope_tables(c)
    t = torch.arange(1024, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    assert attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    torch.testing.assert_close(cos, freqs.cos() * attention_factor, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sin, freqs.sin() * attention_factor, rtol=1e-4, atol=1e-4)
    plain = rope_tables(ModelConfig.from_preset("tiny", ["max_position_embeddings=1024"]))[0]
    assert not torch.allclose(cos, plain)


def test_kernel_provider_choice_is_explicit():
    """An unknown provider is an error; liger either builds or says that liger-kernel is missing."""
    import importlib.util

    with pytest.raises(ValueError, match="kernels must be one of"):
        build("tiny", kernels="fast")
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ImportError, match="liger-kernel"):
            build("tiny", kernels="liger")
    else:
        assert build("tiny", kernels="liger").ops.name == "liger"


@pytest.mark.parametrize("moe", [False, True])
def test_grad_checkpointing_gives_the_same_gradients(moe):
    model = build("tiny", f"use_moe={moe}").train()
    ids = torch.randint(0, 6400, (2, 10))

    def grads():
        model.zero_grad()
        out = model(ids)
        (out.logits.float().pow(2).mean() + out.aux_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.model.grad_checkpointing = True
    again = grads()
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-6)


def test_initializer_range_sets_a_fresh_models_weight_scale():
    """initializer_range (HF's name) is the std of a fresh model's weights; the residual outputs (o_proj,
    down_proj) get it / sqrt(2 layers)."""
    for std in (0.01, 0.04):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("tiny", [f"initializer_range={std}"])
        model = MiniMindForCausalLM(cfg)
        layer = model.model.layers[0]
        assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
        assert model.model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.05)
        scaled = std / math.sqrt(2 * cfg.num_hidden_layers)
        assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    with pytest.raises(ValueError, match="initializer_range"):
        ModelConfig.from_preset("tiny", ["initializer_range=0"])
