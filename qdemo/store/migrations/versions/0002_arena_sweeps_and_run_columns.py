"""Sweeps, arena battles and their votes; runs gain query columns (prompt ids, tokens/s, time to first token),
filled for the runs already stored from the record each one keeps.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import json
import math

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BATCH = 500  # runs read per query while filling the new columns: a record can be megabytes


def upgrade() -> None:
    op.add_column("runs", sa.Column("prompt_ids", sa.Text, nullable=False, server_default="[]"))
    op.add_column("runs", sa.Column("tok_s", sa.Float, nullable=True))
    op.add_column("runs", sa.Column("ttft_s", sa.Float, nullable=True))
    _fill_run_columns()
    op.create_index("ix_runs_model_forward_id", "runs", ["model", "forward", "id"])
    op.create_index("ix_runs_created_at", "runs", ["created_at"])
    _create_sweeps()
    _create_battles_and_votes()


def _fill_run_columns() -> None:
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("answer", sa.Text),
                    sa.column("prompt_ids", sa.Text), sa.column("tok_s", sa.Float), sa.column("ttft_s", sa.Float))
    bind = op.get_bind()
    last = -1
    while True:
        rows = bind.execute(sa.select(runs.c.id, runs.c.answer).where(runs.c.id > last)
                            .order_by(runs.c.id).limit(BATCH)).all()
        for row in rows:
            bind.execute(runs.update().where(runs.c.id == row.id).values(**_columns_of(row.answer)))
        if len(rows) < BATCH:
            return
        last = rows[-1].id


def _number(value: object) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _columns_of(answer: str) -> dict:
    """The new columns from a stored record; a record that does not parse leaves them empty (never fails)."""
    try:
        record = json.loads(answer)
        prefill = record.get("prefill") or {}
        stats = (record.get("done") or {}).get("stats") or {}
        ids = [int(i) for i in prefill.get("prompt_ids") or []]
    except (ValueError, TypeError, AttributeError):
        return {"prompt_ids": "[]", "tok_s": None, "ttft_s": None}
    return {"prompt_ids": json.dumps(ids), "tok_s": _number(stats.get("decode_tokens_per_s")),
            "ttft_s": _number(stats.get("ttft_seconds"))}


def _create_sweeps() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("session", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("forward", sa.String(200), nullable=False),
        sa.Column("grid", sa.Text, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
    )
    op.create_index("ix_sweeps_session_id", "sweeps", ["session", "id"])


def _create_battles_and_votes() -> None:
    op.create_table(
        "battles",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("session", sa.String(200), nullable=False),
        sa.Column("contender_a", sa.String(200), nullable=False),
        sa.Column("contender_b", sa.String(200), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("answer_a", sa.Text, nullable=False),
        sa.Column("answer_b", sa.Text, nullable=False),
    )
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("battle_id", sa.String(64), sa.ForeignKey("battles.id", name="fk_votes_battle_id"),
                  nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("session", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(8), nullable=False),
        sa.Column("contender_a", sa.String(200), nullable=False),
        sa.Column("contender_b", sa.String(200), nullable=False),
        sa.CheckConstraint("outcome IN ('a', 'b', 'tie', 'both_bad')", name="ck_votes_outcome"),
    )
    # One vote per battle, kept by the database: replicas racing on one battle cannot both store a vote.
    op.create_index("uq_votes_battle_id", "votes", ["battle_id"], unique=True)


def downgrade() -> None:
    op.drop_table("votes")
    op.drop_table("battles")
    op.drop_table("sweeps")
    op.drop_index("ix_runs_created_at", table_name="runs")
    op.drop_index("ix_runs_model_forward_id", table_name="runs")
    with op.batch_alter_table("runs") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("ttft_s")
        batch.drop_column("tok_s")
        batch.drop_column("prompt_ids")
