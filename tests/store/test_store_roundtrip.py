"""Every table written and read back through `Store`, on SQLite and on PostgreSQL (see conftest.py)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from store_fixtures import make_record, run_arguments

from qdemo.core.runs import run_from_json
from qdemo.store import StoreSettings, open_store


def test_a_run_reads_back_as_saved_and_its_record_parses_to_the_same_run(store):
    record = make_record(run_id=4)
    arguments = run_arguments(record)
    run_id = store.save_run(**arguments)
    got = store.run(run_id)
    assert got is not None and got.id == run_id
    assert (got.session, got.kind, got.model, got.forward, got.settings, got.seed, got.prompt_ids, got.tokens,
            got.tok_s, got.ttft_s, got.reason) == \
        ("session-1", "chat", "tiny-qwen2", "torch fp32", record.settings, 11, [151644, 872, 198, 100, 101], 6,
         19.5, 0.3, "eos")
    assert run_from_json(got.record_json).to_dict() == record.to_dict()
    assert "你好，世界🚀" in got.record_json  # stored as UTF-8 text, not as \u escapes
    assert abs(got.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_runs_are_listed_newest_first_and_a_session_sees_only_its_own(store):
    record = make_record()
    ids = [store.save_run(**{**run_arguments(record, session=s), "model": m})
           for s, m in [("alice", "qwen"), ("bob", "qwen"), ("alice", "baichuan"), ("alice", "qwen")]]
    assert [r.id for r in store.runs()] == ids[::-1]
    assert [r.id for r in store.runs(session="alice")] == [ids[3], ids[2], ids[0]]
    assert [r.id for r in store.runs(session="alice", model="qwen")] == [ids[3], ids[0]]
    assert [r.id for r in store.runs(forward="llama.cpp Q4_K_M")] == []
    assert [r.id for r in store.runs(limit=2)] == [ids[3], ids[2]]
    listed = store.runs(session="bob", with_record=False)
    assert [(r.id, r.record_json, r.tokens) for r in listed] == [(ids[1], "", 6)]
    assert store.run(ids[1], session="alice") is None and store.run(ids[1], session="bob").id == ids[1]
    assert store.run(10 ** 9) is None


def test_a_greedy_run_keeps_its_empty_measures(store):
    arguments = {**run_arguments(make_record()), "seed": None, "tok_s": None, "ttft_s": None, "forward": "",
                 "prompt_ids": []}
    got = store.run(store.save_run(**arguments))
    assert (got.seed, got.tok_s, got.ttft_s, got.forward, got.prompt_ids) == (None, None, None, "", [])


def test_a_sweep_reads_back_with_its_grid_and_result(store):
    grid = {"temperature": [0.2, 0.7], "top_p": [0.9, 1.0], "seeds": [1, 2, 3]}
    result = {"cells": [{"temperature": 0.2, "texts": ["一", "二"], "distinct": 2}], "cut": None}
    sweep_id = store.save_sweep(session="alice", model="qwen", forward="torch fp32", grid=grid, result=result)
    got = store.sweep(sweep_id)
    assert (got.id, got.session, got.model, got.forward, got.grid, got.result) == \
        (sweep_id, "alice", "qwen", "torch fp32", grid, result)
    assert store.sweep(sweep_id, session="bob") is None and store.sweep(sweep_id + 1) is None


def test_a_battle_and_its_one_vote_read_back(store):
    answer_a, answer_b = json.dumps({"text": "甲"}, ensure_ascii=False), json.dumps({"text": "乙"})
    store.save_battle("b-1", session="alice", contender_a="qwen", contender_b="baichuan", prompt="写一首诗",
                      answer_a=answer_a, answer_b=answer_b)
    got = store.battle("b-1")
    assert (got.id, got.session, got.contender_a, got.contender_b, got.prompt, got.answer_a, got.answer_b) == \
        ("b-1", "alice", "qwen", "baichuan", "写一首诗", answer_a, answer_b)
    assert store.battle("b-2") is None
    assert store.save_vote("b-1", session="bob", outcome="tie") is True
    assert store.save_vote("b-1", session="carol", outcome="a") is False  # the first vote stands
    assert [(v.battle_id, v.session, v.outcome, v.contender_a, v.contender_b) for v in store.votes()] == \
        [("b-1", "bob", "tie", "qwen", "baichuan")]


def test_a_battle_id_is_stored_once_and_a_vote_needs_a_stored_battle(store):
    kwargs = dict(session="s", contender_a="x", contender_b="y", prompt="", answer_a="{}", answer_b="{}")
    store.save_battle("same", **kwargs)
    with pytest.raises(ValueError, match="battle_id 'same' is already stored"):
        store.save_battle("same", **kwargs)
    with pytest.raises(ValueError, match=r"battle_id 'zzzzzzzzzzzzzzzzzzzz'… names no stored battle"):
        store.save_vote("z" * 64, session="s", outcome="a")
    assert store.votes() == []


def test_each_outcome_is_stored(store):
    for outcome in ("a", "b", "tie", "both_bad"):
        store.save_battle(f"b-{outcome}", session="s", contender_a="x", contender_b="y", prompt="p",
                          answer_a="{}", answer_b="{}")
        assert store.save_vote(f"b-{outcome}", session="s", outcome=outcome)
    assert [v.outcome for v in store.votes()] == ["a", "b", "tie", "both_bad"]


def test_a_second_store_on_the_same_database_sees_the_first_ones_rows(store, url):
    run_id = store.save_run(**run_arguments(make_record()))
    with open_store(StoreSettings(url=url)) as other:
        assert other.run(run_id).record_json == store.run(run_id).record_json


def test_the_store_turned_off_is_none(tmp_path):
    assert open_store(StoreSettings(data_dir=tmp_path, enabled=False)) is None
    assert list(tmp_path.iterdir()) == []


def test_the_default_file_is_in_the_data_dir_in_wal_mode(tmp_path):
    with open_store(StoreSettings(data_dir=tmp_path / "deeper")) as store:
        store.save_run(**run_arguments(make_record()))
        assert store.url.endswith("/deeper/qdemo.sqlite")
        with store._engine.connect() as connection:
            pragmas = [connection.exec_driver_sql(f"PRAGMA {p}").scalar()
                       for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")]
    assert pragmas == ["wal", 1, 1, 10_000]  # synchronous 1 = NORMAL
    assert (tmp_path / "deeper" / "qdemo.sqlite").is_file()


def test_one_store_serves_many_threads_at_once(store):
    arguments = run_arguments(make_record(n_tokens=1))
    barrier = threading.Barrier(4)

    def save(_: int) -> list[int]:
        barrier.wait()
        return [store.save_run(**arguments) for _ in range(25)]

    with ThreadPoolExecutor(4) as pool:
        ids = [run_id for saved in pool.map(save, range(4)) for run_id in saved]
    assert len(set(ids)) == 100 and sorted(r.id for r in store.runs(limit=1000)) == sorted(ids)
