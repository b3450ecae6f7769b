"""Brings a database to the newest schema by running Alembic's `upgrade head`, configured here in code: the
migrations ship inside the package (`qdemo/store/migrations`), so no alembic.ini is needed anywhere.

Several processes may open one store at once (replicas, a test's children). The upgrade runs inside one
transaction that first takes a lock: the write lock on SQLite (BEGIN IMMEDIATE, see `engine`), an advisory lock on
PostgreSQL. The second process waits, then finds the schema at head and does nothing. Both databases have
transactional DDL, so a migration that fails leaves the schema as it was.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from qdemo.store.engine import writer

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
# pg_advisory_xact_lock's key: any fixed 64-bit number that no other application on the server uses.
ADVISORY_LOCK_KEY = 0x7164656D6F5F6462  # "qdemo_db"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))  # ConfigParser interpolates %
    config.attributes["connection"] = connection  # read by migrations/env.py
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to `revision` (the newest by default), once, however many processes ask at once."""
    if revision == "head" and current_revision(engine) == head_revision():
        return  # the usual case: no lock taken, so opening a store never waits behind another's writes
    with writer(engine).connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        command.upgrade(alembic_config(connection), revision)
