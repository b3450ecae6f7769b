"""Several processes on one store: a writer killed with SIGKILL loses no run it reported as saved, and writers at
the same moment lose nothing, wait instead of failing, and store exactly one vote per battle. Each on SQLite (one
file) and PostgreSQL (one database)."""

from __future__ import annotations

import json
import os
import signal

import sqlalchemy as sa
from store_fixtures import make_record, run_arguments, start_together

from qdemo.core.runs import run_from_json
from qdemo.store import StoreSettings, open_store

REPORTED = 25  # runs the writer reports before it is killed
PER_WRITER = 50  # battles and votes each concurrent writer saves


def test_every_run_a_killed_writer_reported_as_saved_is_there(url, tmp_path):
    record = make_record(run_id=3)
    arguments = tmp_path / "arguments.json"
    arguments.write_text(json.dumps(run_arguments(record, session="killed")), encoding="utf-8")
    (writer,) = start_together(("runs", url, str(arguments)), go=tmp_path / "go")
    reported = []
    while len(reported) < REPORTED and (line := writer.next()) is not None:
        reported.append(int(line))
    os.kill(writer.child.pid, signal.SIGKILL)  # mid-loop: likely inside a transaction
    reported += [int(line) for line in writer.rest()]  # ids already in the pipe were committed as well
    assert len(reported) >= REPORTED, writer.why()
    assert writer.child.wait(timeout=30) == -signal.SIGKILL

    with open_store(StoreSettings(url=url)) as store:
        stored = {run.id: run for run in store.runs(session="killed", limit=10_000)}
        assert set(reported) <= set(stored)
        for run_id in reported:
            assert run_from_json(stored[run_id].record_json).to_dict() == record.to_dict()
        if url.startswith("sqlite"):
            with store._engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_two_processes_saving_battles_and_votes_at_once_lose_none(url, tmp_path):
    # Into an empty database: both processes also migrate it at the same moment.
    writers = start_together(*[("arena", url, f"w{i}", str(PER_WRITER)) for i in range(2)], go=tmp_path / "go")
    for lines in writers:
        said = lines.rest()
        assert said and json.loads(said[-1]) == {"stored": PER_WRITER}, lines.why()
    with open_store(StoreSettings(url=url)) as store:
        votes = store.votes()
        assert len(votes) == 2 * PER_WRITER
        assert {v.battle_id for v in votes} == {f"w{w}-{i}" for w in range(2) for i in range(PER_WRITER)}
        assert {(v.contender_a, v.contender_b) for v in votes} == {("qwen", "baichuan")}
        assert store.battle("w1-7").prompt == "问题 7"
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]
    engine.dispose()


def test_two_processes_voting_on_the_same_battles_store_one_vote_each(url, tmp_path):
    with open_store(StoreSettings(url=url)) as store:
        for i in range(PER_WRITER):
            store.save_battle(f"r-{i}", session="s", contender_a="qwen", contender_b="baichuan", prompt="p",
                              answer_a="{}", answer_b="{}")
    voters = start_together(*[("race", url, "r", str(PER_WRITER), outcome) for outcome in ("a", "b")],
                            go=tmp_path / "go")
    won = {}
    for outcome, lines in zip(("a", "b"), voters):
        said = lines.rest()
        assert said, lines.why()
        won[outcome] = set(json.loads(said[-1])["won"])
    assert won["a"].isdisjoint(won["b"]) and won["a"] | won["b"] == set(range(PER_WRITER))
    with open_store(StoreSettings(url=url)) as store:
        votes = store.votes()
    assert len(votes) == PER_WRITER
    assert {v.battle_id: v.outcome for v in votes} == \
        {f"r-{i}": outcome for outcome, ids in won.items() for i in ids}
