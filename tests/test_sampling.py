from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from qdemo.sampling import SamplingParams, build_stages


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0),
    ("top_p", 1.01), ("min_p", 1.0), ("min_p", -0.2), ("repetition_penalty", 0.0), ("max_new_tokens", 0),
    ("seed", -1), ("do_sample", "yes"), ("temperature", "hot"), ("max_new_tokens", True),
])
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value!r}" if isinstance(value, str) else field) as info:
        SamplingParams(**{field: value})
    assert str(value) in str(info.value) or repr(value) in str(info.value)


def test_temperature_zero_is_greedy():
    assert SamplingParams(do_sample=True, temperature=0.0).greedy
    assert SamplingParams(do_sample=False, temperature=0.7).greedy
    assert not SamplingParams(do_sample=True, temperature=0.7).greedy


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="top_q"):
        SamplingParams.from_dict({"top_q": 0.5})


def test_chain_equals_generate_processor_list():
    """Our staged chain, applied in one go, equals the processor list generate() builds itself."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    params = SamplingParams(do_sample=True, temperature=0.6, top_k=12, top_p=0.7, min_p=0.05,
                            repetition_penalty=1.3)
    gen_config = GenerationConfig(do_sample=True, temperature=0.6, top_k=12, top_p=0.7, min_p=0.05,
                                  repetition_penalty=1.3)
    theirs = model._get_logits_processor(generation_config=gen_config, input_ids_seq_length=4,
                                         encoder_input_ids=None, prefix_allowed_tokens_fn=None,
                                         logits_processor=LogitsProcessorList())
    ours = build_stages(params)
    assert [type(p) for _, p in ours] == [type(p) for p in theirs]
    torch.manual_seed(0)
    scores = torch.randn(1, 64) * 3
    ids = torch.tensor([[1, 5, 9, 5]])
    expected = theirs(ids, scores.clone())
    got = scores.clone()
    for _, processor in ours:
        got = processor(ids, got)
    assert torch.equal(got, expected)
