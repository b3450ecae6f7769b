"""The decode state that outlives a call: crop + resume equals a fresh prefill, forked rows equal their solo runs,
a left-padded batch equals each prompt alone, and every forward goes through the step gate."""

from __future__ import annotations

import pytest
import torch

from qdemo.core.decode import common_prefix, decode_step, new_state, prefill
from qdemo.core.engine import collect, generate, generate_batch, generate_rows
from qdemo.core.events import DoneEvent, PrefillEvent, TokenEvent
from qdemo.forwards.gate import StepGate
from qdemo.models.prompting import build_prompt
from qdemo.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=10)
SAMPLED = SamplingParams(do_sample=True, temperature=1.0, top_k=50, seed=3, max_new_tokens=10)


def prompt(lm, messages):
    return build_prompt(lm.tokenizer, messages, lm.max_context, 10, lm.spec.system_prompt).ids


def by_row(events):
    rows: dict[int, dict] = {}
    for event in events:
        row = rows.setdefault(event.row, {"prefill": None, "tokens": [], "done": None})
        if isinstance(event, PrefillEvent):
            row["prefill"] = event
        elif isinstance(event, TokenEvent):
            row["tokens"].append(event)
        elif isinstance(event, DoneEvent):
            row["done"] = event
    return rows


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([5], [6]) == 0


def test_state_primitives_keep_the_cache_matching_the_tokens(tiny_lm):
    state = new_state(tiny_lm)
    lock = StepGate().step
    logits, _ = prefill(tiny_lm, state, [[5, 6, 7, 8]], lock, chunk=3)
    assert state.width == 4 and state.row_ids() == [5, 6, 7, 8] and state.cache.get_seq_length() == 4
    decode_step(tiny_lm, state, [9], lock)
    assert state.row_ids() == [5, 6, 7, 8, 9] and state.cache.get_seq_length() == 5
    state.crop(2)
    assert state.row_ids() == [5, 6] and state.cache.get_seq_length() == 2
    resumed, _ = prefill(tiny_lm, state, [[7, 8]], lock, chunk=8)
    torch.testing.assert_close(resumed, logits, atol=1e-4, rtol=1e-4)  # the same four tokens, the same logits
    state.fork(3)
    assert state.rows == 3 and state.cache.layers[0].keys.shape[0] == 3
    state.select([2, 0])
    assert state.rows == 2
    with pytest.raises(ValueError, match="crop needs one row"):
        state.crop(1)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_the_next_turn_reuses_the_cache_and_equals_a_full_prefill(tiny_lm, params):
    first = [{"role": "user", "content": "你好, hello there"}]
    state = new_state(tiny_lm)
    turn1 = collect(generate(tiny_lm, input_ids=prompt(tiny_lm, first), params=params, state=state))
    answer = turn1["done"].text
    assert state.row_ids() == list(turn1["prefill"].prompt_ids) + list(turn1["done"].token_ids[:-1])
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "and now?"}]
    ids = prompt(tiny_lm, second)
    reused = collect(generate(tiny_lm, input_ids=ids, params=params, state=state))
    fresh = collect(generate(tiny_lm, input_ids=ids, params=params))
    assert reused["done"].token_ids == fresh["done"].token_ids
    assert reused["prefill"].reused_tokens >= len(turn1["prefill"].prompt_ids)
    assert fresh["prefill"].reused_tokens == 0
    for a, b in zip(reused["tokens"], fresh["tokens"]):
        assert a.stages[0].probs == pytest.approx(b.stages[0].probs, abs=1e-5)


def test_regenerate_undo_and_edit_crop_the_state(tiny_lm):
    base = [{"role": "user", "content": "tell me about the quick brown fox"}]
    state = new_state(tiny_lm)
    ids = prompt(tiny_lm, base)
    collect(generate(tiny_lm, input_ids=ids, params=GREEDY, state=state))
    again = collect(generate(tiny_lm, input_ids=ids, params=GREEDY, state=state))  # Regenerate: the same prompt
    # the whole prompt and the logits after it were kept (DecodeState.tail): nothing is fed again
    assert again["prefill"].reused_tokens == len(ids)
    assert again["done"].token_ids == collect(generate(tiny_lm, input_ids=ids, params=GREEDY))["done"].token_ids
    edited = prompt(tiny_lm, [{"role": "user", "content": "tell me about the lazy dog"}])  # Undo + edit
    out = collect(generate(tiny_lm, input_ids=edited, params=GREEDY, state=state))
    assert out["prefill"].reused_tokens == common_prefix(ids, edited)
    assert out["done"].token_ids == collect(generate(tiny_lm, input_ids=edited, params=GREEDY))["done"].token_ids


