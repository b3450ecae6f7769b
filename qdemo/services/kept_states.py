"""Decode states that sessions keep between requests (multi-turn KV reuse), owned by the services.

A chat keeps its decode state after each answer, so its next turn prefills only what is new. The states live
here, keyed by the session; the pool counts them in its memory budget as a tenant (`ModelPool.admit_tenant`):
least recently used states go first when the budget is short, before any model is unloaded, and a state goes
with its model, after `idle_s` unused, on Clear, or when Gradio forgets a closed tab.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

from qdemo.core.decode import DecodeState
from qdemo.serving.limits import Client
from qdemo.serving.pool import ModelPool

IDLE_S = 900.0  # a kept decode state unused this long is dropped


@dataclass
class _Kept:
    state: DecodeState
    used: float
    bytes: int  # its cache's memory (the allocation, not the tokens in use), counted once: a kept state does not change


class KeptStates:
    """key (a session) → its decode state of one model, within the pool's budget."""

    def __init__(self, pool: ModelPool, idle_s: float = IDLE_S) -> None:
        self._pool = pool
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._items: OrderedDict[str, _Kept] = OrderedDict()
        pool.admit_tenant(self)

    def keep(self, key: str, state: DecodeState | None) -> bool:
        """Keep a session's state for its next turn. False when it cannot be kept: it is broken, its model is
        gone, or it alone does not fit what the loaded weights leave of the budget."""
        allowed = self._pool.budget - self._pool.weight_bytes()  # read before locking: the pool locks too
        loaded = self._pool.loaded()
        with self._lock:
            self._expire()
            self._items.pop(key, None)
            if state is None or state.broken or state.model not in loaded:
                return False
            self._items[key] = _Kept(state, time.monotonic(), state.kv_allocated())
            self._shed(allowed)
            return key in self._items

    def take(self, key: str, model: str) -> DecodeState | None:
        """The session's state for `model`, handed over (no longer counted or evictable) until kept again; None
        when there is none (a state of another model is dropped)."""
        with self._lock:
            self._expire()
            item = self._items.pop(key, None)
            return item.state if item is not None and item.state.model == model else None

    def drop(self, key: str | None = None, model: str | None = None) -> int:
        """Forget kept states (a session's, a model's, or all); returns how many went."""
        with self._lock:
            gone = [k for k, item in self._items.items()
                    if (key is None or k == key) and (model is None or item.state.model == model)]
            for k in gone:
                del self._items[k]
            return len(gone)

    def models(self) -> dict[str, str]:
        """key → model of every kept state."""
        with self._lock:
            return {k: item.state.model for k, item in self._items.items()}

    # --- the pool's tenant ----------------------------------------------------------------------------------------
    def held_bytes(self) -> int:
        with self._lock:
            return sum(item.bytes for item in self._items.values())

    def shed(self, allowed: int) -> None:
        with self._lock:
            self._shed(allowed)

    def forget_model(self, key: str) -> None:
        self.drop(model=key)

    def _shed(self, allowed: int) -> None:
        while self._items and sum(item.bytes for item in self._items.values()) > allowed:
            self._items.popitem(last=False)

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, item in self._items.items() if now - item.used > self.idle_s]:
            del self._items[k]


def client_state_key(client: Client | str | None, model: str) -> str | None:
    """Whose kept decode state of `model` a request reuses: the caller's Gradio session (one gradio_client Client,
    one page, or the session_hash a REST call sends), else its address; never another caller's (a reused prefix
    shows in the timing). None: nobody to keep it for."""
    if isinstance(client, str) or client is None:
        who = client
    else:
        who = client.session if client.session and client.own_session else client.address
    return f"client:{who}:{model}" if who else None


@contextlib.contextmanager
def client_state(states: KeptStates, client: Client | str | None, backend: Any, use: bool = True
                 ) -> Iterator[DecodeState | None]:
    """The caller's kept decode state of `backend`'s model (a fresh one when it has none), handed back to be kept
    when the block ends, also when it ends early. None when nothing can be kept: no caller to key it by, `use`
    false (beam search, speculative decoding), or a backend that keeps its own cache."""
    key = client_state_key(client, backend.key)
    state = states.take(key, backend.key) or backend.new_state() if key is not None and use else None
    try:
        yield state
    finally:
        if state is not None:
            states.keep(key, state)
