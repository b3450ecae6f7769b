"""Runs and sweeps that outlast the server: written to the run store (qdemo.store) when the app has one, read back
by the Performance tab's history and by `?run=ID` links. Who owns a run is the page's browser id (it survives
reloads and restarts) or, for an API caller, its Gradio session or address; an owner reads only its own runs.

A store that fails (a full disk, a database gone away) is logged and never fails the answer that was being kept:
the user still has it on screen, and the next write tries again."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy.exc import SQLAlchemyError

from qdemo.core.runs import RunRecord, run_from_json, run_to_json
from qdemo.serving.limits import Client
from qdemo.store import Store, StoredRun

log = logging.getLogger("qdemo")
STORE_ERRORS = (SQLAlchemyError, OSError)  # what a failing store raises: a database gone away, a full disk
OWNER_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")  # a page's browser id, as the page mints it
HISTORY_ROWS = 200


@dataclass(frozen=True)
class KeptRun:
    """A stored run as a page opens it: the run and the conversation it answered."""

    run_id: int
    run: RunRecord
    messages: list[dict[str, str]]
    kind: str


def page_owner(browser_id: Any) -> str | None:
    """The owner a page's browser id names, or None when the page sent none (or not one it could have minted)."""
    if isinstance(browser_id, str) and OWNER_PATTERN.fullmatch(browser_id):
        return f"page:{browser_id}"
    return None


def client_owner(client: Client | str | None) -> str:
    """An API caller's owner: its Gradio session when it keeps one, else its address."""
    if isinstance(client, Client):
        if client.session and client.own_session:
            return f"session:{client.session}"[:200]
        return f"address:{client.address or 'unknown'}"[:200]
    return f"session:{client or 'unknown'}"[:200]


def keep_run(store: Store | None, owner: str | None, kind: str, run: RunRecord,
             messages: Sequence[dict[str, str]] | None = None) -> int | None:
    """Write a finished run (its settings, seed, prompt ids, every token with its stage summaries, metrics); the
    conversation it answered rides in its settings under "messages". None: no store, no owner, or not written."""
    if store is None or owner is None or run.done is None:
        return None
    settings = {**run.settings, **({"messages": list(messages)} if messages is not None else {})}
    stats = run.done.stats
    try:
        return store.save_run(
            session=owner, kind=kind, model=run.model, forward=run.forward or "", settings=settings,
            seed=run.settings.get("seed"), prompt_ids=list(run.prefill.prompt_ids) if run.prefill else [],
            record_json=run_to_json(run), tokens=len(run.tokens),
            tok_s=_finite(stats.decode_tokens_per_s), ttft_s=_finite(stats.ttft_seconds),
            reason=run.done.reason)
    except (*STORE_ERRORS, ValueError) as exc:
        log.warning("the run store did not keep a %s run of %s: %s", kind, run.model, exc)
        return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def keep_sweep(store: Store | None, owner: str | None, model: str, forward: str, grid: dict, result: dict
               ) -> int | None:
    if store is None or owner is None:
        return None
    try:
        return store.save_sweep(session=owner, model=model, forward=forward, grid=grid, result=result)
    except (*STORE_ERRORS, ValueError) as exc:
        log.warning("the run store did not keep a sweep of %s: %s", model, exc)
        return None


def history(store: Store | None, owner: str | None, model: str | None = None, forward: str | None = None
            ) -> list[StoredRun]:
    """The owner's newest stored runs, without their records (a listing reads no token data); `forward`: those
    whose forward begins with it ("llama.cpp", "torch")."""
    if store is None or owner is None:
        return []
    try:
        return store.runs(session=owner, model=model or None, forward_kind=forward or None, limit=HISTORY_ROWS,
                          with_record=False)
    except STORE_ERRORS as exc:
        log.warning("the run store could not list runs: %s", exc)
        return []


def open_run(store: Store | None, owner: str | None, run_id: Any) -> KeptRun:
    """The owner's stored run `run_id` (a `?run=` link's value); ValueError naming `run` when there is none."""
    if store is None:
        raise ValueError("run: this server keeps no runs (its store is off)")
    text = run_id if isinstance(run_id, str) else ""
    if not text.isdigit() or len(text) > 18:
        raise ValueError(f"run must be a run's number, got {str(run_id)[:20]!r}")
    stored = store.run(int(text), session=owner) if owner is not None else None
    if stored is None or not stored.record_json:
        raise ValueError(f"run {text}: no such run of yours here")
    messages = [m for m in stored.settings.get("messages") or [] if isinstance(m, dict)]
    return KeptRun(stored.id, run_from_json(stored.record_json), messages, stored.kind)
