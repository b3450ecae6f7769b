"""Beam search through the engine: the same tokens as transformers' generate(num_beams=n), events in the
engine's usual shape, Stop honoured, sampling with beams refused."""

from __future__ import annotations

import threading

import pytest
import torch

from qdemo.engine import collect, generate
from qdemo.sampling import SamplingParams

MESSAGES = [{"role": "user", "content": "Write a haiku about 内存."}]


@pytest.mark.parametrize("beams,rp", [(2, 1.0), (4, 1.2)])
def test_beam_tokens_equal_generate(tiny_lm, beams, rp):
    params = SamplingParams(num_beams=beams, repetition_penalty=rp, max_new_tokens=12)
    run = collect(generate(tiny_lm, messages=MESSAGES, params=params))
    ids = torch.tensor([list(run["prefill"].prompt_ids)])
    expected = tiny_lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=beams,
                                      max_new_tokens=12, repetition_penalty=rp, length_penalty=1.0,
                                      early_stopping=False,
                                      eos_token_id=sorted(tiny_lm.eos_token_ids | tiny_lm.stop_token_ids),
                                      pad_token_id=tiny_lm.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    tokens = [t.token_id for t in run["tokens"]]
    assert tokens == expected[:len(tokens)] and len(tokens) == len(expected)
    done = run["done"]
    assert done.reason in ("eos", "max_tokens") and done.token_ids == tuple(tokens)
    assert done.text == "".join(t.text for t in run["tokens"])
    assert all(t.stages[0].name == "beam" and 0 < t.stages[0].chosen_prob <= 1 for t in run["tokens"])
    assert done.stats.new_tokens == len(tokens) and done.stats.ttft_seconds > 0


def test_stop_ends_beam_search_within_one_step(tiny_lm):
    stop = threading.Event()
    stop.set()
    params = SamplingParams(num_beams=2, max_new_tokens=50)
    done = collect(generate(tiny_lm, messages=MESSAGES, params=params, stop_event=stop))["done"]
    assert done.reason == "stopped" and done.stats.new_tokens <= 1


def test_sampling_with_beams_is_refused():
    with pytest.raises(ValueError, match="num_beams"):
        SamplingParams(do_sample=True, temperature=0.7, num_beams=3)
    with pytest.raises(ValueError, match="num_beams"):
        SamplingParams(num_beams=0)
