"""What every tab builder receives: the app-wide services, the one way to register an event (a page event or a
named endpoint, both behind one guard), and the session-scoped components shared by tabs.

Handlers are module-level functions over the services, bound to a tab's parts with functools.partial. The guard
gives Gradio a plain function whose signature it can read: the handler's own parameters (what the partial left
open, its gr.Request, gr.Progress and gr.EventData ones included) plus a gr.Request where it has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn, Sequence

import gradio as gr
from gradio.context import LocalContext

from qdemo.services.admission import Refused, Services
from qdemo.services.files import scratch_file
from qdemo.serving.limits import Client, RateLimiter, client_from_headers
from qdemo.ui.zerogpu import on_gpu

GENERATION = "generation"  # the concurrency id shared by every event that runs a model
STOP = "stop"  # an endpoint handler's keyword for its request's stop event: the wrapper fills it, never a caller
POLL_S = 0.05  # how often a running endpoint looks whether its caller is still there
CRASHED = "Something went wrong on the server (it is logged); please try again."
log = logging.getLogger("qdemo")


# --- how a refusal reaches the user ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoticeLine:
    """Page events: a refusal becomes a line in the event's notice component."""

    notice: Any

    def refused(self, message: str) -> dict:
        return {self.notice: f"⚠️ {message}"}

    def result(self, value: Any) -> Any:
        """A handler that changes nothing returns None; Gradio needs an update for the outputs it names."""
        return {self.notice: gr.skip()} if value is None else value


@dataclass(frozen=True)
class ErrorReply:
    """Named endpoints: a refusal becomes a gr.Error, which the caller's client raises with the message (no
    traceback on the server: it is not a crash)."""

    def refused(self, message: str) -> NoReturn:
        raise gr.Error(message, print_exception=False)

    def result(self, value: Any) -> Any:
        return value


Delivery = NoticeLine | ErrorReply
Admission = Callable[[gr.Request | None], str | None]  # "" or None: admitted; else why not


# --- the guard ---------------------------------------------------------------------------------------------------

def guarded(fn: Callable, delivery: Delivery, admission: Admission | None = None) -> Callable:
    """`fn` behind the one guard of every event. `admission` comes first (page events that run no model: the
    page-event rate limit; model requests pass the services' admission inside `fn`). A Refused or ValueError is the
    user's message, delivered as `delivery` says, with one log line; anything else is a crash: logged with its
    traceback and answered with CRASHED. Plain and generator functions alike."""
    shape = _Shape.of(fn)

    def admitted(args: tuple) -> tuple[tuple, str | None]:
        args, request = shape.split(args)
        refusal = admission(request) if admission else None
        return args, (_refused(shape.name, refusal) if refusal else None)

    if inspect.isgeneratorfunction(fn):
        def wrapper(*args: Any, **kwargs: Any):
            args, message = admitted(args)
            if message is None:
                try:
                    yield from fn(*args, **kwargs)
                    return
                except gr.Error:
                    raise
                except Exception as exc:  # noqa: BLE001 - a crash must not kill the page; it is logged
                    message = _failure(shape.name, exc)
            yield delivery.refused(message)  # outside the except: a refusal carries no traceback along
    else:
        def wrapper(*args: Any, **kwargs: Any):
            args, message = admitted(args)
            if message is None:
                try:
                    return delivery.result(fn(*args, **kwargs))
                except gr.Error:
                    raise
                except Exception as exc:  # noqa: BLE001
                    message = _failure(shape.name, exc)
            return delivery.refused(message)

    return shape.dress(wrapper)


def _refused(name: str, message: str) -> str:
    log.info("refused %s: %s", name, message)
    return message


def _failure(name: str, exc: Exception) -> str:
    """The user's message for what a handler raised: its own for a refusal or a bad value (the field it names),
    CRASHED for anything else, whose traceback goes to the log."""
    if isinstance(exc, (Refused, ValueError)):
        return _refused(name, str(exc))
    log.error("%s failed", name, exc_info=exc)
    return CRASHED


