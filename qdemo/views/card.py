"""A model card (name, params, sizes, context…) as a two-column table a person can read at a glance."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """1024-based, one decimal: 988080128 → "942.3 MiB"; plain bytes stay whole."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def format_value(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key.endswith("_bytes") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return human_bytes(value)
    if _is_int(value) and "param" in key:
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(str(item) for item in value)
    return str(value)


def card_frame(card: Mapping[str, object]) -> pd.DataFrame:
    return pd.DataFrame({"property": [str(key) for key in card],
                         "value": [format_value(str(key), value) for key, value in card.items()]},
                        columns=["property", "value"])
