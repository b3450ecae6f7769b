"""Migrations: an empty database reaches head, and a database at 0001 with runs in it reaches head with its runs
kept (and their new columns filled from their records); the tables at head are exactly `schema`'s."""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from store_fixtures import make_record

from qdemo.core.runs import run_from_json, run_to_json
from qdemo.store import StoreSettings, open_store
from qdemo.store.engine import make_engine
from qdemo.store.migrate import current_revision, head_revision, upgrade
from qdemo.store.schema import metadata


def test_the_newest_revision_is_0002():
    assert head_revision() == "0002"


def test_an_empty_database_reaches_head_and_matches_the_schema_module(url):
    engine = make_engine(url)
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == "0002"
    with engine.connect() as connection:
        assert set(sa.inspect(connection).get_table_names()) == {"alembic_version", "runs", "sweeps", "battles",
                                                                 "votes"}
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []
    upgrade(engine)  # at head already: nothing to do
    engine.dispose()


def _old_run(connection, answer: str, session: str) -> int:
    row = dict(created_at=1_700_000_000.5, session=session, kind="chat", model="qwen", forward="torch fp32",
               settings=json.dumps({"temperature": 0.7}), seed=11, answer=answer, tokens=6, reason="eos")
    columns = ", ".join(row)
    return connection.execute(sa.text(f"INSERT INTO runs ({columns}) VALUES ({', '.join(':' + c for c in row)}) "
                                      "RETURNING id"), row).scalar_one()


def test_a_database_at_0001_with_runs_reaches_head_with_its_runs_kept(url):
    engine = make_engine(url)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    record = make_record(run_id=9)
    with engine.begin() as connection:
        assert "prompt_ids" not in {c["name"] for c in sa.inspect(connection).get_columns("runs")}
        kept = _old_run(connection, run_to_json(record), "alice")
        broken = _old_run(connection, "{cut short", "bob")
    engine.dispose()

    with open_store(StoreSettings(url=url)) as store:
        old = store.run(kept)
        assert run_from_json(old.record_json).to_dict() == record.to_dict()
        assert (old.session, old.seed, old.tokens, old.settings) == ("alice", 11, 6, {"temperature": 0.7})
        assert (old.prompt_ids, old.tok_s, old.ttft_s) == ([151644, 872, 198, 100, 101], 19.5, 0.3)
        assert (store.run(broken).record_json, store.run(broken).prompt_ids, store.run(broken).tok_s) == \
            ("{cut short", [], None)
        new = store.save_run(session="alice", kind="chat", model="qwen", forward="", settings={}, seed=None,
                             prompt_ids=[1], record_json=run_to_json(record), tokens=6, tok_s=None, ttft_s=None,
                             reason="eos")
        assert new > broken > kept and [r.id for r in store.runs(session="alice")] == [new, kept]
        store.save_battle("b-1", session="bob", contender_a="qwen", contender_b="baichuan", prompt="p",
                          answer_a="{}", answer_b="{}")
        assert store.save_vote("b-1", session="bob", outcome="a") and len(store.votes()) == 1
        store.save_sweep(session="bob", model="qwen", forward="", grid={}, result=[])
    engine = make_engine(url)
    assert current_revision(engine) == "0002"
    engine.dispose()
