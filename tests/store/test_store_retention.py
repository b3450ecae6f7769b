"""Retention: old runs are pruned by age and by count; votes (the leaderboard) and battles stay."""

from __future__ import annotations

import sqlalchemy as sa
from store_fixtures import make_record, run_arguments

from qdemo.store import StoreSettings, open_store


def _save(store, n: int) -> list[int]:
    arguments = run_arguments(make_record())
    return [store.save_run(**arguments) for _ in range(n)]


def _age(url: str, run_ids: list[int], days: float) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE runs SET created_at = created_at - :s WHERE id IN :ids")
                           .bindparams(sa.bindparam("ids", expanding=True)), {"s": days * 86_400, "ids": run_ids})
    engine.dispose()


def test_prune_by_days_removes_only_the_older_runs(store, url):
    ids = _save(store, 5)
    _age(url, ids[:2], days=10)
    _age(url, ids[2:3], days=2)
    assert store.prune(keep_days=5) == 2
    assert [r.id for r in store.runs()] == ids[:1:-1]
    assert store.prune(keep_days=1.5) == 1 and store.prune(keep_days=1.5) == 0
    assert [r.id for r in store.runs()] == ids[:2:-1]


def test_prune_by_rows_keeps_the_newest(store):
    ids = _save(store, 6)
    assert store.prune(keep_rows=4) == 2
    assert [r.id for r in store.runs()] == ids[:1:-1]
    assert store.prune(keep_rows=10) == 0
    assert store.prune(keep_rows=0) == 4 and store.runs() == []


def test_prune_keeps_votes_battles_and_sweeps(store, url):
    store.save_battle("b-1", session="s", contender_a="x", contender_b="y", prompt="p", answer_a="{}",
                      answer_b="{}")
    store.save_vote("b-1", session="s", outcome="b")
    sweep_id = store.save_sweep(session="s", model="m", forward="", grid={"t": [1]}, result=[])
    _age(url, _save(store, 2), days=400)
    assert store.prune(keep_days=1, keep_rows=0) == 2
    assert [v.outcome for v in store.votes()] == ["b"] and store.battle("b-1") and store.sweep(sweep_id)


def test_the_settings_retention_applies_on_open_and_to_a_bare_prune(store, url):
    ids = _save(store, 5)
    _age(url, ids[:1], days=30)
    with open_store(StoreSettings(url=url, keep_days=7, keep_rows=3)) as kept:
        assert [r.id for r in kept.runs()] == ids[:1:-1]  # the 30-day-old one by age, one more by count
        _save(kept, 1)
        assert kept.prune() == 1
        assert len(kept.runs()) == 3
    assert store.prune() == 0  # a store without retention settings prunes nothing unless told


def test_a_long_running_store_keeps_its_retention_as_it_writes(url, monkeypatch):
    """Review of issue 21: retention ran only when the store opened, so a server up for weeks grew without bound.
    Every PRUNE_EVERY runs written, the settings' retention runs again."""
    import qdemo.store.store as store_module

    monkeypatch.setattr(store_module, "PRUNE_EVERY", 5)
    with open_store(StoreSettings(url=url, keep_rows=3)) as kept:
        _save(kept, 4)
        assert len(kept.runs()) == 4  # not yet: four runs written since the store opened
        ids = _save(kept, 1)  # the fifth: the retention runs
        assert [r.id for r in kept.runs()] == [ids[0], ids[0] - 1, ids[0] - 2]
