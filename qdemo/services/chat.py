"""Chat: a session's turns, their streams and everything the Chat tab shows about the last answer.

No Gradio here. A turn is two steps, so the user sees their message at once and Stop is honoured from the
moment they press Send: `begin_turn` (instant: checks the text, puts it in the chat, arms the session's stop
event) and `answer` (queued: admission, load, stream). `ChatSession.interrupt` (Clear, Undo, Import) stops the
answer and makes sure nothing it still yields lands in the cleared chat: every update passes `ChatSession.deliver`,
and `ChatSession.settle` waits until the update on its way to the page (if any) has reached Gradio's queue, so what
Clear writes after it lands last. The model loads on a thread of its own (`_Loading`): Stop and Clear end an answer
at once while its model loads, and the load finishes for the next message.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import re
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from qdemo.core.events import Event, TokenEvent
from qdemo.core.runs import RunRecord
from qdemo.models.prompting import keep_last_turns, validate_messages
from qdemo.models.sources import ProgressFn, readiness
from qdemo.probes.decided import TokenDecision, token_decisions
from qdemo.sampling import SamplingParams
from qdemo.services.admission import Admitted, ModelRequest, Refused, Services
from qdemo.services.history import client_owner, keep_run
from qdemo.services.kept_states import client_state
from qdemo.serving.limits import Client, Limits, clean_text, cut_text
from qdemo.serving.local import drafting_pays
from qdemo.serving.protocol import Backend, same_tokenizer
from qdemo.views.answer import (
    END_MARK,
    STOPPED_BEFORE_START,
    metrics_line,
    note_message,
    prompt_cut_note,
    stopped_before_start,
)
from qdemo.views.decided import answer_summary

EXPORT_VERSION = 1
ROLES = ("user", "assistant")
_END_NOTE = re.compile(f"(?:\n\n)?{END_MARK}.*\\Z", re.S)  # the note views.answer adds; never sent to the model
# Clear (or a new turn) waits at most this long for an update of the stale answer that is on its way to the page:
# Gradio takes it within milliseconds; the bound only matters if the answer's event was cancelled mid-handover.
SETTLE_S = 1.0
POLL_S = 0.05  # how often an answer waiting for its model looks whether Stop or Clear came


@dataclass(frozen=True)
class Turn:
    messages: list[dict[str, str]]  # what goes to the model (system first when given)
    notice: str  # "" or a sentence for the user (cut message, turns left out)


@dataclass
class AnswerView:
    """What the side panels show about the last answer, computed once when it ends (no model needed later)."""

    run: RunRecord
    texts: list[str]  # each generated token decoded on its own
    labels: dict[int, str]  # every token id that appears in any stage's top-N, decoded
    prompt: list[tuple[int, str, bool]]  # (id, text, special) of every prompt token
    dropped: list[tuple[str, str]]  # (role, text) of history messages left out to fit the context
    messages: list[dict[str, str]] = field(default_factory=list)  # the turn as sent (system first when given)
    model: str = ""  # the model reference it ran on ("name" or "name [forward]")

    @functools.cached_property
    def decisions(self) -> list[TokenDecision]:
        """Which stage decided what at each token (worked out once: the token view redraws often)."""
        return token_decisions(self.run.tokens)

    @functools.cached_property
    def decision_summary(self) -> list[str]:
        return answer_summary(self.decisions)


class ChatSession:
    """One browser session's chat state that outlives a request: the running answer's stop signal, the turn
    tickets that tie each answer to the Send that armed it, an epoch that Clear/Undo/Import bump so a stale stream
    stops writing, and the last answer's view. Gradio deep-copies a State's initial value for every session: each
    copy starts fresh (an Event cannot be deep-copied).

    `action`s are the page's numbers for its chat actions (Send, Stop, Clear…), in the order the user made them:
    two requests may reach the server the other way round, and the numbers say which was first."""

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex  # names this session's kept decode state in the pool
        self.stop = threading.Event()
        self._handover = threading.Condition()  # epoch and ticket changes against an update being handed over
        self._on_the_way = 0  # updates yielded to the page that it has not taken yet
        self.epoch = 0
        self.latest = 0  # the newest turn ticket
        self.pending: int | None = None  # armed by begin_turn, not yet taken by answer()
        self.running: int | None = None  # the answer being written
        self.view: AnswerView | None = None
        self.branches: Any = None  # qdemo.services.branches.BranchTree of the last answer, once branched
        self.reset_at = 0  # the action of the latest Clear, Undo or Import the server took
        self.stop_at = 0  # … of the latest Stop
        self.armed_by = 0  # … of the Send that armed the newest turn

    def __deepcopy__(self, memo: dict) -> "ChatSession":
        return type(self)()

    def busy(self) -> str:
        """"" when a new turn may start; else why not. A turn whose Stop was pressed no longer blocks."""
        if self.stop.is_set():
            return ""
        if self.running is not None:
            return "An answer is still being written: wait for it, or press Stop."
        if self.pending is not None:
            return "Your last message is still waiting for the model: wait for it, or press Stop."
        return ""

    def stale(self, action: int | None) -> bool:
        """A Send (`action`) made before a Clear, Undo or Import the server already took: it must not arm a turn."""
        return action is not None and action < self.reset_at

    def arm(self, action: int | None = None) -> int:
        """A new answer: a fresh stop event (a late Stop never leaks into it; a Stop the page made after this Send
        `action` but the server took first stops it at once); returns its ticket."""
        with self._handover:
            self.stop = threading.Event()
            self.latest += 1
            self.pending = self.latest
            self.armed_by = action or 0
            if action is not None and action < self.stop_at:
                self.stop.set()
            return self.latest

    def stop_turn(self, action: int | None = None) -> None:
        """Stop (the page's `action`): the turn that runs or waits ends, unless the page armed it after the click."""
        with self._handover:
            self.stop_at = max(self.stop_at, action or 0)
            if action is None or self.armed_by < action:
                self.stop.set()

    def take(self, ticket: int | None) -> bool:
        """answer() starts the turn `ticket` armed (False: not armed, or a newer turn replaced it)."""
        with self._handover:  # against an interrupt between the look and the take
            if ticket is None or self.pending != ticket:
                return False
            self.pending, self.running = None, ticket
            return True

    def finish(self, ticket: int) -> None:
        if self.running == ticket:
            self.running = None

    def interrupt(self, action: int | None = None) -> None:
        """Stop whatever runs and make its remaining output stale (its decode state is not kept either); `action`:
        the page's number of this Clear, Undo or Import."""
        with self._handover:
            self.reset_at = max(self.reset_at, action or 0)
            self.stop.set()
            self.pending = self.running = None
            self.epoch += 1
            self.view = None
            self.branches = None

    def current(self, epoch: int, ticket: int | None = None) -> bool:
        """The answer started at `epoch` for `ticket` may still write to the chat."""
        return epoch == self.epoch and (ticket is None or ticket == self.latest)

    def report_if_current(self, epoch: int, ticket: int | None, report: ProgressFn, phase: str, done: float,
                          total: float) -> None:
        """A progress report of the answer started at `epoch` for `ticket`, dropped once it went stale (checked
        under the lock `interrupt` takes)."""
        with self._handover:
            if self.current(epoch, ticket):
                report(phase, done, total)

    def deliver(self, epoch: int, ticket: int | None, update: Any) -> Iterator[Any]:
        """`update`, if the answer started at `epoch` for `ticket` may still write to the chat (checked under the
        same lock `interrupt` and `arm` take). Gradio asks a generator for its next update only once the last one is
        in the session's message queue, so until this generator is resumed the update is on its way: `settle` waits
        for it."""
        with self._handover:
            if not self.current(epoch, ticket):
                return
            self._on_the_way += 1
        try:
            yield update
        finally:
            with self._handover:
                self._on_the_way -= 1
                self._handover.notify_all()

    def adopt(self, epoch: int, ticket: int | None, view: "AnswerView", branches: Any = None) -> bool:
        """The finished answer's view (and its branch tree, for a branch) becomes the session's last answer; False
        when the answer went stale first."""
        with self._handover:
            if not self.current(epoch, ticket):
                return False
            self.view, self.branches = view, branches
            return True

    def settle(self, timeout_s: float = SETTLE_S) -> bool:
        """Wait until no update of an answer is on its way to the page (after `interrupt` or `arm`, whatever the
        page shows next lands after it); False when `timeout_s` passed first."""
        with self._handover:
            return self._handover.wait_for(lambda: self._on_the_way == 0, timeout_s)


# --- messages ----------------------------------------------------------------------------------------------

def content_text(content: Any, where: str = "content") -> str:
    """A chat message's text. Gradio 6 may hand content back as a list of typed parts; anything that is not text
    is an error naming the field."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text", ""), str):
                pieces.append(part.get("text", ""))
            else:
                text = part.get("text") if isinstance(part, dict) else part
                raise ValueError(f"{where} part {i} must be text, got {type(text).__name__}")
        return "".join(pieces)
    raise ValueError(f"{where} must be text, got {type(content).__name__}")


def message_text(message: Mapping[str, Any], where: str = "message") -> str:
    """The text the model should see: cleaned, and without the end note a stopped or cut answer shows."""
    text = clean_text(content_text(message.get("content"), f"{where} content"))
    return _END_NOTE.sub("", text) if message.get("role") == "assistant" else text


def history_messages(history: Sequence[Any] | None, system: str | None = None,
                     strict: bool = False) -> tuple[list[dict[str, str]], list[str]]:
    """The chatbot's messages as plain {role, content}, the system prompt first when given, and notices for what
    was left out. Gradio's own extras (thinking/metadata bubbles) are skipped quietly; with `strict` (API input),
    a message that is not {role, content} or has another role is an error naming its index."""
    system = clean_text(system) if isinstance(system, str) else None
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    skipped = 0
    for i, m in enumerate(history or []):
        if not isinstance(m, Mapping):
            if strict:
                raise ValueError(f"history message {i} must be a {{role, content}} object, got {type(m).__name__}")
            skipped += 1
            continue
        if m.get("role") not in ROLES or (m.get("metadata") or {}).get("title"):
            if strict:
                raise ValueError(f"history message {i} has role {echo_role(m.get('role'))}; expected user or "
                                 "assistant (put the system prompt in `system`)")
            skipped += 1
            continue
        if m["role"] == "assistant" and _is_note(m.get("content")):
            continue  # the page's note after a stopped or cut answer: for people only
        messages.append({"role": m["role"], "content": message_text(m, f"history message {i}")})
    notices = ([f"{skipped} message(s) that are neither the user's nor the assistant's were left out."] if skipped
               else [])
    return messages, notices


def _is_note(content: Any) -> bool:
    return isinstance(content, str) and content.startswith(END_MARK)


def echo_role(role: Any) -> str:
    text = repr(role)
    return text if len(text) <= 40 else text[:39] + "…"


def prepare_turn(message: Any, history: Sequence[Any] | None, system: str | None, limits: Limits = Limits(),
                 strict: bool = False) -> Turn | None:
    """The messages for the model, or None for an empty message. The text is cleaned (control characters,
    invalid UTF-8); over-long input is cut to `limits.max_input_chars` and history beyond `limits.max_turns`
    turns loses its oldest ones, each with a notice."""
    text = clean_text(message) if isinstance(message, str) else ""
    if not text.strip():
        return None
    text, cut = cut_text(text, limits.max_input_chars)
    past, notices = history_messages(history, system, strict=strict)
    if cut:
        notices.insert(0, cut)
    return _fit(past + [{"role": "user", "content": text}], notices, limits)


def _fit(messages: list[dict[str, str]], notices: list[str], limits: Limits) -> Turn:
    """Messages ending with the user's new one: the history before it keeps at most `limits.max_turns` turns."""
    history, last = messages[:-1], messages[-1:]
    kept, trimmed = keep_last_turns(history, limits.max_turns)
    if trimmed:
        notices.append(f"Only the last {limits.max_turns} turns of the conversation were sent ({trimmed} older "
                       "message(s) left out).")
    validate_messages(kept + last)
    return Turn(messages=kept + last, notice=" ".join(notices))


def pop_last_turn(history: Sequence[Any] | None) -> tuple[list[Any], str | None]:
    """The history without its last user message (and the answers after it), and that message's text."""
    history = list(history or [])
    while history and (not isinstance(history[-1], Mapping) or history[-1].get("role") != "user"):
        history.pop()
    if not history:
        return history, None
    return history, message_text(history.pop())


def without_answer(history: Sequence[Any] | None) -> list[Any]:
    """The history up to and including its last user message (what Regenerate answers again)."""
    history = list(history or [])
    while history and (not isinstance(history[-1], Mapping) or history[-1].get("role") != "user"):
        history.pop()
    return history


# --- the two steps of a turn ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Begun:
    chat: list[Any]  # the chat as it should show now (the user's message last)
    notice: str
    started: bool  # False: nothing to answer (the notice says why)
    ticket: int | None = None  # ties the answer to this turn (answer() takes it)
    stale: bool = False  # made before a Clear, Undo or Import the server took first: the page changes nothing


def begin_turn(session: ChatSession, message: Any, history: Sequence[Any] | None, limits: Limits,
               action: int | None = None) -> Begun:
    """Step 1 of Send (the page's `action`): the cleaned (and maybe cut) message goes into the chat at once; the
    answer is armed."""
    if session.stale(action):
        return Begun(list(history or []), "", False, stale=True)
    text = clean_text(message) if isinstance(message, str) else ""
    if not text.strip():
        return Begun(list(history or []), "Empty message ignored: type something first.", False)
    busy = session.busy()
    if busy:
        return Begun(list(history or []), busy, False)
    text, cut = cut_text(text, limits.max_input_chars)
    ticket = session.arm(action)
    return Begun(list(history or []) + [{"role": "user", "content": text}], cut, True, ticket)


def begin_regenerate(session: ChatSession, history: Sequence[Any] | None, action: int | None = None) -> Begun:
    """Step 1 of Regenerate: the last answer goes; its question stays, waiting for a new answer."""
    if session.stale(action):
        return Begun(list(history or []), "", False, stale=True)
    kept = without_answer(history)
    if not kept:
        return Begun(list(history or []), "Nothing to regenerate yet: send a message first.", False)
    busy = session.busy()
    if busy:
        return Begun(list(history or []), busy, False)
    ticket = session.arm(action)
    return Begun(kept, "", True, ticket)


@dataclass
class ChatUpdate:
    """One step of an answer for the UI: the chat, the metrics line, a notice, and at the end the view."""

    chat: list[Any]
    metrics: str
    notice: str = ""
    view: AnswerView | None = None  # set on the last update of a finished answer
    run: RunRecord | None = None
    done: bool = False


UI_INTERVAL_S = 0.05  # at most ~20 updates a second: each re-sends the chat, and a fast model must not wait on it


def answer(services: Services, session: ChatSession, client: str | None, history: Sequence[Any] | None,
           model: str, system: str | None, params: SamplingParams | None, run_id: int,
           progress: ProgressFn | None = None, assisted: bool | None = None, ticket: int | None = None
           ) -> Iterator[ChatUpdate]:
    """Step 2: admission, then the answer streamed into the chat. Yields nothing when step 1 armed nothing or
    the chat was cleared meanwhile; ends at once (reason "stopped") when Stop came during the queue or the load.
    `assisted`: speculative decoding with the model's registry draft (None: where it pays, see
    qdemo.serving.local.drafting_pays). `ticket`: the turn begin_turn armed (None: the latest)."""
    ticket = session.latest if ticket is None else ticket
    if not session.take(ticket):
        return
    try:
        yield from _answer(services, session, ticket, client, history, model, system, params, run_id, progress,
                           assisted)
    finally:
        session.finish(ticket)


def _answer(services: Services, session: ChatSession, ticket: int, client: str | None,
            history: Sequence[Any] | None, model: str, system: str | None, params: SamplingParams | None,
            run_id: int, progress: ProgressFn | None, assisted: bool | None) -> Iterator[ChatUpdate]:
    epoch, stop = session.epoch, session.stop
    deliver = functools.partial(session.deliver, epoch, ticket)
    chat = list(history or [])
    try:
        turn = _fit(*history_messages(chat, system), services.limits)
    except ValueError as exc:
        yield from deliver(ChatUpdate(chat=chat, metrics=metrics_line(None), notice=f"⚠️ {exc}", done=True))
        return
    draft = _draft_for(services, model, params, assisted)
    requests = [ModelRequest(model, params)] + ([ModelRequest(draft, sampling=False)] if draft else [])
    # A load's progress stops reaching the bar the moment Clear, Undo or Import makes this answer stale: the reset
    # they send must be the last thing the page shows about it.
    shown = functools.partial(session.report_if_current, epoch, ticket, progress) if progress else None
    loading = _Loading.start(services, client, requests, shown)
    try:
        admitted = loading.wait(lambda: stop.is_set() or not session.current(epoch, ticket))
        if admitted is None or stop.is_set():  # Stop (or Clear) came while the request queued or the model loaded
            yield from deliver(ChatUpdate(chat=chat + [stopped_before_start()], metrics=STOPPED_BEFORE_START,
                                          done=True))
            return
        yield from _admitted_answer(services, session, (epoch, ticket), chat, turn, admitted, bool(draft),
                                    model or services.default_model, run_id, stop)
    except Refused as exc:
        yield from deliver(ChatUpdate(chat=chat, metrics=metrics_line(None), notice=f"⚠️ {exc}", done=True))
    finally:
        loading.close()


def _admitted_answer(services: Services, session: ChatSession, turn_id: tuple[int, int], chat: list[Any],
                     turn: Turn, admitted: Admitted, drafted: bool, model_ref: str, run_id: int,
                     stop: threading.Event) -> Iterator[ChatUpdate]:
    """The answer on its leased model, with the session's decode state from its last turn: only what is new gets
    prefilled (beam search and speculative decoding keep none)."""
    backend, params = admitted.backend, admitted.params[0]
    notice = _joined(turn.notice, admitted.notice)
    drafter = admitted.backends[1] if drafted else None
    state = None if drafter or params.beam_search else (
        services.states.take(session.key, backend.key) or backend.new_state())
    if drafter:
        events = functools.partial(assisted_events, services, backend, drafter, turn.messages, params, stop)
    else:
        events = functools.partial(chat_events, services, backend, turn.messages, params, stop, state=state)
    try:
        yield from _stream(backend, session, turn_id, chat, turn, params, run_id, notice, events, model_ref)
    finally:
        if state is not None and session.current(turn_id[0]):
            services.states.keep(session.key, state)


@dataclass
class _Relay:
    """Progress reports passed on to the answer's bar while the answer waits for them."""

    report: ProgressFn | None

    def __call__(self, phase: str, done: float, total: float) -> None:
        report = self.report
        if report is not None:
            report(phase, done, total)


@dataclass
class _Loading:
    """A turn's admission (rate limit, settings, load, lease) on a thread of its own, so that Stop and Clear end the
    answer while its model loads. A load that outlives its answer finishes for the next message: its lease is let
    go as soon as it is taken, and its progress no longer reaches the ended answer's bar."""

    admitted: Future
    stack: contextlib.ExitStack
    relay: _Relay

    @classmethod
    def start(cls, services: Services, client: str | None, requests: Sequence[ModelRequest],
              progress: ProgressFn | None) -> "_Loading":
        stack, relay = contextlib.ExitStack(), _Relay(progress)
        admission = services.admit(client, *requests, progress=relay if progress else None)
        return cls(_on_a_thread(stack.enter_context, admission), stack, relay)

    def wait(self, give_up: Callable[[], bool]) -> Admitted | None:
        """The admitted request (a refusal raises), or None once `give_up()` holds, looked at every POLL_S."""
        while True:
            try:
                return self.admitted.result(timeout=POLL_S)
            except FutureTimeout:
                if give_up():
                    return None

    def close(self) -> None:
        """The answer is over: its lease goes now, or when the load ends."""
        self.relay.report = None
        self.admitted.add_done_callback(lambda _: self.stack.close())


def _on_a_thread(fn: Callable[..., Any], *args: Any) -> Future:
    """`fn(*args)` on a thread of its own, in the caller's context variables (Gradio finds the event's progress bar
    through them)."""
    future: Future = Future()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            future.set_result(context.run(fn, *args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name="qdemo-admission", daemon=True).start()
    return future


def api_turn(services: Services, client: Client | str | None, message: Any, history: Any, model: Any, settings: Any,
             system: Any, top_n: int = 0, stop: threading.Event | None = None, notices: list[str] | None = None
             ) -> Iterator[RunRecord]:
    """One turn for a named endpoint, through the page answer's own steps: the turn fitted (`_fit`), the
    same admission, `chat_events` (prompt limit, time limit) and run record. Yields the run after each event, the
    last one finished; a bad field or a failed answer is a Refused saying what. `stop` (the caller left) ends the
    answer within a prefill chunk or a step, as the page's Stop does. `notices` collects what the page's notice line
    would say about the request: turns left out, max new tokens lowered, old messages dropped to fit the prompt.
    The caller's kept decode state on this model (`kept_states.client_state`) supplies the longest prefix it shares with
    this prompt, and keeps this turn for the next."""
    turn = _api_turn_messages(message, history, system, services.limits)
    notes = notices if notices is not None else []
    with services.admit(client, ModelRequest(model, settings)) as admitted:
        backend, params = admitted.backend, admitted.params[0]
        notes.extend(n for n in (turn.notice, admitted.notice) if n)
        run = run_record(backend, params, 0, "api")
        with client_state(services.states, client, backend, use=not params.beam_search) as state:
            events = chat_events(services, backend, turn.messages, params, stop, top_n=top_n, state=state)
            try:
                for event in events:
                    run.add(event)
                    if run.done is not None and not run.done.error:  # kept before the caller sees the end
                        keep_run(services.store, client_owner(client), "api", run, turn.messages)
                    yield run
            finally:
                events.close()  # a caller that goes away stops the generation
    if run.prefill is not None and run.prefill.dropped_turns:
        notes.append(f"{len(run.prefill.dropped_turns)} older message(s) were left out to fit this server's prompt "
                     "limit.")
    if run.done and run.done.error:
        raise Refused(run.done.error)


def api_answer(services: Services, client: Client | str | None, message: Any, history: Any, model: Any, settings: Any,
               system: Any, top_n: int = 0, stop: threading.Event | None = None, notices: list[str] | None = None
               ) -> RunRecord:
    """`api_turn` run to its end: the finished run."""
    run = None
    for run in api_turn(services, client, message, history, model, settings, system, top_n, stop, notices):
        pass
    return run


def _api_turn_messages(message: Any, history: Any, system: Any, limits: Limits) -> Turn:
    """A caller's turn, read strictly: every field that is not what it should be is named."""
    if history is not None and not isinstance(history, list):
        raise Refused(f"history must be a list of {{role, content}} messages, got {type(history).__name__}")
    if system is not None and not isinstance(system, str):
        raise Refused(f"system must be text, got {type(system).__name__}")
    turn = prepare_turn(message, history or [], system, limits, strict=True)
    if turn is None:
        raise Refused("message is empty")
    return turn


def run_record(backend: Backend, params: SamplingParams, run_id: int, label: str) -> RunRecord:
    """The record an answer fills: the model and forward it runs on and the settings it runs with."""
    return RunRecord(run_id=run_id, model=backend.name, settings=params.to_dict(), label=label,
                     forward=backend.forward_label)


def chat_events(services: Services, backend: Backend, messages: list[dict[str, str]], params: SamplingParams,
                stop_event: threading.Event | None = None, top_n: int = 20, state=None) -> Iterator[Event]:
    """The events of a chat on this server: the prompt fitted into the model's context and the server's
    prompt-token limit (oldest turns first, reported as dropped), and the answer cut at its time limit. With a kept
    decode `state`, only the prompt tokens after what it already holds are prefilled. Raises PromptTooLongError (a
    ValueError) when the newest message alone does not fit."""
    prompt = backend.chat_prompt(messages, params.max_new_tokens, max_prompt_tokens=services.limits.max_prompt_tokens)
    return backend.chat(messages, prompt, params, stop_event, top_n, services.limits.max_generation_seconds, state)


def assisted_events(services: Services, backend: Backend, draft: Backend, messages: list[dict[str, str]],
                    params: SamplingParams, stop_event: threading.Event | None = None, top_n: int = 20
                    ) -> Iterator[Event]:
    """`chat_events` with speculative decoding: `draft` proposes, `backend` verifies."""
    if not same_tokenizer(backend, draft):
        raise Refused(f"{draft.name} cannot draft for {backend.name}: their tokenizers differ")
    prompt = backend.chat_prompt(messages, params.max_new_tokens, max_prompt_tokens=services.limits.max_prompt_tokens)
    return backend.generate_assisted(draft, prompt.ids, params, stop_event=stop_event, top_n=top_n,
                                     dropped_turns=prompt.dropped_turns,
                                     time_limit_s=services.limits.max_generation_seconds)


def _draft_for(services: Services, model: str, params: SamplingParams | None, assisted: bool | None) -> str | None:
    """The draft model to lease with `model` for this answer, or None (none named, switched off, beam search, or
    the draft cannot load here)."""
    if assisted is False or params is None or params.beam_search or model not in services.registry.models:
        return None
    draft = services.registry.get(model).draft
    if draft is None or (assisted is None and not drafting_pays(services.pool.device)):
        return None
    return draft if readiness(services.registry.get(draft)).ready else None


def _stream(backend: Backend, session: ChatSession, turn_id: tuple[int, int], chat: list[Any], turn: Turn,
            params: SamplingParams, run_id: int, notice: str, start: Callable[[], Iterator[Event]],
            model_ref: str = "") -> Iterator[ChatUpdate]:
    """The answer's events as chat updates, at most one every UI_INTERVAL_S; a stopped or cut answer ends with a
    note bubble of its own after the answer's (see views.answer.note_message)."""
    run = run_record(backend, params, run_id, "chat")
    shown = chat + [{"role": "assistant", "content": ""}]
    if params.beam_search:
        notice = _joined(notice, "Beam search shows its best beam so far; it can change until the search ends.")
    deliver = functools.partial(session.deliver, *turn_id)
    events = iter(())
    shown_at = 0.0
    try:
        events = start()
        for event in events:
            run.add(event)
            if not session.current(*turn_id):
                return  # cleared or replaced: the engine stops with this generator; nothing more is shown
            if run.done is None and time.perf_counter() - shown_at >= UI_INTERVAL_S:
                shown[-1] = {"role": "assistant", "content": answer_text(run)}
                yield from deliver(ChatUpdate(chat=shown, metrics=metrics_line(run),
                                              notice=_joined(notice, prompt_cut_note(run)), run=run))
                shown_at = time.perf_counter()
    except (Refused, ValueError) as exc:  # prompt too long and friends: the user can act on these
        yield from deliver(ChatUpdate(chat=chat, metrics=metrics_line(None), notice=f"⚠️ {exc}", done=True))
        return
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    note = note_message(run)
    shown[-1:] = [{"role": "assistant", "content": answer_text(run)}] + ([note] if note else [])
    view = dataclasses.replace(answer_view(backend, run, turn.messages), model=model_ref)
    if session.adopt(*turn_id, view):
        yield from deliver(ChatUpdate(chat=shown, metrics=metrics_line(run),
                                      notice=_joined(notice, prompt_cut_note(run)), view=view, run=run, done=True))


def _joined(*notices: str) -> str:
    return " ".join(n for n in notices if n)


# --- what the panels show ----------------------------------------------------------------------------------

def answer_text(run: RunRecord) -> str:
    """The answer so far; during a beam search, the best running beam."""
    if run.done:
        return run.done.text
    if not run.tokens and run.progress is not None:
        return run.progress.text
    return "".join(t.text for t in run.tokens)


def answer_view(backend: Backend, run: RunRecord, messages: list[dict[str, str]]) -> AnswerView:
    ids = [t.token_id for t in run.tokens]
    stage_ids = {i for t in run.tokens for s in t.stages for i in s.token_ids}
    labels = backend.token_texts(list(stage_ids | set(ids)))
    prompt = list(run.prefill.prompt_ids) if run.prefill else []
    dropped_indices = run.prefill.dropped_turns if run.prefill else ()
    dropped = [(messages[i]["role"], messages[i]["content"]) for i in dropped_indices if 0 <= i < len(messages)]
    return AnswerView(run=run, texts=[labels[i] for i in ids], labels=labels,
                      prompt=backend.prompt_pieces(prompt), dropped=dropped, messages=list(messages))


def token_at(view: AnswerView | None, index: Any) -> TokenEvent | None:
    if view is None:
        return None
    try:
        i = int(index)
    except (TypeError, ValueError):
        return None
    return view.run.tokens[i] if 0 <= i < len(view.run.tokens) else None


# --- export / import ---------------------------------------------------------------------------------------

def export_conversation(model: str, system: str, messages: Sequence[Any], settings: Mapping[str, Any]) -> str:
    plain, _ = history_messages(messages)
    return json.dumps({"qdemo_conversation": EXPORT_VERSION, "model": model, "system": system,
                       "settings": dict(settings), "messages": plain}, ensure_ascii=False, indent=2)


@dataclass(frozen=True)
class Imported:
    model: str | None
    system: str
    messages: list[dict[str, str]]
    settings: dict[str, Any] = field(default_factory=dict)


def import_conversation(text: str) -> Imported:
    """Parse an exported conversation; ValueError says what is wrong with the file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON file: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("not a qdemo conversation: expected an object with a 'messages' list")
    messages = data["messages"]
    if any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        raise ValueError("put the system prompt in the 'system' field, not in 'messages'")
    if messages:
        # A saved chat may end with the assistant's answer; check it as if a user turn followed.
        validate_messages(list(messages) + ([{"role": "user", "content": ""}]
                                            if messages[-1].get("role") == "assistant" else []))
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError("'settings' must be an object of sampling fields")
    system = data.get("system") or ""
    if not isinstance(system, str):
        raise ValueError("'system' must be text")
    model = data.get("model")
    return Imported(model=model if isinstance(model, str) else None, system=system,
                    messages=[{"role": m["role"], "content": m["content"]} for m in messages], settings=settings)
