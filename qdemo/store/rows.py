"""What the store hands back: frozen dataclasses, one per table, built from database rows (JSON parsed where the
caller gave a value, kept as text where the caller gave text)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.engine import Row


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


@dataclass(frozen=True)
class StoredRun:
    id: int
    created_at: datetime  # UTC
    session: str
    kind: str
    model: str
    forward: str
    settings: dict[str, Any]
    seed: int | None
    prompt_ids: list[int]
    record_json: str  # qdemo.core.runs.run_from_json reads it back; "" when listed without records
    tokens: int
    tok_s: float | None
    ttft_s: float | None
    reason: str

    @classmethod
    def of(cls, row: Row) -> "StoredRun":
        m = row._mapping
        return cls(id=m["id"], created_at=_when(m["created_at"]), session=m["session"], kind=m["kind"],
                   model=m["model"], forward=m["forward"], settings=json.loads(m["settings"]), seed=m["seed"],
                   prompt_ids=json.loads(m["prompt_ids"]), record_json=m.get("answer", ""), tokens=m["tokens"],
                   tok_s=m["tok_s"], ttft_s=m["ttft_s"], reason=m["reason"])


@dataclass(frozen=True)
class StoredSweep:
    id: int
    created_at: datetime
    session: str
    model: str
    forward: str
    grid: dict[str, Any]
    result: Any

    @classmethod
    def of(cls, row: Row) -> "StoredSweep":
        m = row._mapping
        return cls(id=m["id"], created_at=_when(m["created_at"]), session=m["session"], model=m["model"],
                   forward=m["forward"], grid=json.loads(m["grid"]), result=json.loads(m["result"]))


@dataclass(frozen=True)
class StoredBattle:
    id: str
    created_at: datetime
    session: str
    contender_a: str
    contender_b: str
    prompt: str
    answer_a: str  # JSON text, as saved
    answer_b: str

    @classmethod
    def of(cls, row: Row) -> "StoredBattle":
        m = row._mapping
        return cls(id=m["id"], created_at=_when(m["created_at"]), session=m["session"],
                   contender_a=m["contender_a"], contender_b=m["contender_b"], prompt=m["prompt"],
                   answer_a=m["answer_a"], answer_b=m["answer_b"])


@dataclass(frozen=True)
class StoredVote:
    battle_id: str
    created_at: datetime
    session: str
    outcome: str  # 'a', 'b', 'tie' or 'both_bad'
    contender_a: str
    contender_b: str

    @classmethod
    def of(cls, row: Row) -> "StoredVote":
        m = row._mapping
        return cls(battle_id=m["battle_id"], created_at=_when(m["created_at"]), session=m["session"],
                   outcome=m["outcome"], contender_a=m["contender_a"], contender_b=m["contender_b"])
