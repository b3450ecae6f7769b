"""The SQLAlchemy engine for a store URL: SQLite set up for durability and for several writers, or any other URL
(PostgreSQL through psycopg 3) with stale pooled connections checked before use.

An Engine is thread-safe on its own (a pool of connections, one per checkout); the store adds no lock of its own.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url

BUSY_TIMEOUT_MS = 10_000  # a second writer waits this long for the file's write lock before it fails
WRITE = "qdemo_write"  # execution option: this connection's transactions will write (see _sqlite_begin)


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # Replicas outlive database restarts and idle timeouts: a dead pooled connection is replaced, not used.
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def writer(engine: Engine) -> Engine:
    """The same engine and pool, for transactions that write: on SQLite they take the write lock at BEGIN."""
    return engine.execution_options(**{WRITE: True})


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # SQLAlchemy emits BEGIN itself (_sqlite_begin): pysqlite's own implicit BEGIN skips DDL, so a migration would
    # not be one transaction, and it comes only before the first write, too late to take the lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # First, so that the switch to WAL below also waits for a second process that is opening the file.
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # WAL: readers never block the writer nor the writer readers, which a web app's many sessions need.
    cursor.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a commit is in the WAL file, in the OS's page cache, before it returns, so it survives
    # the process being killed (SIGKILL, OOM, a crash): the OS writes the file later regardless. Only a power cut
    # or a kernel crash can lose the last commits (never corrupt the file); FULL would fsync each commit to keep
    # those too, at a cost per run that a demo's history does not need.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE takes the write lock at BEGIN, waiting up to busy_timeout for it. A deferred transaction that read
    # first and wrote later would fail at once (SQLITE_BUSY, no waiting) when another process wrote in between.
    immediate = connection.get_execution_options().get(WRITE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
