"""Chat: a session's turns, their streams and everything the Chat tab shows about the last answer.

No Gradio here. A turn is two steps, so the user sees their message at once and Stop is honoured from the
moment they press Send: `begin_turn` (instant: checks the text, puts it in the chat, arms the session's stop
event) and `answer` (queued: admission, load, stream). `ChatSession.interrupt` (Clear, Undo, Import) stops the
answer and makes sure nothing it still yields lands in the cleared chat.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from qdemo.core.events import Event, TokenEvent
from qdemo.core.runs import RunRecord
from qdemo.models.prompting import keep_last_turns, validate_messages
from qdemo.models.sources import ProgressFn, readiness
from qdemo.probes.decided import TokenDecision, token_decisions
from qdemo.sampling import SamplingParams
from qdemo.services.admission import ModelRequest, Refused, Services
from qdemo.serving.limits import Limits, clean_text, cut_text
from qdemo.serving.local import drafting_pays
from qdemo.serving.protocol import Backend, same_tokenizer
from qdemo.views.answer import (
    END_MARK,
    STOPPED_BEFORE_START,
    end_note,
    metrics_line,
    stopped_before_start,
)
from qdemo.views.decided import answer_summary

EXPORT_VERSION = 1
ROLES = ("user", "assistant")
_END_NOTE = re.compile(f"(?:\n\n)?{END_MARK}.*\\Z", re.S)  # the note views.answer adds; never sent to the model


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
    copy starts fresh (an Event cannot be deep-copied)."""

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex  # names this session's kept decode state in the pool
        self.stop = threading.Event()
        self.epoch = 0
        self.latest = 0  # the newest turn ticket
        self.pending: int | None = None  # armed by begin_turn, not yet taken by answer()
        self.running: int | None = None  # the answer being written
        self.view: AnswerView | None = None
        self.branches: Any = None  # qdemo.services.branches.BranchTree of the last answer, once branched

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

    def arm(self) -> int:
        """A new answer: a fresh stop event (a late Stop never leaks into it); returns its ticket."""
        self.stop = threading.Event()
        self.latest += 1
        self.pending = self.latest
        return self.latest

    def take(self, ticket: int | None) -> bool:
        """answer() starts the turn `ticket` armed (False: not armed, or a newer turn replaced it)."""
        if ticket is None or self.pending != ticket:
            return False
        self.pending, self.running = None, ticket
        return True

    def finish(self, ticket: int) -> None:
        if self.running == ticket:
            self.running = None

    def interrupt(self) -> None:
        """Stop whatever runs and make its remaining output stale (its decode state is not kept either)."""
        self.stop.set()
        self.pending = self.running = None
        self.epoch += 1
        self.view = None
        self.branches = None

    def current(self, epoch: int, ticket: int | None = None) -> bool:
        """The answer started at `epoch` for `ticket` may still write to the chat."""
        return epoch == self.epoch and (ticket is None or ticket == self.latest)


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
        messages.append({"role": m["role"], "content": message_text(m, f"history message {i}")})
    notices = ([f"{skipped} message(s) that are neither the user's nor the assistant's were left out."] if skipped
               else [])
    return messages, notices


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


def begin_turn(session: ChatSession, message: Any, history: Sequence[Any] | None, limits: Limits) -> Begun:
    """Step 1 of Send: the cleaned (and maybe cut) message goes into the chat at once; the answer is armed."""
    text = clean_text(message) if isinstance(message, str) else ""
    if not text.strip():
        return Begun(list(history or []), "Empty message ignored: type something first.", False)
    busy = session.busy()
    if busy:
        return Begun(list(history or []), busy, False)
    text, cut = cut_text(text, limits.max_input_chars)
    ticket = session.arm()
    return Begun(list(history or []) + [{"role": "user", "content": text}], cut, True, ticket)


