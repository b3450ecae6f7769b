"""Retention: which runs to drop. Only runs are pruned; sweeps, battles and votes are kept (votes are the arena's
leaderboard, and each vote's battle stays so that the vote can be traced)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from qdemo.store.schema import runs

DAY = 86_400.0


def prune_runs(connection: Connection, *, now: float, keep_days: float | None, keep_rows: int | None) -> int:
    """Delete runs older than `keep_days` and those beyond the newest `keep_rows`; the number deleted."""
    removed = 0
    if keep_days is not None:
        removed += connection.execute(delete(runs).where(runs.c.created_at < now - keep_days * DAY)).rowcount
    if keep_rows is not None:
        # Ids, not times, say which runs are newest: replicas' clocks may disagree, the database's sequence not.
        first_dropped = connection.execute(
            select(runs.c.id).order_by(runs.c.id.desc()).offset(keep_rows).limit(1)).scalar()
        if first_dropped is not None:
            removed += connection.execute(delete(runs).where(runs.c.id <= first_dropped)).rowcount
    return removed