def test_forked_rows_equal_their_solo_runs(tiny_lm):
    ids = prompt(tiny_lm, [{"role": "user", "content": "Write a haiku."}])
    sides = [GREEDY.replace(max_new_tokens=8), SAMPLED.replace(max_new_tokens=12),
             SAMPLED.replace(seed=9, temperature=0.7)]
    forwards = []
    handle = tiny_lm.model.get_input_embeddings().register_forward_hook(lambda *a: forwards.append(1))
    try:
        rows = by_row(generate_rows(tiny_lm, ids, sides, prefill_chunk=1000))
    finally:
        handle.remove()
    for i, params in enumerate(sides):
        solo = collect(generate(tiny_lm, input_ids=ids, params=params, prefill_chunk=1000))
        assert rows[i]["done"].token_ids == solo["done"].token_ids, i
        assert rows[i]["prefill"].seed == solo["prefill"].seed
        for a, b in zip(rows[i]["tokens"], solo["tokens"]):
            assert a.stages[-1].probs == pytest.approx(b.stages[-1].probs, abs=1e-5)
    # one prefill and one forward per step for all rows, not one per row
    assert len(forwards) == 1 + max(len(r["tokens"]) for r in rows.values()) - 1


def test_a_left_padded_batch_equals_each_prompt_alone(tiny_lm):
    prompts = [prompt(tiny_lm, [{"role": "user", "content": text}])
               for text in ("hi", "a much longer question about the quick brown fox and the lazy dog", "你好")]
    assert len({len(p) for p in prompts}) == 3
    rows = by_row(generate_batch(tiny_lm, prompts, GREEDY))
    for i, ids in enumerate(prompts):
        solo = collect(generate(tiny_lm, input_ids=ids, params=GREEDY))
        assert rows[i]["done"].token_ids == solo["done"].token_ids, i
        assert rows[i]["prefill"].prompt_ids == tuple(ids)


def test_a_batch_prefills_its_shared_prefix_once_and_each_row_equals_its_solo_run(tiny_lm):
    """Issue 20: the prompts' shared start (here the system prompt and the user header) is fed once and forked;
    the rows are padded after it. Every row's tokens and stage numbers equal its solo run, the repetition
    penalty included (it must see the row's own tokens, not its padding)."""
    prompts = [prompt(tiny_lm, [{"role": "user", "content": text}])
               for text in ("hi", "a much longer question about the quick brown fox and the lazy dog", "你好")]
    shared = min(common_prefix(prompts[0], p) for p in prompts[1:])
    assert shared > 5
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=30, repetition_penalty=1.8, seed=11,
                            max_new_tokens=8)
    fed: list[int] = []
    handle = tiny_lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: fed.append(a[0].numel()))
    try:
        rows = by_row(generate_batch(tiny_lm, prompts, params, top_n=20))
    finally:
        handle.remove()
    rests = [len(p) - shared for p in prompts]
    # the prefix once, then every row padded to the longest rest, then one token per live row per step
    assert fed[0] == shared and fed[1] == len(prompts) * max(rests)
    for i, ids in enumerate(prompts):
        solo = collect(generate(tiny_lm, input_ids=ids, params=params, top_n=20))
        assert rows[i]["done"].token_ids == solo["done"].token_ids, i
        for got, want in zip(rows[i]["tokens"], solo["tokens"]):
            for a, b in zip(got.stages, want.stages):
                assert a.token_ids == b.token_ids and a.probs == pytest.approx(b.probs, abs=1e-5), (i, a.name)


def test_a_kept_state_serves_a_batch_and_keeps_the_shared_prefix(tiny_lm):
    first = prompt(tiny_lm, [{"role": "user", "content": "hello there"}])
    state = new_state(tiny_lm)
    collect(generate(tiny_lm, input_ids=first, params=GREEDY, state=state))
    prompts = [prompt(tiny_lm, [{"role": "user", "content": text}]) for text in ("hello there, friend", "hello you")]
    shared = common_prefix(*prompts)
    rows = by_row(generate_batch(tiny_lm, prompts, GREEDY, state=state))
    assert rows[0]["prefill"].reused_tokens == min(common_prefix(first, prompts[0]), shared) > 0
    # one unpadded row: a row's own prompt and answer, or (a padded row) the prefix the rows share
    assert state.rows == 1 and not any(state.pads)
    held = state.row_ids()
    histories = [prompts[i] + list(rows[i]["done"].token_ids) for i in rows]
    assert held == prompts[0][:shared] or any(h[:len(held)] == held and len(held) > len(p)
                                              for h, p in zip(histories, prompts))
    for i, ids in enumerate(prompts):
        assert rows[i]["done"].token_ids == collect(generate(tiny_lm, input_ids=ids, params=GREEDY))["done"].token_ids


def test_every_forward_of_the_new_paths_holds_the_gate(tiny_lm):
    gate = StepGate()
    held = []
    handle = tiny_lm.model.get_input_embeddings().register_forward_hook(lambda *a: held.append(gate.held_here()))
    ids = prompt(tiny_lm, [{"role": "user", "content": "hello"}])
    try:
        state = new_state(tiny_lm)
        collect(generate(tiny_lm, input_ids=ids, params=GREEDY, state=state, step_lock=gate.step, prefill_chunk=4))
        collect(generate(tiny_lm, input_ids=ids, params=GREEDY, state=state, step_lock=gate.step))
        list(generate_rows(tiny_lm, ids, [GREEDY, SAMPLED], step_lock=gate.step))
        list(generate_batch(tiny_lm, [ids, ids[:5]], GREEDY, step_lock=gate.step))
    finally:
        handle.remove()
    assert len(held) > 20 and all(held)
    assert gate.steps == len(held)  # exactly one gate turn per forward
