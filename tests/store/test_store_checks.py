"""Every public input of the store is checked before the database sees it; a ValueError names the field and
never echoes a huge value back."""

from __future__ import annotations

import pytest
from store_fixtures import make_record, run_arguments

from qdemo.store import StoreSettings, open_store

HUGE = "x" * 5_000_000


@pytest.fixture
def sqlite_store(tmp_path):
    with open_store(StoreSettings(data_dir=tmp_path)) as store:
        yield store


@pytest.mark.parametrize("field, value", [
    ("session", ""), ("session", "s" * 201), ("session", HUGE), ("session", 7), ("session", "a\x00b"),
    ("kind", "Chat!"), ("kind", ""), ("kind", None), ("model", ""), ("model", b"qwen"), ("forward", None),
    ("settings", "temperature=1"), ("settings", {"f": object()}), ("seed", 1.5), ("seed", True),
    ("seed", 2 ** 63), ("prompt_ids", "1,2"), ("prompt_ids", [1, True]), ("prompt_ids", [1, -2]),
    ("prompt_ids", [1, 2.0]), ("record_json", "{not json"), ("record_json", {"a": 1}), ("record_json", HUGE),
    ("tokens", -1), ("tokens", "6"), ("tok_s", float("nan")), ("tok_s", -1.0), ("ttft_s", "0.3"),
    ("ttft_s", float("inf")), ("reason", None), ("reason", "r" * 101),
])
def test_a_bad_run_field_is_named_and_nothing_is_stored(sqlite_store, field, value):
    arguments = {**run_arguments(make_record()), field: value}
    with pytest.raises(ValueError, match=field) as caught:
        sqlite_store.save_run(**arguments)
    assert len(str(caught.value)) < 200
    assert sqlite_store.runs() == []


BATTLE = dict(session="s", contender_a="qwen", contender_b="baichuan", prompt="p", answer_a="{}", answer_b="{}")


@pytest.mark.parametrize("field, value", [
    ("battle_id", ""), ("battle_id", "has space"), ("battle_id", "b" * 65), ("battle_id", 12), ("battle_id", HUGE),
    ("contender_a", ""), ("contender_b", "n" * 201), ("prompt", HUGE), ("prompt", None), ("answer_a", "nope"),
    ("answer_b", None), ("session", "s" * 201),
])
def test_a_bad_battle_field_is_named(sqlite_store, field, value):
    arguments = {"battle_id": "b-1", **BATTLE, field: value}
    with pytest.raises(ValueError, match=field) as caught:
        sqlite_store.save_battle(arguments.pop("battle_id"), **arguments)
    assert len(str(caught.value)) < 200
    assert sqlite_store.battle("b-1") is None


@pytest.mark.parametrize("field, value", [
    ("outcome", "c"), ("outcome", "A"), ("outcome", None), ("outcome", ["a"]), ("outcome", HUGE),
    ("session", ""), ("session", HUGE), ("battle_id", "no/slash"),
])
def test_a_bad_vote_field_is_named(sqlite_store, field, value):
    sqlite_store.save_battle("b-1", **BATTLE)
    arguments = {"battle_id": "b-1", "session": "s", "outcome": "a", field: value}
    with pytest.raises(ValueError, match=field) as caught:
        sqlite_store.save_vote(arguments.pop("battle_id"), **arguments)
    assert len(str(caught.value)) < 200
    assert sqlite_store.votes() == []


@pytest.mark.parametrize("call", [
    lambda s: s.runs(limit=0), lambda s: s.runs(limit=10_001), lambda s: s.runs(limit="5"),
    lambda s: s.runs(session=HUGE), lambda s: s.run("1"), lambda s: s.run(-1), lambda s: s.sweep(None),
    lambda s: s.battle("a b"), lambda s: s.prune(keep_days=0), lambda s: s.prune(keep_rows=-1),
    lambda s: s.prune(keep_days="7"),
    lambda s: s.save_sweep(session="s", model="m", forward="", grid=[1], result={}),
    lambda s: s.save_sweep(session="s", model="m", forward="", grid={}, result="r"),
])
def test_reads_and_prunes_check_their_arguments_too(sqlite_store, call):
    with pytest.raises(ValueError) as caught:
        call(sqlite_store)
    assert len(str(caught.value)) < 200
