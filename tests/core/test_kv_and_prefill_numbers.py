"""The numbers a run reports about its prompt and its cache (issue 19, items 6 and 7).

Oracles: the PrefillEvent's own counts and time (how many prompt tokens were reused, how long the new ones took),
and the KV cache's size worked out by hand from the model's config: keys and values, per layer and key-value head,
head_dim numbers each, in the model's dtype, for every token a row holds."""

from __future__ import annotations

import pytest

from qdemo.core.decode import new_state
from qdemo.core.engine import collect, generate, generate_rows
from qdemo.core.events import PrefillEvent, TokenEvent
from qdemo.core.runs import RunRecord, run_from_dict
from qdemo.models.prompting import build_prompt
from qdemo.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6)


def prompt(lm, text: str) -> list[int]:
    return build_prompt(lm.tokenizer, [{"role": "user", "content": text}], lm.max_context, 10,
                        lm.spec.system_prompt).ids


def kv_per_token(lm) -> int:
    config = lm.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # fp32: 4 bytes a number


def test_a_follow_up_turn_counts_only_the_tokens_it_prefilled(tiny_lm):
    """Item 6: the prefill rate divided every prompt token by the time spent on the new ones only."""
    state = new_state(tiny_lm)
    first = prompt(tiny_lm, "tell me about the quick brown fox")
    turn1 = collect(generate(tiny_lm, input_ids=first, params=GREEDY, state=state))
    follow = first + list(turn1["done"].token_ids) + tiny_lm.tokenizer.encode(" and the lazy dog?")
    turn2 = collect(generate(tiny_lm, input_ids=follow, params=GREEDY, state=state))
    for run in (turn1, turn2):
        p, s = run["prefill"], run["done"].stats
        new = len(p.prompt_ids) - p.reused_tokens
        assert s.prompt_tokens == len(p.prompt_ids) and s.reused_tokens == p.reused_tokens
        assert s.prefilled_tokens == new
        assert s.prefill_tokens_per_s == pytest.approx(new / p.prefill_seconds)
    assert turn1["prefill"].reused_tokens == 0 and turn2["prefill"].reused_tokens >= len(first)
    assert turn2["done"].stats.prefilled_tokens < len(follow) // 2


def test_the_kv_reported_is_each_row_s_tokens_times_bytes_per_token(tiny_lm):
    """Item 7: every forward reports the cache its row uses (P prompt tokens, then one more per step); a Compare
    side's figure goes on growing by one token's bytes per step when the other side has ended."""
    ids = prompt(tiny_lm, "Write a haiku about the sea.")
    per_token = kv_per_token(tiny_lm)
    sides = [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=7)]
    events = list(generate_rows(tiny_lm, ids, sides, ignore_eos=True))
    prefills = [e for e in events if isinstance(e, PrefillEvent)]
    assert [e.kv_cache_bytes for e in prefills] == [len(ids) * per_token] * 2
    for row in (0, 1):
        tokens = [e for e in events if isinstance(e, TokenEvent) and e.row == row]
        assert [e.kv_cache_bytes for e in tokens] == [(len(ids) + k) * per_token for k in range(len(tokens))]
        # torch's cache holds exactly those tensors: the allocation is the same figure
        assert all(e.kv_allocated_bytes == e.kv_cache_bytes * 2 for e in tokens if e.step < 2)
        assert all(e.kv_allocated_bytes == e.kv_cache_bytes for e in tokens if e.step >= 2)


def test_the_allocation_is_kept_in_a_run_s_json_and_old_runs_still_read(tiny_lm):
    ids = prompt(tiny_lm, "hello")
    run = RunRecord(run_id=1, model="tiny", settings={}).extend(generate(tiny_lm, input_ids=ids, params=GREEDY))
    back = run_from_dict(run.to_dict())
    assert back.tokens[-1].kv_allocated_bytes == run.tokens[-1].kv_allocated_bytes > 0
    assert back.done.stats.reused_tokens == 0 and back.done.stats.prefilled_tokens == len(ids)
    old = run.to_dict()
    old["prefill"].pop("kv_allocated_bytes")
    for t in old["tokens"]:
        t.pop("kv_allocated_bytes")
    old["done"]["stats"].pop("reused_tokens")
    again = run_from_dict(old)
    assert again.tokens[0].kv_allocated_bytes == 0 and again.done.stats.prefilled_tokens == len(ids)
