"""Decode states sessions keep between turns: counted in the pool's budget, least recently used first, gone with
their model, their session, or when idle."""

from __future__ import annotations

import gc
import weakref

from qdemo.core.engine import collect
from qdemo.sampling import SamplingParams
from qdemo.services.kept_states import KeptStates
from qdemo.serving.local import leased
from qdemo.serving.pool import ModelPool


def _kept(pool, states, key: str, tokens: int):
    with leased(pool, "tiny-qwen2") as backend:
        state = backend.new_state()
        collect(backend.generate(input_ids=list(range(5, 5 + tokens)), params=SamplingParams(max_new_tokens=2),
                                 state=state))
    assert states.keep(key, state)
    return state


def test_kept_states_count_in_the_budget_and_go_least_recently_used_first(pool_registry, one_model_bytes):
    pool = ModelPool(pool_registry, "cpu", budget_bytes=10 * one_model_bytes)
    states = KeptStates(pool)
    a = _kept(pool, states, "alice", 40)
    state_bytes = a.kv_bytes()
    assert state_bytes > 0 and pool.used_bytes() == one_model_bytes + state_bytes
    _kept(pool, states, "bob", 40)
    pool.budget = one_model_bytes + int(2.5 * state_bytes)  # room for two: a third pushes the oldest out
    alice = states.take("alice", "tiny-qwen2")  # alice's next turn…
    assert alice is not None and states.keep("alice", alice)  # …makes bob the least recently used
    _kept(pool, states, "carol", 40)
    assert set(states.models()) == {"alice", "carol"}


def test_kept_states_expire_and_go_with_their_model_and_session(pool_registry, one_model_bytes):
    pool = ModelPool(pool_registry, "cpu", budget_bytes=10 * one_model_bytes)
    states = KeptStates(pool)
    state = _kept(pool, states, "tab", 30)
    cache = weakref.ref(state.cache)
    del state
    assert states.take("tab", "another-model") is None and "tab" not in states.models()
    gc.collect()
    assert cache() is None  # a state of another model is dropped, and its memory with it
    _kept(pool, states, "tab", 30)
    assert states.drop(key="tab") == 1 and states.held_bytes() == 0  # the tab closed
    _kept(pool, states, "idle", 30)
    states.idle_s = 0.0
    assert states.take("idle", "tiny-qwen2") is None  # idle too long
    states.idle_s = 900.0
    _kept(pool, states, "left", 30)
    assert pool.unload("tiny-qwen2") and states.models() == {}


def test_a_model_load_makes_room_by_dropping_kept_states_first(pool_registry, one_model_bytes):
    pool = ModelPool(pool_registry, "cpu", budget_bytes=int(2.2 * one_model_bytes))
    states = KeptStates(pool)
    state = _kept(pool, states, "tab", 60)
    pool.budget = 2 * one_model_bytes + state.kv_bytes() // 2  # both models fit only without the kept state
    pool.get("tiny-b")
    assert pool.loaded() == ["tiny-qwen2", "tiny-b"] and states.models() == {}
