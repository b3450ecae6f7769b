"""The tables at the newest migration (`head`), as SQLAlchemy Core objects the store's queries are built from.

The migrations in `migrations/versions` create these; they never import this module (a migration is a snapshot
of its day, this is today). `tests/store/test_store_migrations.py` checks that `head` and these agree.
Times are float seconds since the epoch (UTC): one type that sorts and compares alike on SQLite and PostgreSQL.
JSON is kept as text: the store writes it and reads it back, the database never looks inside.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

OUTCOMES = ("a", "b", "tie", "both_bad")
NAME = 200  # session, model, forward, contender names: characters at most

metadata = MetaData()

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),
    Column("session", String(NAME), nullable=False),  # who made it: a session sees only its own runs
    Column("kind", String(40), nullable=False),  # chat, compare, sweep, arena, api, ...
    Column("model", String(NAME), nullable=False),
    Column("forward", String(NAME), nullable=False),
    Column("settings", Text, nullable=False),
    Column("seed", BigInteger, nullable=True),
    Column("prompt_ids", Text, nullable=False, server_default="[]"),
    Column("answer", Text, nullable=False),  # the whole RunRecord as run_to_json wrote it
    Column("tokens", Integer, nullable=False),
    Column("tok_s", Float, nullable=True),
    Column("ttft_s", Float, nullable=True),
    Column("reason", String(100), nullable=False),
    Index("ix_runs_session_id", "session", "id"),
    Index("ix_runs_model_forward_id", "model", "forward", "id"),
    Index("ix_runs_created_at", "created_at"),
)

sweeps = Table(
    "sweeps", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),
    Column("session", String(NAME), nullable=False),
    Column("model", String(NAME), nullable=False),
    Column("forward", String(NAME), nullable=False),
    Column("grid", Text, nullable=False),
    Column("result", Text, nullable=False),
    Index("ix_sweeps_session_id", "session", "id"),
)

battles = Table(
    "battles", metadata,
    Column("id", String(64), primary_key=True),  # a random token the arena hands the browser
    Column("created_at", Float, nullable=False),
    Column("session", String(NAME), nullable=False),
    Column("contender_a", String(NAME), nullable=False),
    Column("contender_b", String(NAME), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("answer_a", Text, nullable=False),
    Column("answer_b", Text, nullable=False),
)

# The leaderboard reads this table alone, so the contenders are copied onto each vote. UNIQUE(battle_id) is the
# rule "one vote per battle" kept by the database itself: two replicas racing on one battle cannot both win.
votes = Table(
    "votes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("battle_id", String(64), ForeignKey("battles.id", name="fk_votes_battle_id"), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("session", String(NAME), nullable=False),
    Column("outcome", String(8), nullable=False),
    Column("contender_a", String(NAME), nullable=False),
    Column("contender_b", String(NAME), nullable=False),
    CheckConstraint("outcome IN ('a', 'b', 'tie', 'both_bad')", name="ck_votes_outcome"),
    Index("uq_votes_battle_id", "battle_id", unique=True),
)
