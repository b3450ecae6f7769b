"""Beam search through the engine: the same tokens as transformers' generate(num_beams=n), events in the
engine's usual shape, Stop honoured, sampling with beams refused."""

from __future__ import annotations

import threading

import pytest
import torch

from qdemo.core.engine import collect, generate
from qdemo.core.events import ProgressEvent, TokenEvent
from qdemo.sampling import SamplingParams, build_stages

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


def test_beam_search_streams_its_best_beam_and_reports_its_kv_cache(tiny_lm):
    """Beam search runs on the decode state a step at a time: after the prefill, a ProgressEvent per step carries
    the best running beam's text and the beams' KV cache (not "0 B"); the answer's tokens come at the end."""
    params = SamplingParams(num_beams=3, max_new_tokens=10)
    events = list(generate(tiny_lm, messages=MESSAGES, params=params))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "PrefillEvent" and kinds[-1] == "DoneEvent"
    first_token = kinds.index("TokenEvent")
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert progress and all(events.index(p) < first_token for p in progress)
    assert [p.step for p in progress] == list(range(1, len(progress) + 1))
    assert all(p.phase == "beam search" and p.total == 10 for p in progress)
    assert any(p.text for p in progress)
    cfg = tiny_lm.model.config
    per_token_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    prompt = len(events[0].prompt_ids)
    assert events[0].kv_cache_bytes == per_token_row * prompt  # the prompt, prefilled once
    # three beams' rows, each holding the prompt and the tokens fed so far
    assert progress[1].kv_cache_bytes == 3 * per_token_row * (prompt + 1)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert all(t.kv_cache_bytes == progress[-1].kv_cache_bytes for t in tokens)


def test_closing_a_beam_search_early_ends_the_search(tiny_lm):
    params = SamplingParams(num_beams=2, max_new_tokens=150)
    forwards = []
    handle = tiny_lm.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        stream = generate(tiny_lm, messages=MESSAGES, params=params, ignore_eos=True, prefill_chunk=1000)
        seen = 0
        for event in stream:
            seen += isinstance(event, ProgressEvent)
            if seen == 3:
                break
        stream.close()  # the search runs in this generator: closing it stops it at once
    finally:
        handle.remove()
    assert len(forwards) == 1 + 2  # the prefill and two decode steps: the next step's forward never ran


def test_beam_search_takes_a_gate_turn_per_forward(tiny_lm):
    """The search no longer holds the model for its whole length: every forward is its own turn at the gate, so
    other users' steps go in between."""
    from qdemo.forwards.gate import StepGate

    gate = StepGate()
    forwards = []
    handle = tiny_lm.model.register_forward_hook(lambda *args: forwards.append(gate.held_here()))
    try:
        events = list(generate(tiny_lm, messages=MESSAGES, params=SamplingParams(num_beams=2, max_new_tokens=6),
                               step_lock=gate.step, prefill_chunk=1000))
    finally:
        handle.remove()
    steps = sum(isinstance(e, ProgressEvent) for e in events)
    assert all(forwards) and gate.steps == len(forwards) == 1 + (steps - 1)


def test_beam_search_keeps_going_past_eos_with_ignore_eos(tiny_lm):
    """ignore_eos asks for a fixed length (benchmarks): beam search, like a plain run, goes on past eos. The prefill's
    logits are pushed onto <|im_end|>, so every beam would otherwise end on the first token."""
    im_end = tiny_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    forwards = []

    def push_eos_first(module, args, output):
        if not forwards:
            output.logits[..., -1, im_end] += 1e4
        forwards.append(1)

    params = SamplingParams(num_beams=2, max_new_tokens=6)
    handle = tiny_lm.model.register_forward_hook(push_eos_first)
    try:
        ended = collect(generate(tiny_lm, messages=MESSAGES, params=params, prefill_chunk=1000))
        forwards.clear()
        fixed = collect(generate(tiny_lm, messages=MESSAGES, params=params, prefill_chunk=1000, ignore_eos=True))
    finally:
        handle.remove()
    assert ended["done"].reason == "eos" and ended["done"].token_ids == (im_end,)
    assert fixed["done"].reason == "max_tokens" and len(fixed["tokens"]) == 6 and fixed["tokens"][0].token_id == im_end
    assert fixed["done"].token_ids == tuple(t.token_id for t in fixed["tokens"])
    assert fixed["done"].text == "".join(t.text for t in fixed["tokens"])


def test_beam_tokens_carry_the_top_n_of_their_step_or_no_stage(tiny_lm):
    """top_n = 0 turns stage capture off, as for plain runs; top_n = N lists the N likeliest tokens of the processed
    distribution (log-softmax, then the repetition penalty, as transformers' beam search scores them) that the
    winning beam chose each token from, with that token's transition probability as chosen_prob. The reference is
    a teacher-forced forward over the prompt and the answer."""
    params = SamplingParams(num_beams=3, repetition_penalty=1.2, max_new_tokens=8)
    off = collect(generate(tiny_lm, messages=MESSAGES, params=params, top_n=0))
    assert off["tokens"] and all(t.stages == () for t in off["tokens"])
    run = collect(generate(tiny_lm, messages=MESSAGES, params=params, top_n=4))
    assert [t.token_id for t in run["tokens"]] == [t.token_id for t in off["tokens"]]
    prompt, answer = list(run["prefill"].prompt_ids), [t.token_id for t in run["tokens"]]
    seq = torch.tensor([prompt + answer])
    with torch.inference_mode():
        logits = tiny_lm.model(seq).logits[0].float()
    penalty = build_stages(params.replace(num_beams=1))
    for i, token in enumerate(run["tokens"]):
        position = len(prompt) + i
        scores = torch.log_softmax(logits[position - 1:position], dim=-1)
        for _, processor in penalty:
            scores = processor(seq[:, :position], scores)
        top = torch.topk(scores[0], 4)
        (stage,) = token.stages
        assert stage.name == "beam" and list(stage.token_ids) == top.indices.tolist()
        assert list(stage.probs) == pytest.approx(top.values.exp().tolist(), abs=1e-4)
        assert stage.chosen_prob == pytest.approx(float(scores[0, token.token_id].exp()), abs=1e-4)