@dataclass(frozen=True)
class _Shape:
    """How Gradio calls a guarded handler. Gradio fills only parameters it can see, so the wrapper shows the
    handler's open ones (a partial's bound ones gone) with their resolved type hints, and a gr.Request where the
    handler has none: without it every user would count in one rate-limit bucket."""

    name: str
    doc: str | None
    signature: inspect.Signature
    hints: dict[str, Any]
    request_at: int
    added: bool  # the request is the wrapper's own: it is not passed on

    @classmethod
    def of(cls, fn: Callable) -> "_Shape":
        target = _unwrapped(fn)
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        hints = {k: v for k, v in typing.get_type_hints(target).items() if k in signature.parameters}
        at = next((i for i, p in enumerate(params) if hints.get(p.name) is gr.Request), None)
        added = at is None
        if added:
            at = 1 if params else 0
            params.insert(at, inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD))
            hints["request"] = gr.Request
        return cls(target.__name__, target.__doc__, signature.replace(parameters=params), hints, at, added)

    def split(self, args: tuple) -> tuple[tuple, gr.Request | None]:
        request = args[self.request_at] if len(args) > self.request_at else None
        if self.added:
            args = args[:self.request_at] + args[self.request_at + 1:]
        return args, request

    def dress(self, wrapper: Callable) -> Callable:
        wrapper.__name__ = wrapper.__qualname__ = self.name  # Gradio names the event (and its API page) by it
        wrapper.__doc__ = self.doc  # a named endpoint's description
        wrapper.__signature__ = self.signature
        wrapper.__annotations__ = self.hints
        wrapper.qdemo_guarded = True
        return wrapper


def _unwrapped(fn: Callable) -> Callable:
    """The function under partials and decorators: its name, docstring and type hints are the handler's."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        else:
            return fn


# --- endpoints that stop when their caller leaves ----------------------------------------------------------------

_END = object()


def stoppable(fn: Callable) -> Callable:
    """A named endpoint that stops when its caller goes. Gradio runs a sync handler on a worker thread and looks at
    its client only between the handler's yields: a handler blocked in a prefill, or a view that never yields,
    ran on after the caller closed its event stream or cancelled (a cancel even left a generator that had not
    yielded yet unclosed, holding its model lease). This runs `fn` on a thread of its own with a threading.Event as
    its `stop` keyword, and sets the event when Gradio cancels the awaiting task (gradio_client's cancel) or marks
    the event's job dead (a closed stream: Gradio's `Queue.clean_events`), looked at every POLL_S. The engine reads
    it between prefill chunks and steps. The signature Gradio reads is `fn`'s without `stop`."""
    shown = inspect.signature(fn)
    shown = shown.replace(parameters=[p for p in shown.parameters.values() if p.name != STOP])
    hints = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != STOP}
    name = getattr(fn, "__name__", "endpoint")
    wants = {STOP: None} if STOP in inspect.signature(fn).parameters else {}

    if inspect.isgeneratorfunction(_unwrapped(fn)):
        async def endpoint(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            call = _Call.start(name)
            items = fn(*args, **{k: call.stop for k in wants}, **kwargs)  # a generator: none of it runs yet
            ahead = _Ahead(asyncio.get_running_loop())
            pumping = asyncio.wrap_future(call.worker.submit(call.context.run, ahead.pump, items, call.stop))
            try:
                while True:
                    item, finished = await call.newest(ahead)
                    if call.left:
                        return
                    if item is not _END:
                        yield item
                    if finished:
                        return
            finally:
                await call.end(pumping)
    else:
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            call = _Call.start(name)
            try:
                return await call.run(fn, *args, **{k: call.stop for k in wants}, **kwargs)
            finally:
                await call.end()

    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__doc__ = fn.__doc__
    endpoint.__signature__ = shown
    endpoint.__annotations__ = hints
    endpoint.qdemo_guarded = getattr(fn, "qdemo_guarded", False)
    return endpoint


@dataclass
class _Call:
    """One endpoint call: its stop event, the thread its handler runs on (in order, in the request's context
    variables), and whether its caller is still there."""

    name: str
    stop: threading.Event
    alive: Callable[[], bool]
    worker: ThreadPoolExecutor
    context: contextvars.Context
    left: bool = False

    @classmethod
    def start(cls, name: str) -> "_Call":
        return cls(name, threading.Event(), _caller_alive(), ThreadPoolExecutor(1, thread_name_prefix=f"qdemo-{name}"),
                   contextvars.copy_context())

    async def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """`fn` on the call's thread; the stop event is set the moment the caller cancels or is gone."""
        future = asyncio.wrap_future(self.worker.submit(self.context.run, fn, *args, **kwargs))
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=POLL_S)
                if done:
                    return future.result()
                if not self.left and not self.alive():
                    self.halt("left")
        except asyncio.CancelledError:
            self.halt("cancelled")
            # The work in flight ends within a step now; the concurrency slot is free once it has, as Gradio's own
            # (shielded) worker call would keep it.
            await asyncio.wait({future})
            raise

    def halt(self, why: str) -> None:
        if not self.left:
            self.left = True
            self.stop.set()
            log.info("%s stopped: its client %s", self.name, why)

    async def newest(self, ahead: "_Ahead") -> tuple[Any, bool]:
        """The generator's newest item not yet sent (_END: none) and whether it has ended (a failure raises here,
        after the items before it); the stop event is set the moment the caller cancels or is gone."""
        try:
            while True:
                item, finished = ahead.take()
                if item is not _END or finished:
                    return item, finished
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ahead.signal.wait(), timeout=POLL_S)
                ahead.signal.clear()
                if not self.left and not self.alive():
                    self.halt("left")
        except asyncio.CancelledError:
            self.halt("cancelled")
            raise

    async def end(self, pending: Awaitable[Any] | None = None) -> None:
        """The handler's work ended on its own thread (a generator closed there), and the thread let go. The stop
        event is set first, so a generator still running ends within a step: its model lease is free before the
        concurrency slot."""
        self.stop.set()
        try:
            if pending is not None:
                await asyncio.shield(pending)
        finally:
            self.worker.shutdown(wait=False)