def begin_regenerate(session: ChatSession, history: Sequence[Any] | None) -> Begun:
    """Step 1 of Regenerate: the last answer goes; its question stays, waiting for a new answer."""
    kept = without_answer(history)
    if not kept:
        return Begun(list(history or []), "Nothing to regenerate yet: send a message first.", False)
    busy = session.busy()
    if busy:
        return Begun(list(history or []), busy, False)
    ticket = session.arm()
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
    chat = list(history or [])
    try:
        turn = _fit(*history_messages(chat, system), services.limits)
    except ValueError as exc:
        yield ChatUpdate(chat=chat, metrics=metrics_line(None), notice=f"⚠️ {exc}", done=True)
        return
    draft = _draft_for(services, model, params, assisted)
    requests = [ModelRequest(model, params)] + ([ModelRequest(draft, sampling=False)] if draft else [])
    try:
        with services.admit(client, *requests, progress=progress) as admitted:
            if not session.current(epoch, ticket):
                return
            if stop.is_set():  # Stop came while the request queued or the model loaded
                yield ChatUpdate(chat=chat + [stopped_before_start()], metrics=STOPPED_BEFORE_START,
                                 done=True)
                return
            backend, params = admitted.backend, admitted.params[0]
            notice = " ".join(n for n in (turn.notice, admitted.notice) if n)
            drafter = admitted.backends[1] if draft else None
            # The session's decode state from its last turn: only what is new gets prefilled. Beam search and
            # speculative decoding keep none.
            state = None if drafter or params.beam_search else (
                services.states.take(session.key, backend.key) or backend.new_state())
            if drafter:
                events = functools.partial(assisted_events, services, backend, drafter, turn.messages, params, stop)
            else:
                events = functools.partial(chat_events, services, backend, turn.messages, params, stop, state=state)
            try:
                yield from _stream(backend, session, (epoch, ticket), chat, turn, params, run_id, notice, events,
                                   model or services.default_model)
            finally:
                if state is not None and session.current(epoch):
                    services.states.keep(session.key, state)
    except Refused as exc:
        if session.current(epoch, ticket):
            yield ChatUpdate(chat=chat, metrics=metrics_line(None), notice=f"⚠️ {exc}", done=True)


def api_turn(services: Services, client: str | None, message: Any, history: Any, model: Any, settings: Any,
             system: Any, top_n: int = 0, stop: threading.Event | None = None, notices: list[str] | None = None
             ) -> Iterator[RunRecord]:
    """One stateless turn for a named endpoint, through the page answer's own steps: the turn fitted (`_fit`), the
    same admission, `chat_events` (prompt limit, time limit) and run record. Yields the run after each event, the
    last one finished; a bad field or a failed answer is a Refused saying what. `stop` (the caller left) ends the
    answer within a prefill chunk or a step, as the page's Stop does. `notices` collects what the page's notice line
    would say about the request: turns left out, max new tokens lowered, old messages dropped to fit the prompt."""
    turn = _api_turn_messages(message, history, system, services.limits)
    notes = notices if notices is not None else []
    with services.admit(client, ModelRequest(model, settings)) as admitted:
        backend, params = admitted.backend, admitted.params[0]
        notes.extend(n for n in (turn.notice, admitted.notice) if n)
        run = run_record(backend, params, 0, "api")
        events = chat_events(services, backend, turn.messages, params, stop, top_n=top_n)
        try:
            for event in events:
                run.add(event)
                yield run
        finally:
            events.close()  # a caller that goes away stops the generation
    if run.prefill is not None and run.prefill.dropped_turns:
        notes.append(f"{len(run.prefill.dropped_turns)} older message(s) were left out to fit this server's prompt "
                     "limit.")
    if run.done and run.done.error:
        raise Refused(run.done.error)


def api_answer(services: Services, client: str | None, message: Any, history: Any, model: Any, settings: Any,
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
    run = run_record(backend, params, run_id, "chat")
    shown = chat + [{"role": "assistant", "content": ""}]
    if params.beam_search:
        notice = (notice + " " if notice else "") + ("Beam search shows its best beam so far; it can change until "
                                                     "the search ends.")
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
                yield ChatUpdate(chat=shown, metrics=metrics_line(run), notice=notice, run=run)
                shown_at = time.perf_counter()
    except (Refused, ValueError) as exc:  # prompt too long and friends: the user can act on these
        yield ChatUpdate(chat=chat, metrics=metrics_line(None), notice=f"⚠️ {exc}", done=True)
        return
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    if not session.current(*turn_id):
        return
    shown[-1] = {"role": "assistant", "content": answer_text(run) + end_note(run)}
    view = dataclasses.replace(answer_view(backend, run, turn.messages), model=model_ref)
    session.view, session.branches = view, None
    yield ChatUpdate(chat=shown, metrics=metrics_line(run), notice=notice, view=view, run=run, done=True)


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
