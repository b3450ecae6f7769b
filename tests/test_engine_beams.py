"""Beam search through the engine: the same tokens as transformers' generate(num_beams=n), events in the
engine's usual shape, Stop honoured, sampling with beams refused."""

from __future__ import annotations

import threading

import pytest
import torch

from qdemo.engine import collect, generate
from qdemo.events import PrefillEvent, ProgressEvent, TokenEvent
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


def test_beam_search_reports_progress_and_its_kv_cache(tiny_lm):
    """A search that shows nothing until it ends still says it is working, step by step, and its metrics
    report the beams' KV cache instead of 0 B."""
    params = SamplingParams(num_beams=3, max_new_tokens=10)
    events = list(generate(tiny_lm, messages=MESSAGES, params=params))
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    first_token = next(i for i, e in enumerate(events) if isinstance(e, TokenEvent))
    assert progress and all(events.index(p) < first_token for p in progress)
    assert [p.step for p in progress] == list(range(1, len(progress) + 1))
    assert all(p.phase == "beam search" and p.total == 10 for p in progress)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    cfg = tiny_lm.model.config
    per_token_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    prefill = next(e for e in events if isinstance(e, PrefillEvent))
    # three beams' rows, each holding the prompt and the generated tokens but the last
    assert prefill.kv_cache_bytes >= 3 * per_token_row * len(prefill.prompt_ids)
    assert all(t.kv_cache_bytes == prefill.kv_cache_bytes for t in tokens)


def test_closing_a_beam_search_early_ends_the_search(tiny_lm):
    params = SamplingParams(num_beams=2, max_new_tokens=150)
    forwards = []
    handle = tiny_lm.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        stream = generate(tiny_lm, messages=MESSAGES, params=params, ignore_eos=True)
        seen = 0
        for event in stream:
            seen += isinstance(event, ProgressEvent)
            if seen == 3:
                break
        stream.close()  # joins the search thread, which must stop within a step instead of running 150
    finally:
        handle.remove()
    assert not any(t.name.startswith("beam-search") for t in threading.enumerate())
    assert len(forwards) < 50  # far from the 150 steps it would have run
