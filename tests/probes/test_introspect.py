"""introspect against transformers' own eager attention, rotary module and generate (tiny models only)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from qdemo.probes.introspect import (
    attention_map,
    mean_over_heads,
    model_card,
    next_token_logits,
    rope_angles,
    rope_decay,
    rope_info,
)

IDS = [5, 17, 42, 99, 3, 250, 7, 7, 120, 64, 11]


def _in_memory(tiny_lm, model: torch.nn.Module, name: str = "in-memory"):
    """A LoadedModel around a model built in the test (no tokenizer needed by introspect)."""
    model.eval().requires_grad_(False)
    return dataclasses.replace(tiny_lm, model=model, spec=dataclasses.replace(tiny_lm.spec, name=name),
                               weight_bytes=0)


def _small_config(cls, **overrides):
    fields = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    return cls(**{**fields, **overrides})


def _sdpa_and_eager(model_cls, config, seed: int = 1):
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    sdpa = model_cls(config).eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return sdpa, eager


def _library_attentions(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    return [a[0].float().numpy() for a in out.attentions]


@pytest.fixture(scope="module")
def eager_oracle(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


# --- attention ----------------------------------------------------------------------------------------------

def test_attention_map_equals_library_eager_attentions_for_every_layer(tiny_lm, eager_oracle):
    expected = _library_attentions(eager_oracle, IDS)
    cfg = tiny_lm.model.config
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2  # GQA: each KV head serves 2 heads
    for layer, want in enumerate(expected):
        got = attention_map(tiny_lm, IDS, layer)
        assert got.dtype == np.float32 and got.shape == (4, len(IDS), len(IDS))
        assert np.abs(got - want).max() <= 1e-5
        np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=1e-5)
        assert np.all(got[:, np.triu(np.ones((len(IDS), len(IDS)), bool), k=1)] == 0)


def test_attention_map_leaves_the_model_as_it_was(tiny_lm):
    attn = tiny_lm.model.model.layers[1].self_attn
    attention_map(tiny_lm, IDS, 1)
    assert tiny_lm.model.config._attn_implementation == "sdpa"
    assert not attn._forward_pre_hooks
    assert not tiny_lm.model.config.output_attentions


def test_attention_map_stops_the_forward_after_the_wanted_layer(tiny_lm):
    calls = []
    handles = [tiny_lm.model.model.layers[-1].register_forward_hook(lambda *a: calls.append("last layer")),
               tiny_lm.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))]
    try:
        attention_map(tiny_lm, IDS, 0)
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_attention_map_single_token_is_all_on_itself(tiny_lm):
    np.testing.assert_allclose(attention_map(tiny_lm, [9], 0), np.ones((4, 1, 1), np.float32), atol=1e-6)


@pytest.mark.parametrize("variant", ["qwen3_qk_norm", "qwen2_sliding_window"])
def test_attention_map_other_llama_like_variants(tiny_lm, variant):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if variant == "qwen3_qk_norm":  # q/k RMSNorm before RoPE, head_dim not hidden/heads, no MHA grouping
        cls, config = Qwen3ForCausalLM, _small_config(Qwen3Config, head_dim=32, num_key_value_heads=1)
    else:
        cls, config = Qwen2ForCausalLM, _small_config(Qwen2Config, use_sliding_window=True, sliding_window=3,
                                                      max_window_layers=0)
    sdpa, eager = _sdpa_and_eager(cls, config)
    lm = _in_memory(tiny_lm, sdpa)
    for layer, want in enumerate(_library_attentions(eager, IDS)):
        assert np.abs(attention_map(lm, IDS, layer) - want).max() <= 1e-5
    if variant == "qwen2_sliding_window":
        assert np.all(attention_map(lm, IDS, 0)[:, 5, :3] == 0)  # keys 3+ positions back are out of the window


def test_mean_over_heads(tiny_lm):
    weights = attention_map(tiny_lm, IDS, 1)
    mean = mean_over_heads(weights)
    assert mean.shape == (len(IDS), len(IDS)) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, weights.mean(axis=0), atol=1e-7)
    with pytest.raises(ValueError, match="shape"):
        mean_over_heads(weights[0])


@pytest.mark.parametrize("call", [
    lambda lm, ids: attention_map(lm, ids, 0),
    next_token_logits,
], ids=["attention_map", "next_token_logits"])
def test_bad_ids_are_value_errors_naming_value_and_model(tiny_lm, call):
    vocab = tiny_lm.model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="tiny-qwen2.*empty"):
        call(tiny_lm, [])
    with pytest.raises(ValueError, match=rf"tiny-qwen2.*{vocab}"):
        call(tiny_lm, [1, vocab])
    with pytest.raises(ValueError, match=r"tiny-qwen2.*-1"):
        call(tiny_lm, [-1, 2])


def test_layer_out_of_range(tiny_lm):
    for layer in (2, -1):
        with pytest.raises(ValueError, match=rf"tiny-qwen2.*layer {layer}"):
            attention_map(tiny_lm, IDS, layer)


# --- RoPE ---------------------------------------------------------------------------------------------------

def test_rope_info_matches_config(tiny_lm):
    info = rope_info(tiny_lm)
    cfg = tiny_lm.model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    expected = 1.0 / theta ** (np.arange(0, d, 2) / d)
    assert (info.theta, info.head_dim, info.rope_type, info.scaling, info.attention_scaling) == (
        10000.0, 16, "default", None, 1.0)
    np.testing.assert_allclose(info.inv_freq, expected, rtol=1e-6)
    np.testing.assert_allclose(info.wavelengths, 2 * np.pi / expected, rtol=1e-6)
    assert info.wavelengths[0] == pytest.approx(2 * np.pi)


def test_rope_angles_reproduce_the_rotary_modules_cos_sin(tiny_lm):
    angles = rope_angles(tiny_lm, 300)
    assert angles.shape == (300, 8)
    rotary = tiny_lm.model.model.rotary_emb
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(300)[None])
    cos, sin = cos[0].numpy(), sin[0].numpy()
    np.testing.assert_allclose(np.cos(angles), cos[:, :8], atol=1e-5)
    np.testing.assert_allclose(np.cos(angles), cos[:, 8:], atol=1e-5)
    np.testing.assert_allclose(np.sin(angles), sin[:, :8], atol=1e-5)
    np.testing.assert_allclose(angles[7], 7 * rope_info(tiny_lm).inv_freq, rtol=1e-6)


def test_rope_decay_is_the_dot_product_of_rotated_ones(tiny_lm):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    max_d, dim = 200, 16
    distances, scores = rope_decay(tiny_lm, max_d)
    assert list(distances) == list(range(max_d + 1)) and scores[0] == pytest.approx(1.0)
    rotary = tiny_lm.model.model.rotary_emb
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1), torch.arange(max_d + 1)[None])
        ones = torch.ones(1, 1, max_d + 1, dim)
        q, _ = apply_rotary_pos_emb(ones, ones, cos, sin)  # q at position d
        k, _ = apply_rotary_pos_emb(ones[:, :, :1], ones[:, :, :1], cos[:, :1], sin[:, :1])  # k at position 0
    expected = (q[0, 0] * k[0, 0]).sum(-1).numpy() / dim
    assert np.abs(scores - expected).max() <= 1e-5
    assert scores[1:].max() < 1.0


def test_rope_info_reports_scaled_rope(tiny_lm):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = _small_config(Qwen2Config, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 64})
    lm = _in_memory(tiny_lm, Qwen2ForCausalLM(config))
    info = rope_info(lm)
    assert info.rope_type == "yarn" and info.scaling["factor"] == 4.0
    assert info.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    with torch.no_grad():
        cos, _ = lm.model.model.rotary_emb(torch.zeros(1), torch.arange(50)[None])
    np.testing.assert_allclose(np.cos(rope_angles(lm, 50)) * info.attention_scaling, cos[0, :, :8], atol=1e-5)


def test_model_without_rope_is_a_value_error(tiny_lm):
    from transformers import BloomConfig, BloomForCausalLM  # ALiBi

    lm = _in_memory(tiny_lm, BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)),
                    name="tiny-bloom")
    for call in (rope_info, lambda m: rope_angles(m, 4), lambda m: rope_decay(m, 4)):
        with pytest.raises(ValueError, match="tiny-bloom uses no RoPE"):
            call(lm)


def test_rope_counts_are_validated(tiny_lm):
    with pytest.raises(ValueError, match="positions"):
        rope_angles(tiny_lm, 0)
    with pytest.raises(ValueError, match="max_distance"):
        rope_decay(tiny_lm, -1)


# --- model card & logits ------------------------------------------------------------------------------------

def _count_qwen2_parameters(v, h, i, layers, heads, kv_heads, tied) -> int:
    d = h // heads
    attn = (h * h + h) + 2 * (h * kv_heads * d + kv_heads * d) + h * h  # q, k, v with bias; o without
    per_layer = attn + 3 * h * i + 2 * h  # gate/up/down + two RMSNorms
    return v * h + layers * per_layer + h + (0 if tied else v * h)


def test_model_card(tiny_lm):
    cfg = tiny_lm.model.config
    card = model_card(tiny_lm)
    v = cfg.vocab_size
    expected_params = _count_qwen2_parameters(v, 64, 128, 2, 4, 2, tied=False)
    assert card == {
        "model": "tiny-qwen2", "family": "qwen2", "architecture": "Qwen2ForCausalLM", "layers": 2,
        "hidden_size": 64, "intermediate_size": 128, "attention_heads": 4, "kv_heads": 2, "gqa_ratio": 2,
        "head_dim": 16, "vocab_size": v, "max_position_embeddings": 16384, "position_encoding": "rope",
        "rope_theta": 10000.0, "tie_word_embeddings": False, "parameters": expected_params, "dtype": "float32", "device": "cpu",
        "weight_bytes": expected_params * 4, "context": 256,
    }


def test_model_card_counts_tied_embeddings_once(tiny_lm):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = _small_config(Qwen2Config, tie_word_embeddings=True)
    card = model_card(_in_memory(tiny_lm, Qwen2ForCausalLM(config)))
    assert card["tie_word_embeddings"] is True
    assert card["parameters"] == _count_qwen2_parameters(300, 64, 96, 2, 4, 2, tied=True)
    assert card["weight_bytes"] == card["parameters"] * 4


def test_next_token_logits_match_forward_and_generate(tiny_lm):
    logits = next_token_logits(tiny_lm, IDS)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (
        tiny_lm.model.config.vocab_size,)
    logits.add_(0)  # an ordinary tensor, not an inference-mode one
    x = torch.tensor([IDS])
    with torch.no_grad():
        full = tiny_lm.model(x, use_cache=False).logits[0, -1]
        gen = tiny_lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, gen.logits[0][0].float(), atol=1e-5, rtol=0)