class _Ahead:
    """A generator endpoint's items, run to the end on the call's thread while Gradio sends the last one (a token's
    diff, JSON and event-stream write no longer delay the next step). Each item is the whole answer so far, so
    when Gradio falls behind only the newest is sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.signal = asyncio.Event()
        self._loop = loop
        self._lock = threading.Lock()
        self._item: Any = _END
        self._finished = False
        self._error: BaseException | None = None

    def pump(self, items: Any, stop: threading.Event) -> None:
        try:
            for item in items:
                self._put(item)
                if stop.is_set():  # the caller went: the generator is closed at its next yield
                    break
        except BaseException as exc:  # noqa: BLE001 - raised to the caller by take(), after the items before it
            self._error = exc
        finally:
            items.close()
            with self._lock:
                self._finished = True
            self._loop.call_soon_threadsafe(self.signal.set)

    def _put(self, item: Any) -> None:
        with self._lock:
            self._item = item
        self._loop.call_soon_threadsafe(self.signal.set)

    def take(self) -> tuple[Any, bool]:
        """(the newest item not yet taken or _END, whether nothing more will come); a failure of the generator is
        raised once its items before it are taken."""
        with self._lock:
            item, self._item, finished = self._item, _END, self._finished
        if item is not _END:
            return item, finished and self._error is None
        if finished and self._error is not None:
            raise self._error
        return item, finished


def _caller_alive() -> Callable[[], bool]:
    """Whether the caller of the running event still listens. Gradio marks a queued event's job dead when its event
    stream closes, and tells the handler nothing; it is read here from the queue through the request's context, as
    gradio.helpers reads it for progress and log messages. Outside a queued event: always."""
    blocks = LocalContext.blocks.get(None)
    event_id = LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    if events is None or event_id is None:
        return lambda: True

    def alive() -> bool:
        event = events.get(event_id)
        return event is None or bool(event.alive)

    return alive


# --- registering events ------------------------------------------------------------------------------------------

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
        session = getattr(request, "session_hash", None)
        # A REST call that sent no session_hash is named after its own event: one call, not a session to keep.
        own = session is None or session != LocalContext.event_id.get(None)
        return client_from_headers(session, peer, headers.get("x-forwarded-for"), self.trusted_proxies, own)

    def page_admission(self, request: gr.Request | None) -> str | None:
        return self.events.check(self.client(request))

    def on(self, triggers: Any | Sequence[Any], fn: Callable, inputs: Any, outputs: Any, *, notice: Any,
           runs_model: bool = False, **kwargs: Any):
        """A page event on one trigger or several (one Gradio event either way). Its handler passes admission first
        — a model request through the services' admission (which the handler calls), anything else through the
        page-event rate limit — and a refusal or a crash becomes a readable line in `notice`. Page events are
        never API endpoints; model events share the generation concurrency group."""
        listed = list(triggers) if isinstance(triggers, (list, tuple)) else [triggers]
        return gr.on(triggers=listed, fn=self._page(fn, notice, runs_model), inputs=inputs,
                     outputs=_with(outputs, notice), **self._options(runs_model, kwargs))

    def after(self, event: Any, fn: Callable, inputs: Any, outputs: Any, *, notice: Any, runs_model: bool = False,
              **kwargs: Any):
        """A page event that runs when `event` has run (Gradio chains a `.then` to one event; gr.on cannot)."""
        return event.then(self._page(fn, notice, runs_model), inputs, _with(outputs, notice),
                          **self._options(runs_model, kwargs))

    def endpoint(self, fn: Callable, name: str) -> None:
        """A named endpoint for gradio_client: the same guard, a refusal answered as a gr.Error naming the field;
        it runs models, so it waits in the generation group. A handler with a `stop` keyword gets its request's
        stop event, set when the caller cancels or goes away (`stoppable`)."""
        gr.api(stoppable(on_gpu(guarded(fn, ErrorReply()))), api_name=name, **self.queue_kwargs())

    def _page(self, fn: Callable, notice: Any, runs_model: bool) -> Callable:
        if runs_model:
            return on_gpu(guarded(fn, NoticeLine(notice)))  # the services' admission runs inside `fn`
        return guarded(fn, NoticeLine(notice), self.page_admission)

    def _options(self, runs_model: bool, kwargs: dict) -> dict:
        return {"api_visibility": "private", **(self.queue_kwargs() if runs_model else {}), **kwargs}


def _with(outputs: Any, notice: Any) -> list:
    """The event's outputs, with the notice that shows its refusals."""
    if outputs is None:
        items: list = []
    elif isinstance(outputs, (list, tuple, set)):
        items = list(outputs)
    else:
        items = [outputs]
    return items if notice in items else items + [notice]


