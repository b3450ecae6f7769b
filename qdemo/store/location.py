"""Where the store lives and whether it is on: `StoreSettings`, read strictly from the environment.

The file goes to `$QDEMO_DATA`; else, on a Hugging Face Space, to `/data` (the Space's persistent storage, when it
is mounted and writable: everything else in a Space is lost on restart); else to the user's data directory. A URL
(`QDEMO_STORE_URL`, any SQLAlchemy URL) replaces the file, e.g. one PostgreSQL database for several replicas.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

try:  # optional: the platform's own data directory (macOS, Windows); the XDG rule below covers Linux without it
    import platformdirs
except ImportError:
    platformdirs = None

FILE_NAME = "qdemo.sqlite"
SPACE_DATA = Path("/data")  # a Space's persistent storage, mounted only when the Space pays for it
_DAYS = re.compile(r"\d{1,6}(\.\d{1,6})?")
_ROWS = re.compile(r"\d{1,12}")


def shown(value: object, limit: int = 40) -> str:
    """A value for an error message, never longer than about `limit` characters (a huge value is cut first, so
    quoting it costs nothing)."""
    if isinstance(value, str):
        text = repr(value[:limit])
        return text + "…" if len(value) > limit else text
    if isinstance(value, (bytes, list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value):,} items"
    text = repr(value)
    return text[:limit] + "…" if len(text) > limit else text


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def default_data_dir(environ: Mapping[str, str], space_data: Path | None = None) -> Path:
    """Where the store goes when QDEMO_DATA does not say (`space_data`: a Space's storage, /data unless given)."""
    space_data = SPACE_DATA if space_data is None else space_data
    if environ.get("SPACE_ID") and _writable_dir(space_data):
        return space_data
    if platformdirs is not None:
        return Path(platformdirs.user_data_dir("qdemo", appauthor=False))
    xdg = environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "qdemo"


def normalise_url(url: str) -> str:
    """A SQLAlchemy URL, checked; bare `postgresql://` (and Heroku's `postgres://`) mean psycopg 3, the driver
    this package pins (SQLAlchemy's own default would be psycopg2, which is not installed)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"the store URL must be a non-empty string, got {shown(url)}")
    try:
        parsed = make_url(url.strip())
    except ArgumentError:
        raise ValueError(f"the store URL is not a SQLAlchemy URL: {shown(url)}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def sqlite_url(data_dir: Path) -> str:
    return URL.create("sqlite", database=str(Path(data_dir).resolve() / FILE_NAME)).render_as_string()


@dataclass(frozen=True)
class StoreSettings:
    """What `open_store` needs. `url` wins over `data_dir`; neither means the default data directory.
    `keep_days` / `keep_rows`: the retention `Store.prune()` applies when called without arguments."""

    url: str | None = None
    data_dir: Path | None = None
    enabled: bool = True
    keep_days: float | None = None
    keep_rows: int | None = None

    def __post_init__(self) -> None:
        if self.url is not None:
            object.__setattr__(self, "url", normalise_url(self.url))
        if self.data_dir is not None and not isinstance(self.data_dir, (str, Path)):
            raise ValueError(f"data_dir must be a path, got {shown(self.data_dir)}")
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be True or False, got {shown(self.enabled)}")
        check_keep(self.keep_days, self.keep_rows, least_rows=1)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "StoreSettings":
        """QDEMO_DATA, QDEMO_STORE_URL, QDEMO_STORE (on|off), QDEMO_STORE_KEEP_DAYS, QDEMO_STORE_KEEP_ROWS; an
        empty variable counts as unset. Anything malformed is a ValueError naming the variable."""
        env = os.environ if environ is None else environ
        data = env.get("QDEMO_DATA") or None
        url = env.get("QDEMO_STORE_URL") or None
        if url is not None:
            try:
                url = normalise_url(url)
            except ValueError:
                raise ValueError(f"QDEMO_STORE_URL is not a SQLAlchemy URL: {shown(url)}") from None
        return cls(url=url, data_dir=Path(data) if data else default_data_dir(env),
                   enabled=_switch(env, "QDEMO_STORE"),
                   keep_days=_number(env, "QDEMO_STORE_KEEP_DAYS", _DAYS, float),
                   keep_rows=_number(env, "QDEMO_STORE_KEEP_ROWS", _ROWS, int))

    def database_url(self, environ: Mapping[str, str] | None = None) -> str:
        """The URL the engine opens: `url`, else the SQLite file in the data directory."""
        if self.url is not None:
            return self.url
        env = os.environ if environ is None else environ
        return sqlite_url(self.data_dir if self.data_dir is not None else default_data_dir(env))


def _switch(env: Mapping[str, str], name: str) -> bool:
    text = env.get(name) or "on"
    if text not in ("on", "off"):
        raise ValueError(f"{name} must be 'on' or 'off', got {shown(text)}")
    return text == "on"


def _number(env: Mapping[str, str], name: str, pattern: re.Pattern, kind: type) -> float | int | None:
    text = env.get(name) or None
    if text is None:
        return None
    if not pattern.fullmatch(text) or kind(text) <= 0:
        what = "a whole number of rows" if kind is int else "a number of days"
        raise ValueError(f"{name} must be {what} above 0, got {shown(text)}")
    return kind(text)


def check_keep(keep_days: object, keep_rows: object, least_rows: int = 0) -> None:
    """Retention values: days a finite number above 0, rows a whole number of at least `least_rows`."""
    if keep_days is not None and (isinstance(keep_days, bool) or not isinstance(keep_days, (int, float))
                                  or not math.isfinite(keep_days) or keep_days <= 0):
        raise ValueError(f"keep_days must be a number of days above 0, got {shown(keep_days)}")
    if keep_rows is not None and (isinstance(keep_rows, bool) or not isinstance(keep_rows, int)
                                  or keep_rows < least_rows):
        raise ValueError(f"keep_rows must be a whole number of at least {least_rows}, got {shown(keep_rows)}")
