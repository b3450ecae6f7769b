"""What every tab builder receives: the app-wide services, the one way to register a page event, and the
session-scoped components shared by tabs."""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from qdemo.services.admission import Refused, Services
from qdemo.serving.limits import Client, RateLimiter, client_from_headers

GENERATION = "generation"  # the concurrency id shared by every event that runs a model
log = logging.getLogger("qdemo")


@dataclass
class UIContext:
    services: Services
    trusted_proxies: int = 0  # proxies in front of the app that append the client's address to X-Forwarded-For
    events: RateLimiter | None = None  # cheap page events (sliders, clicks): a looser limit than model requests

    def __post_init__(self) -> None:
        if self.events is None:
            per_minute = self.services.limits.events_per_minute
            self.events = RateLimiter(per_minute, 4 * per_minute)

    def queue_kwargs(self) -> dict:
        """For events that run a model: they share one concurrency group of `limits.concurrency` slots, so the
        rest wait in Gradio's queue, which shows each waiting user their position."""
        return {"concurrency_limit": self.services.limits.concurrency, "concurrency_id": GENERATION}

    def client(self, request: gr.Request | None) -> Client:
        """Who sent the request: Gradio's session id and the network address (behind trusted proxies, the one
        they saw), which the rate limits count."""
        headers = getattr(request, "headers", None) or {}
        peer = getattr(getattr(request, "client", None), "host", None)
        return client_from_headers(getattr(request, "session_hash", None), peer, headers.get("x-forwarded-for"),
                                   self.trusted_proxies)

    def on(self, trigger: Callable, fn: Callable, inputs: Any, outputs: Any, *, notice: Any,
           runs_model: bool = False, **kwargs: Any):
        """Register a page event. Its handler passes admission first — a model request through the services'
        admission (which the handler calls), anything else through the page-event rate limit — and a refusal or
        a crash becomes a readable line in `notice` (one log line for a refusal, a traceback for a crash).
        Page events are never API endpoints; model events share the generation concurrency group."""
        queue = self.queue_kwargs() if runs_model else {}
        return trigger(admitted(fn, self, notice, runs_model), inputs, _with(outputs, notice),
                       api_visibility="private", **{**queue, **kwargs})


def admitted(fn: Callable, ui: UIContext, notice: Any, runs_model: bool) -> Callable:
    """`fn` with admission in front and readable failures. The wrapper always receives the gr.Request (it adds the
    parameter when `fn` has none: Gradio fills only declared positional parameters, so a handler without one
    would have counted every user in one bucket)."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    hints = _hints(fn)
    request_at = next((i for i, p in enumerate(params) if hints.get(p.name) is gr.Request), None)
    added = request_at is None
    if added:
        params.insert(1 if params else 0, inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD))
        request_at = 1 if len(params) > 1 else 0
    name = getattr(fn, "__name__", "event")

    def split(args: tuple) -> tuple[tuple, gr.Request | None]:
        request = args[request_at] if len(args) > request_at else None
        if added:
            args = args[:request_at] + args[request_at + 1:]
        return args, request

    def refusal(request: gr.Request | None) -> str | None:
        if runs_model:
            return None  # the handler's services.admit() checks the request rate limit
        return ui.events.check(ui.client(request))

    def refused(message: str) -> dict:
        log.info("refused %s: %s", name, message)
        return {notice: f"⚠️ {message}"}

    def crashed() -> dict:
        log.exception("%s failed", name)
        return {notice: "⚠️ Something went wrong on the server (it is logged); please try again."}

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def wrapper(*args: Any):
            args, request = split(args)
            denied = refusal(request)
            if denied:
                yield refused(denied)
                return
            try:
                yield from fn(*args)
            except Refused as exc:
                yield refused(str(exc))
            except Exception:  # noqa: BLE001 - a crash must not kill the page; it is logged with its traceback
                yield crashed()
    else:
        @functools.wraps(fn)
        def wrapper(*args: Any):
            args, request = split(args)
            denied = refusal(request)
            if denied:
                return refused(denied)
            try:
                result = fn(*args)
                return {notice: gr.skip()} if result is None else result
            except Refused as exc:
                return refused(str(exc))
            except Exception:  # noqa: BLE001
                return crashed()

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {**hints, params[request_at].name: gr.Request}
    del wrapper.__wrapped__  # Gradio must read the wrapper's own signature, with the request in it
    wrapper.qdemo_admitted = True
    return wrapper


def _with(outputs: Any, notice: Any) -> list:
    """The event's outputs, with the notice that shows its refusals."""
    if outputs is None:
        items: list = []
    elif isinstance(outputs, (list, tuple, set)):
        items = list(outputs)
    else:
        items = [outputs]
    return items if notice in items else items + [notice]


def _hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - lambdas and partials without resolvable hints
        return {}


def refuse_api(message: str) -> gr.Error:
    """A named endpoint's refusal: one log line, no traceback (it is not a crash)."""
    log.info("refused api call: %s", message)
    return gr.Error(message, print_exception=False)


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
    chat_state: Any = None  # gr.State(ChatSession): the last answer the Inspect tab reads
    chatbot: Any = None  # gr.Chatbot
    chat_controls: Any = None  # SamplingControls of the Chat tab (restored with the conversation)
    chat_notice: Any = None  # gr.Markdown under the chat: where page-level refusals show
    model_dropdowns: list = field(default_factory=list)  # every model picker: their labels refresh on load
