"""Checks on what callers hand the store: each raises a ValueError that names the field and shows at most a short
cut of the value (never a megabyte prompt back to the user)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from qdemo.store.location import shown
from qdemo.store.schema import NAME, OUTCOMES

MAX_TEXT = 1 << 20  # a prompt: characters
MAX_JSON = 64 << 20  # a run record with per-stage top-N over thousands of tokens: characters
MAX_SMALL_JSON = 1 << 20  # settings, a sweep's grid
MAX_PROMPT_IDS = 1 << 20
INT64 = 1 << 63
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_BATTLE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def text(field: str, value: object, most: int = NAME, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > most:
        raise ValueError(f"{field} must be at most {most:,} characters, got {len(value):,}: {shown(value)}")
    if not value and not empty:
        raise ValueError(f"{field} must not be empty")
    if "\x00" in value:  # PostgreSQL's text cannot hold it; refused on SQLite too, so both stores agree
        raise ValueError(f"{field} must not contain a NUL character: {shown(value)}")
    return value


def kind(value: object) -> str:
    if not isinstance(value, str) or not _KIND.fullmatch(value):
        raise ValueError(f"kind must be a short lower-case word such as 'chat' or 'arena', got {shown(value)}")
    return value


def battle_id(value: object) -> str:
    if not isinstance(value, str) or not _BATTLE_ID.fullmatch(value):
        raise ValueError(f"battle_id must be 1 to 64 letters, digits, '-' or '_', got {shown(value)}")
    return value


def outcome(value: object) -> str:
    if value not in OUTCOMES or not isinstance(value, str):
        raise ValueError(f"outcome must be one of {', '.join(map(repr, OUTCOMES))}, got {shown(value)}")
    return value


def whole(field: str, value: object, least: int = 0, most: int = INT64 - 1, none: bool = False) -> int | None:
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise ValueError(f"{field} must be a whole number from {least:,} to {most:,}, got {shown(value)}")
    return value


def rate(field: str, value: object) -> float | None:
    """A measure (tokens/s, seconds): None, or a finite number at least 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be None or a finite number at least 0, got {shown(value)}")
    return float(value)


def encode(field: str, value: Any, types: tuple[type, ...] = (dict,), most: int = MAX_SMALL_JSON) -> str:
    """A JSON-able value as JSON text (UTF-8 kept readable)."""
    if not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise ValueError(f"{field} must be a {wanted}, got {type(value).__name__}")
    try:
        out = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be JSON-able: {shown(str(exc), 80)}") from None
    if len(out) > most:
        raise ValueError(f"{field} must be at most {most:,} characters of JSON, got {len(out):,}")
    return out


def json_text(field: str, value: object, most: int = MAX_JSON) -> str:
    """JSON text as a caller wrote it (a run record from qdemo.core.runs.run_to_json): it must parse."""
    text(field, value, most=most)
    try:
        json.loads(value)
    except ValueError as exc:
        raise ValueError(f"{field} must be JSON text: {shown(str(exc), 80)}") from None
    return value


def prompt_ids(value: object) -> str:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"prompt_ids must be a list of token ids, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_IDS:
        raise ValueError(f"prompt_ids must hold at most {MAX_PROMPT_IDS:,} ids, got {len(value):,}")
    bad = next((i for i, t in enumerate(value)
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < INT64), None)
    if bad is not None:
        raise ValueError(f"prompt_ids[{bad}] must be a token id (a whole number at least 0), got {shown(value[bad])}")
    return json.dumps(list(value))
