"""`Store`: runs, sweeps, arena battles and votes, written through SQLAlchemy Core.

Each save is one transaction, committed before the method returns: a caller that saw an id back can rely on the
row being there after a crash (see `engine` for what SQLite promises). The store holds nothing but its engine,
whose pool is thread-safe, so one `Store` serves every thread of the app without a lock.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import insert, literal, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from qdemo.store import checks
from qdemo.store.engine import make_engine, writer
from qdemo.store.location import StoreSettings, check_keep, shown
from qdemo.store.migrate import upgrade
from qdemo.store.retention import prune_runs
from qdemo.store.rows import StoredBattle, StoredRun, StoredSweep, StoredVote
from qdemo.store.schema import battles, runs, sweeps, votes

MAX_LIMIT = 10_000
PRUNE_EVERY = 100  # runs written between two retention passes


def _duplicate(error: IntegrityError) -> bool:
    """A UNIQUE or primary-key clash (SQLite: "UNIQUE constraint failed", PostgreSQL: "duplicate key value
    violates unique constraint"), not some other broken rule, which must not pass for "already there"."""
    return "unique" in str(error.orig).lower()


def open_store(settings: StoreSettings) -> "Store | None":
    """The store the settings describe, its schema brought to the newest migration; None when it is turned off.
    With retention set (keep_days / keep_rows), old runs are pruned once here."""
    if not isinstance(settings, StoreSettings):
        raise ValueError(f"settings must be a StoreSettings, got {type(settings).__name__}")
    if not settings.enabled:
        return None
    engine = make_engine(settings.database_url())
    try:
        upgrade(engine)
    except BaseException:
        engine.dispose()
        raise
    store = Store(engine, settings)
    if settings.keep_days is not None or settings.keep_rows is not None:
        store.prune()
    return store


class Store:
    """One database's runs, sweeps, battles and votes. Built by `open_store` (which migrates first); `settings`
    gives the retention a bare `prune()` applies."""

    def __init__(self, engine: Engine, settings: StoreSettings | None = None) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self._settings = settings or StoreSettings()

    @property
    def url(self) -> str:
        """Where the store is, its password hidden (for logs and the UI)."""
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # Runs ---------------------------------------------------------------------------------------------------------

    def save_run(self, *, session: str, kind: str, model: str, forward: str, settings: dict[str, Any],
                 seed: int | None, prompt_ids: list[int], record_json: str, tokens: int, tok_s: float | None,
                 ttft_s: float | None, reason: str) -> int:
        """Store one run (`record_json`: qdemo.core.runs.run_to_json's text); its id, once committed."""
        row = dict(session=checks.text("session", session), kind=checks.kind(kind),
                   model=checks.text("model", model), forward=checks.text("forward", forward, empty=True),
                   settings=checks.encode("settings", settings), seed=checks.whole("seed", seed, -checks.INT64,
                                                                                   none=True),
                   prompt_ids=checks.prompt_ids(prompt_ids), answer=checks.json_text("record_json", record_json),
                   tokens=checks.whole("tokens", tokens, most=2 ** 31 - 1), tok_s=checks.rate("tok_s", tok_s),
                   ttft_s=checks.rate("ttft_s", ttft_s), reason=checks.text("reason", reason, most=100, empty=True))
        with self._writer.begin() as connection:
            run_id = connection.execute(insert(runs).values(created_at=time.time(), **row)
                                        .returning(runs.c.id)).scalar_one()
        # A server that runs for weeks keeps its retention as it writes, not only when it opened the store.
        if run_id % PRUNE_EVERY == 0:
            self.prune()
        return run_id

    def runs(self, *, session: str | None = None, model: str | None = None, forward: str | None = None,
             limit: int = 200, with_record: bool = True, forward_kind: str | None = None) -> list[StoredRun]:
        """Runs, newest first, of one session / model / forward where given; `forward_kind` ("llama.cpp",
        "torch"): forwards that begin with it ("llama.cpp Q4_K_M"), filtered before the limit. `with_record=False`
        leaves `record_json` empty: a listing of many runs need not read megabytes of records."""
        checks.whole("limit", limit, least=1, most=MAX_LIMIT)
        columns = [c for c in runs.c if with_record or c.name != "answer"]
        query = select(*columns).order_by(runs.c.id.desc()).limit(limit)
        for column, value in ((runs.c.session, session), (runs.c.model, model), (runs.c.forward, forward)):
            if value is not None:
                query = query.where(column == checks.text(column.name, value, empty=column.name == "forward"))
        if forward_kind is not None:
            query = query.where(runs.c.forward.startswith(checks.text("forward_kind", forward_kind), autoescape=True))
        with self._engine.connect() as connection:
            return [StoredRun.of(row) for row in connection.execute(query)]

    def run(self, run_id: int, *, session: str | None = None) -> StoredRun | None:
        """One run by id; None when there is none (or, with `session`, when it is another session's)."""
        query = select(runs).where(runs.c.id == checks.whole("run_id", run_id, most=checks.INT64 - 1))
        if session is not None:
            query = query.where(runs.c.session == checks.text("session", session))
        with self._engine.connect() as connection:
            row = connection.execute(query).first()
        return StoredRun.of(row) if row is not None else None

    def prune(self, keep_days: float | None = None, keep_rows: int | None = None) -> int:
        """Delete runs older than `keep_days` days and beyond the newest `keep_rows`; without either, the
        settings' retention. Votes (the leaderboard), battles and sweeps are kept. The number of runs deleted."""
        check_keep(keep_days, keep_rows)
        if keep_days is None and keep_rows is None:
            keep_days, keep_rows = self._settings.keep_days, self._settings.keep_rows
        if keep_days is None and keep_rows is None:
            return 0
        with self._writer.begin() as connection:
            return prune_runs(connection, now=time.time(), keep_days=keep_days, keep_rows=keep_rows)

    # Sweeps -------------------------------------------------------------------------------------------------------

    def save_sweep(self, *, session: str, model: str, forward: str, grid: dict[str, Any], result: Any) -> int:
        """Store one sweep: its grid (the axes swept) and its result (any JSON-able value); its id."""
        row = dict(session=checks.text("session", session), model=checks.text("model", model),
                   forward=checks.text("forward", forward, empty=True), grid=checks.encode("grid", grid),
                   result=checks.encode("result", result, (dict, list), most=checks.MAX_JSON))
        with self._writer.begin() as connection:
            return connection.execute(insert(sweeps).values(created_at=time.time(), **row)
                                      .returning(sweeps.c.id)).scalar_one()

    def sweep(self, sweep_id: int, *, session: str | None = None) -> StoredSweep | None:
        query = select(sweeps).where(sweeps.c.id == checks.whole("sweep_id", sweep_id, most=checks.INT64 - 1))
        if session is not None:
            query = query.where(sweeps.c.session == checks.text("session", session))
        with self._engine.connect() as connection:
            row = connection.execute(query).first()
        return StoredSweep.of(row) if row is not None else None

    # Arena --------------------------------------------------------------------------------------------------------

    def save_battle(self, battle_id: str, *, session: str, contender_a: str, contender_b: str, prompt: str,
                    answer_a: str, answer_b: str) -> None:
        """Store one battle under the caller's random id (`answer_a` / `answer_b`: JSON text). A taken id is
        a ValueError."""
        row = dict(id=checks.battle_id(battle_id), session=checks.text("session", session),
                   contender_a=checks.text("contender_a", contender_a),
                   contender_b=checks.text("contender_b", contender_b),
                   prompt=checks.text("prompt", prompt, most=checks.MAX_TEXT, empty=True),
                   answer_a=checks.json_text("answer_a", answer_a), answer_b=checks.json_text("answer_b", answer_b))
        try:
            with self._writer.begin() as connection:
                connection.execute(insert(battles).values(created_at=time.time(), **row))
        except IntegrityError as exc:
            if not _duplicate(exc):
                raise
            raise ValueError(f"battle_id {shown(battle_id)} is already stored") from None

    def battle(self, battle_id: str) -> StoredBattle | None:
        query = select(battles).where(battles.c.id == checks.battle_id(battle_id))
        with self._engine.connect() as connection:
            row = connection.execute(query).first()
        return StoredBattle.of(row) if row is not None else None

    def save_vote(self, battle_id: str, *, session: str, outcome: str) -> bool:
        """Store the vote on a battle: True, or False when the battle already has one (the first vote stands).
        The contenders' names are copied from the battle in the same statement. An unknown battle: ValueError."""
        values = (literal(checks.battle_id(battle_id)), literal(time.time()), literal(checks.text("session", session)),
                  literal(checks.outcome(outcome)), battles.c.contender_a, battles.c.contender_b)
        names = ["battle_id", "created_at", "session", "outcome", "contender_a", "contender_b"]
        statement = (insert(votes).from_select(names, select(*values).where(battles.c.id == battle_id))
                     .returning(votes.c.id))  # no rowcount for INSERT ... SELECT: RETURNING tells if a row went in
        try:
            with self._writer.begin() as connection:
                stored = connection.execute(statement).first()
        except IntegrityError as exc:
            if not _duplicate(exc):
                raise
            return False  # UNIQUE(battle_id): another request (on any replica) voted first
        if stored is None:
            raise ValueError(f"battle_id {shown(battle_id, 20)} names no stored battle")
        return True

    def votes(self) -> list[StoredVote]:
        """Every vote, oldest first: what the leaderboard counts."""
        with self._engine.connect() as connection:
            return [StoredVote.of(row) for row in connection.execute(select(votes).order_by(votes.c.id))]
