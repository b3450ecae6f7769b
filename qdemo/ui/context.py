"""What every tab builder receives: the app-wide (read-only) pieces and the session-scoped components."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import gradio as gr

from qdemo.registry import Registry
from qdemo.ui.models import ModelCache


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
    registry: Registry
    models: ModelCache
    default_model: str

    def choices(self) -> list[tuple[str, str]]:
        return [(spec.display_name, name) for name, spec in self.registry.models.items()]


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
