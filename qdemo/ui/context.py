"""What every tab builder receives: the app-wide (read-only) pieces and the session-scoped components."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import gradio as gr

from qdemo.engine import StepLock
from qdemo.limits import Limits, RateLimiter
from qdemo.loader import LoadedModel
from qdemo.pool import ModelPool
from qdemo.registry import Registry
from qdemo.sources import ProgressFn


GENERATION = "generation"  # the concurrency id shared by every event that runs a model


class StopFlag:
    """A per-session stop signal kept in gr.State. Gradio deep-copies a State's initial value for each
    session, so each copy gets its own Event (an Event itself cannot be deep-copied)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __deepcopy__(self, memo: dict) -> "StopFlag":
        return StopFlag()

    def arm(self) -> threading.Event:
        """A fresh event for a new generation, so a late Stop never leaks into the next one."""
        self.event = threading.Event()
        return self.event

    def set(self) -> None:
        self.event.set()


@dataclass
class AppContext:
    """App-wide pieces. Nothing here belongs to one user: the pool holds shared read-only models, and the rate
    limiter only timestamps keyed by Gradio's session id."""

    registry: Registry
    models: ModelPool
    default_model: str
    limits: Limits = field(default_factory=Limits)
    rates: RateLimiter | None = None

    def __post_init__(self) -> None:
        if self.rates is None:
            self.rates = RateLimiter(self.limits.requests_per_minute)

    def choices(self) -> list[tuple[str, str]]:
        return [(spec.display_name, name) for name, spec in self.registry.models.items()]

    def queue_kwargs(self) -> dict:
        """For events that run the model: they share one concurrency group of `limits.concurrency` slots, so the
        rest wait in Gradio's queue, which shows each waiting user their position."""
        return {"concurrency_limit": self.limits.concurrency, "concurrency_id": GENERATION}

    def admit(self, request: gr.Request | None) -> str | None:
        """None when this session may start another request, else the refusal to show."""
        return self.rates.check(getattr(request, "session_hash", None))

    @contextlib.contextmanager
    def generation(self, name: str, progress: ProgressFn | None = None) -> Iterator[tuple[LoadedModel, StepLock]]:
        """The model pinned for one generation, and its step gate (concurrent users take turns per token)."""
        with self.models.lease(name, progress) as lm:
            yield lm, self.models.gate(name).step


@dataclass
class SessionComponents:
    """Components other tabs read (created in the app builder; the chat_* ones are set by the Chat tab,
    which is built first)."""

    runs: gr.State  # list[RunRecord] of this session, newest last
    conversation: gr.BrowserState  # {"model", "system", "messages"}: survives a page reload
    chat_model: gr.Dropdown | None = None  # Internals follows it
    chat_system: gr.Textbox | None = None
    chatbot: gr.Chatbot | None = None


def next_run_id(runs: list) -> int:
    return max((r.run_id for r in runs), default=0) + 1
