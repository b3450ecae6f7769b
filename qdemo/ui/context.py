"""What every tab builder receives: the app-wide services and the session-scoped components shared by tabs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from qdemo.services.admission import Services

GENERATION = "generation"  # the concurrency id shared by every event that runs a model


@dataclass
class UIContext:
    services: Services

    def queue_kwargs(self) -> dict:
        """For events that run a model: they share one concurrency group of `limits.concurrency` slots, so the
        rest wait in Gradio's queue, which shows each waiting user their position."""
        return {"concurrency_limit": self.services.limits.concurrency, "concurrency_id": GENERATION}

    def client(self, request: gr.Request | None) -> str | None:
        """The key the rate limiter counts this request under."""
        return getattr(request, "session_hash", None)


def progress_callback(progress: gr.Progress | None) -> Callable[[str, float, float], None] | None:
    """A ProgressFn that moves Gradio's progress bar."""
    if progress is None:
        return None

    def report(phase: str, done: float, total: float) -> None:
        progress(done / total if total else 0, desc=phase)

    return report


@dataclass
class SessionComponents:
    """Components more than one tab reads (created in the app builder; the chat_* ones by the Chat tab, which is
    built first)."""

    runs: gr.State  # list[RunRecord] of this session, newest last
    saved_runs: gr.BrowserState  # their compact copy: the Performance tab survives a reload
    conversation: gr.BrowserState  # {"model", "system", "messages", "settings"}: survives a reload
    chat_model: Any = None  # gr.Dropdown; Internals follows it
    chat_system: Any = None  # gr.Textbox
    chatbot: Any = None  # gr.Chatbot
    chat_controls: Any = None  # SamplingControls of the Chat tab (restored with the conversation)
    model_dropdowns: list = field(default_factory=list)  # every model picker: their labels refresh on load