def progress_callback(progress: gr.Progress | None) -> Callable[[str, float, float], None] | None:
    """A ProgressFn that moves Gradio's progress bar."""
    if progress is None:
        return None

    def report(phase: str, done: float, total: float) -> None:
        progress(done / total if total else 0, desc=phase)

    return report


def download(name: str, text: str) -> gr.DownloadButton:
    """`text` as a file the page offers for download under `name` (a scratch file of its own)."""
    path = scratch_file(name)
    path.write_text(text, encoding="utf-8")
    return gr.DownloadButton(value=str(path), visible=True)


def event_index(evt: gr.EventData, key: str = "index") -> Any:
    """What a custom `trigger('select', {...})` in the page sent under `key` (None when it sent nothing)."""
    picked = evt._data if isinstance(evt._data, dict) else {}
    return picked.get(key)


@dataclass
class SessionComponents:
    """Components more than one tab reads (created in the app builder; the chat_* ones by the Chat tab, which is
    built first)."""

    runs: gr.State  # list[RunRecord] of this session, newest last
    saved_runs: gr.BrowserState  # their compact copy: the Performance tab survives a reload
    conversation: gr.BrowserState  # {"model", "system", "messages", "settings"}: survives a reload
    owner: Any = None  # gr.BrowserState: this browser's id, minted on its first load; whose stored runs are whose
    chat_model: Any = None  # gr.Dropdown; Internals follows it
    chat_system: Any = None  # gr.Textbox
    chat_state: Any = None  # gr.State(ChatSession): the last answer the Inspect tab reads
    chatbot: Any = None  # gr.Chatbot
    chat_controls: Any = None  # SamplingControls of the Chat tab (restored with the conversation)
    chat_notice: Any = None  # gr.Markdown under the chat: where page-level refusals show
    chat_box: Any = None  # gr.Textbox: the message box (a stored run's link shows read-only)
    chat_send: Any = None  # gr.Button
    chat_edits: list = field(default_factory=list)  # Regenerate and Undo: off, with Send, on a stored run's page
    model_dropdowns: list = field(default_factory=list)  # every model picker: their labels refresh on load
