"""Store: what outlives the process — runs, sweeps, arena battles and their votes — in one database.

SQLite by default (one file, `qdemo.sqlite`, in the data directory: $QDEMO_DATA, a Space's /data, or the user's
data directory), or any SQLAlchemy URL (PostgreSQL through psycopg 3, for several replicas sharing one store).
Tables are SQLAlchemy Core (`schema`), versioned by Alembic migrations shipped in `migrations/` and run by
`migrate` when a store opens.

- `location`: `StoreSettings` (read strictly from QDEMO_DATA, QDEMO_STORE_URL, QDEMO_STORE, QDEMO_STORE_KEEP_*).
- `engine`: the SQLAlchemy engine (SQLite: WAL, busy timeout, foreign keys, writes that lock at BEGIN).
- `store`: `open_store` and `Store`; `rows`: the dataclasses it returns; `checks`: its input checks;
  `retention`: pruning old runs.

A wing beside views and serving: services (and ui, bench, cli above them) may import it; it imports no other wing
of qdemo and never gradio.
"""

from qdemo.store.location import StoreSettings
from qdemo.store.rows import StoredBattle, StoredRun, StoredSweep, StoredVote
from qdemo.store.store import Store, open_store

__all__ = ["Store", "StoreSettings", "StoredBattle", "StoredRun", "StoredSweep", "StoredVote", "open_store"]
