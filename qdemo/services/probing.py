"""The Inspect views on a chat's last answer or a pasted text: logit lens, prompt attribution, scoring,
divergence between two models. No Gradio: the tab and the named endpoints call these.

Every model runs through admission and its backend's gated path. Long inputs are cut with a notice (the newest
tokens kept), never run to a hang. Every view runs under a chat answer's rule (`view_clock`): the time limit
(`limits.max_generation_seconds`, from when the model is admitted) and the caller's `stop` event (the Inspect tab's
Stop; a named endpoint's caller that went away); a view cut short shows what it finished and says so in its notice,
or, with nothing to show, is refused saying so.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from qdemo.core.emit import Deadline
from qdemo.core.runs import RunRecord, run_from_json
from qdemo.errors import Cut, Interrupted
from qdemo.forwards.choice import split_ref
from qdemo.models.prompting import with_system
from qdemo.models.registry import GgufPartsSource, HubSource, LocalSource
from qdemo.probes.attribution import Attribution, Unit, token_units, turn_units
from qdemo.probes.decided import token_decisions
from qdemo.probes.lens import LensGrid
from qdemo.probes.scoring import Divergence, TextScore
from qdemo.services.admission import ModelRequest, ProgressFn, Refused, Services
from qdemo.services.chat import AnswerView, history_messages
from qdemo.services.kept_states import client_state
from qdemo.serving.limits import clean_text
from qdemo.serving.protocol import same_tokenizer
from qdemo.views.bundle import bundle_html, bundle_meta, read_bundle
from qdemo.views.decided import answer_summary

MAX_TOKENS = 1024  # tokens a lens, attribution or scoring request reads (older ones are cut with a notice)
MAX_LENS_COLUMNS = 64  # answer tokens in one lens grid
MAX_TOKEN_UNITS = 128  # per-token occlusion over the newest this many tokens
METHODS = ("gradient×input", "occlusion")


@dataclass(frozen=True)
class Subject:
    """The token sequence a view reads: a chat's prompt and answer, or a pasted text."""

    model: str  # the model reference it belongs to ("" for pasted text: the view's model picker says)
    ids: tuple[int, ...]
    answer_from: int  # where the answer starts (len(ids): no answer, the whole text is context)
    messages: tuple[dict[str, str], ...] = ()
    source: str = "the chat's last answer"

    answer_text: str = ""  # an API subject: tokenized by the model that reads it (ids empty until then)

    @property
    def answer_ids(self) -> tuple[int, ...]:
        return self.ids[self.answer_from:]

    def resolved(self, backend: Any) -> "Subject":
        """With ids: an API subject's prompt in the model's chat format and its answer as plain text."""
        if self.ids:
            return self
        messages = with_system(self.messages, backend.spec.system_prompt)
        prompt = backend.chat_prompt(messages, max_new_tokens=1).ids
        answer = backend.raw_text_ids(self.answer_text)
        return Subject(model=self.model, ids=tuple(prompt) + tuple(answer), answer_from=len(prompt),
                       messages=tuple(messages) + ({"role": "assistant", "content": self.answer_text},),
                       source=self.source)


def history_subject(model: str, history: Any, system: str | None = None) -> Subject:
    """An API caller's conversation ([{role, content}] ending with the assistant's answer) as a subject."""
    if not isinstance(history, list):
        raise Refused(f"history must be a list of {{role, content}} messages, got {type(history).__name__}")
    try:
        messages, _ = history_messages(history, system)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise Refused("history must end with the assistant answer to inspect")
    return Subject(model=model, ids=(), answer_from=0, messages=tuple(messages[:-1]),
                   answer_text=messages[-1]["content"], source="the given conversation")


NO_ANSWER = "No answer to inspect yet: send a message in Chat first (or paste a text)."


def chat_subject(view: AnswerView | None) -> Subject:
    if view is None or not view.run.tokens:
        raise Refused(NO_ANSWER)
    prompt = [p[0] for p in view.prompt]
    answer = [t.token_id for t in view.run.tokens]  # a RunRecord holds one row's tokens
    return Subject(model=view.model or view.run.model, ids=tuple(prompt + answer), answer_from=len(prompt),
                   messages=tuple(view.messages))


@dataclass(frozen=True)
class Conversation:
    """What the Chat tab shows, which a page reload keeps: the chatbot's messages, its model and system prompt, the
    session's runs (after a reload, the browser's compact copies), and the last answer's view (gone after a
    reload)."""

    view: AnswerView | None
    history: Sequence[Any] = ()
    model: str = ""
    system: str | None = None
    runs: Sequence[RunRecord] = ()

    def answer(self) -> tuple[list[dict[str, str]], str]:
        """(the messages before the last answer, that answer's text); Refused when the chat ends with none."""
        messages, _ = history_messages(list(self.history or []), self.system)
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise Refused(NO_ANSWER)
        return messages[:-1], messages[-1]["content"]

    def saved_run(self) -> RunRecord | None:
        """The chat run whose answer the chat ends with (newest first), with its prompt and answer ids."""
        _, text = self.answer()
        for run in reversed(list(self.runs or [])):
            if (run.label == "chat" and run.done is not None and run.prefill is not None and run.tokens
                    and clean_text(run.done.text).strip() == text.strip()):
                return run
        return None


def conversation_subject(conversation: Conversation) -> Subject:
    """The Inspect views' subject: the last answer's view while the page has it; after a reload, the restored chat's
    last answer — token for token from its saved run when the browser kept it, else its text, tokenized by the model
    that reads it."""
    if conversation.view is not None:
        return chat_subject(conversation.view)
    messages, text = conversation.answer()
    run = conversation.saved_run()
    if run is None:
        return Subject(model=conversation.model, ids=(), answer_from=0, messages=tuple(messages), answer_text=text,
                       source="the restored conversation's last answer")
    prompt = list(run.prefill.prompt_ids)
    return Subject(model=run.model, ids=tuple(prompt + [t.token_id for t in run.tokens]), answer_from=len(prompt),
                   messages=tuple(messages), source="the restored conversation's last answer")


def _cut(ids: Sequence[int], limit: int = MAX_TOKENS) -> tuple[list[int], int, str]:
    ids = list(ids)
    if len(ids) <= limit:
        return ids, 0, ""
    dropped = len(ids) - limit
    return ids[dropped:], dropped, (f"the text has {len(ids)} tokens: the first {dropped} were left out, the "
                                    f"newest {limit} are read")


def view_clock(services: Services, stop: threading.Event | None) -> Deadline:
    """The clock a view runs under, from now: the caller's Stop and the time limit a chat answer has. Its `reason`
    is the `should_stop` every probe reads between chunks, units or layers."""
    return Deadline(time.perf_counter(), services.limits.max_generation_seconds, stop)


def cut_notice(cut: Cut | None, clock: Deadline, shown: str) -> str:
    """"cut at this server's time limit (180 s) after 3 of 8 units: the view shows those" ("" when not cut)."""
    return f"{cut.words(clock.limit_s)}: {shown}" if cut is not None else ""


def _joined(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _refusal(exc: ValueError, clock: Deadline) -> Refused:
    """A probe's ValueError as the user's message; a view cut before it had anything names the time limit."""
    return Refused(exc.words(clock.limit_s) if isinstance(exc, Interrupted) else str(exc))


# --- logit lens -------------------------------------------------------------------------------------------

@dataclass
class LensResult:
    grid: LensGrid
    texts: dict[int, str]  # every id in the grid, decoded
    columns: list[str]  # the token each column predicts (its text)
    commitment: list[str]  # per column: the first layer where the token that followed is top-1 ("" never)
    notice: str
    forward: str
    seconds: float


def lens_view(services: Services, client: str | None, subject: Subject, model: str | None = None,
              sublayers: bool = False, progress: ProgressFn | None = None, *, stop: threading.Event | None = None
              ) -> LensResult:
    """The lens over the answer's tokens (the first MAX_LENS_COLUMNS), or over a pasted text's last tokens."""
    with services.admit(client, ModelRequest(model or subject.model, sampling=False, weights=True),
                        progress=progress) as admitted:
        clock = view_clock(services, stop)
        backend = admitted.backend
        subject = subject.resolved(backend)
        # Nothing after the last column is read: cut to it first, so the context kept is the newest before it.
        needed = subject.ids[:subject.answer_from + MAX_LENS_COLUMNS] if subject.answer_ids else subject.ids
        ids, dropped, notice = _cut(needed)
        if len(subject.answer_ids) > MAX_LENS_COLUMNS:
            notice = _joined(notice, f"the grid shows the first {MAX_LENS_COLUMNS} of {len(subject.answer_ids)} "
                                     "answer tokens")
        answer_from = max(0, subject.answer_from - dropped)
        if answer_from < len(ids):
            positions = list(range(max(answer_from - 1, 0), len(ids) - 1))
        else:
            positions = list(range(len(ids)))
        if len(positions) > MAX_LENS_COLUMNS:
            notes = f"the grid shows the first {MAX_LENS_COLUMNS} of {len(positions)} tokens"
            positions = positions[:MAX_LENS_COLUMNS] if answer_from < len(ids) else positions[-MAX_LENS_COLUMNS:]
            notice = _joined(notice, notes)
        began = time.perf_counter()
        try:
            with client_state(services.states, client, backend) as state:
                grid = backend.logit_lens(ids, positions, sublayers=sublayers, should_stop=clock.reason, state=state)
        except ValueError as exc:
            raise _refusal(exc, clock) from None
        seconds = time.perf_counter() - began
        notice = _joined(notice, cut_notice(grid.cut, clock, "the grid shows the columns before it"))
        texts = backend.token_texts(list(grid.top_ids.ravel()) + [t for t in grid.targets if t >= 0] + ids)
        forward = backend.forward_label
    columns = [texts.get(t, "(end)") if t >= 0 else "(end)" for t in grid.targets]
    commitment = [grid.rows[c] if (c := grid.commitment(i)) is not None else "" for i in range(len(grid.positions))]
    return LensResult(grid=grid, texts=texts, columns=columns, commitment=commitment, notice=notice,
                      forward=forward, seconds=seconds)


# --- attribution ------------------------------------------------------------------------------------------

@dataclass
class AttributionResult:
    attribution: Attribution
    pieces: list[str]  # each context token's share of the text
    per_turn: list[tuple[Unit, float | None]]  # score per turn (gradient×input summed; occlusion as measured)
    token_scores: list[float | None]  # per context token (occlusion per turn: its unit's score)
    target_text: str
    notice: str
    seconds: float


def attribution_view(services: Services, client: str | None, subject: Subject, token: int, method: str,
                     per_token: bool = False, model: str | None = None, progress: ProgressFn | None = None, *,
                     stop: threading.Event | None = None) -> AttributionResult:
    """How much each earlier token (and each turn) drove answer token `token` (0-based in the answer)."""
    if method not in METHODS:
        raise Refused(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    with services.admit(client, ModelRequest(model or subject.model, sampling=False, weights=True),
                        progress=progress) as admitted:
        clock = view_clock(services, stop)
        backend = admitted.backend
        subject = subject.resolved(backend)
        answer = subject.answer_ids
        if not answer:
            raise Refused("attribution explains a generated token: inspect a chat answer, not a pasted text")
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < len(answer):
            raise Refused(f"token must be an answer position in 0..{len(answer) - 1}, got {token!r}")
        at = subject.answer_from + token
        context, dropped, notice = _cut(subject.ids[:at])
        answer_from = max(0, subject.answer_from - dropped)
        pieces = backend.token_pieces(context)
        # the chat's prompt has the model's default system prompt though the turn may carry none: without it a
        # short user message would be found inside the system text
        messages = with_system(subject.messages, backend.spec.system_prompt)
        units = turn_units(pieces, messages, answer_from if answer_from < len(context) else None)
        began = time.perf_counter()
        try:
            if method == "gradient×input":
                result = backend.gradient_x_input(context, subject.ids[at], should_stop=clock.reason)
            else:
                if per_token:
                    first = max(0, len(context) - MAX_TOKEN_UNITS)
                    if first:
                        notice = _joined(notice, f"per-token occlusion covers the newest {MAX_TOKEN_UNITS} tokens")
                    chosen = token_units(pieces, range(first, len(context)))
                else:
                    chosen = units
                result = backend.occlusion(context, subject.ids[at], chosen, should_stop=clock.reason)
        except ValueError as exc:
            raise _refusal(exc, clock) from None
        seconds = time.perf_counter() - began
        notice = _joined(notice, cut_notice(result.cut, clock, "the units not reached have no score"))
        target_text = backend.token_texts([subject.ids[at]])[subject.ids[at]]
    if result.method == "gradient×input":
        per_turn: list[tuple[Unit, float | None]] = list(result.per_unit(units))
        token_scores: list[float | None] = list(result.scores)
    else:
        per_turn = list(zip(result.units, result.scores)) if not per_token else []
        token_scores = [None] * len(context)
        for unit, score in zip(result.units, result.scores):
            for i in unit.indices:
                token_scores[i] = score
    return AttributionResult(attribution=result, pieces=pieces, per_turn=per_turn, token_scores=token_scores,
                             target_text=target_text, notice=notice, seconds=seconds)


# --- scoring and divergence -------------------------------------------------------------------------------

@dataclass
class ScoreResult:
    score: TextScore
    texts: dict[int, str]
    notice: str
    seconds: float
    pieces: list[str] = field(default_factory=list)  # each scored token's share of the text (see scored_pieces)


def scored_pieces(backend: Any, ids: Sequence[int], first: int, count: int) -> list[str]:
    """Each scored token's share of the text: a character split across tokens shows once, at the token that
    completes it (the others get ""), never as "\ufffd" per token. The tokens before `first` are decoded as
    context, so a character split across the boundary still reads whole."""
    return backend.token_pieces(list(ids[:first + count]))[first:]


def _text_ids(backend: Any, text: str, question: str, template: bool) -> tuple[list[int], int]:
    """(ids, first scored position): the text alone, or as the assistant's answer to `question` in the chat
    template (then only the answer's tokens are scored)."""
    if not template:
        ids = backend.raw_text_ids(text)
        return ids, 1
    prompt = backend.chat_prompt([{"role": "user", "content": question or "Go on."}], max_new_tokens=1).ids
    return list(prompt) + backend.raw_text_ids(text), max(1, len(prompt))


def _checked_text(text: Any, what: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise Refused(f"{what} is empty: paste a text to score (or reuse the chat's answer)")
    return text


def score_view(services: Services, client: str | None, model: str, text: str, question: str = "",
               template: bool = False, progress: ProgressFn | None = None, subject: Subject | None = None, *,
               stop: threading.Event | None = None) -> ScoreResult:
    """Score a pasted text, or (given `subject`) the chat's answer exactly as its tokens were generated."""
    if subject is None:
        text = _checked_text(text)
    with services.admit(client, ModelRequest(model, sampling=False), progress=progress) as admitted:
        clock = view_clock(services, stop)
        backend = admitted.backend
        services.need_logits(backend, "scoring a text")
        if subject is not None:
            subject = subject.resolved(backend)
            ids, first = list(subject.ids), max(1, subject.answer_from)
        else:
            ids, first = _text_ids(backend, text, question, template)
        ids, dropped, notice = _cut(ids)
        first = max(1, first - dropped)
        if len(ids) < 2:
            raise Refused(f"model {backend.name}: the text is one token; scoring needs at least two")
        began = time.perf_counter()
        try:
            with client_state(services.states, client, backend) as state:
                score = backend.score(ids, first, should_stop=clock.reason, state=state)
        except ValueError as exc:
            raise _refusal(exc, clock) from None
        seconds = time.perf_counter() - began
        notice = _joined(notice, cut_notice(score.cut, clock, "the tokens before it are scored"))
        texts = backend.token_texts(list(score.ids) + list(score.top1_ids))
        pieces = scored_pieces(backend, score.ids, score.first, score.count)
    return ScoreResult(score=score, texts=texts, notice=notice, seconds=seconds, pieces=pieces)


@dataclass
class DivergenceResult:
    divergence: Divergence
    texts: dict[int, str]
    notice: str
    seconds: float
    pieces: list[str] = field(default_factory=list)  # each compared token's share of the text


def divergence_view(services: Services, client: str | None, model_a: str, model_b: str, text: str,
                    question: str = "", template: bool = False, progress: ProgressFn | None = None, *,
                    stop: threading.Event | None = None) -> DivergenceResult:
    text = _checked_text(text)
    if not model_a or not model_b:
        raise Refused("pick two models to compare on the text")
    requests = [ModelRequest(model_a, sampling=False), ModelRequest(model_b, sampling=False)]
    with services.admit(client, *requests, progress=progress) as admitted:
        clock = view_clock(services, stop)
        a, b = admitted.backends
        for backend in (a, b):
            services.need_logits(backend, "a divergence")
        if not same_tokenizer(a, b):
            raise Refused(f"{a.name} and {b.name} have different tokenizers: the same text is different tokens "
                          "for them, so their distributions cannot be compared token by token")
        ids, first = _text_ids(a, text, question, template)
        ids, dropped, notice = _cut(ids)
        first = max(1, first - dropped)
        if len(ids) < 2:
            raise Refused("the text is one token; a divergence needs at least two")
        began = time.perf_counter()
        try:
            result = a.divergence(b, ids, first, should_stop=clock.reason)
        except ValueError as exc:
            raise _refusal(exc, clock) from None
        seconds = time.perf_counter() - began
        notice = _joined(notice, cut_notice(result.cut, clock, "the tokens before it are compared"))
        texts = a.token_texts(list(result.ids) + list(result.top1_a) + list(result.top1_b))
        pieces = scored_pieces(a, result.ids, result.first, result.count)
    return DivergenceResult(divergence=result, texts=texts, notice=notice, seconds=seconds, pieces=pieces)


# --- evidence bundles -------------------------------------------------------------------------------------

def weights_fingerprint(services: Services, model: str) -> str:
    """What identifies the weights without a path: a GGUF's sha256, a hub repository at its revision, or a hash
    of a local checkpoint's file names and sizes."""
    name = split_ref(model)[0]
    spec = services.registry.models.get(name)
    if spec is None:
        return f"unknown model {name}"
    source = spec.source
    if isinstance(source, GgufPartsSource):
        return f"GGUF {source.file_name} sha256 {source.sha256}"
    if isinstance(source, HubSource):
        return f"hub {source.repo_id}@{source.revision}"
    if isinstance(source, LocalSource) and source.path.is_dir():
        digest = hashlib.sha256()
        for path in sorted(p for p in source.path.iterdir() if p.is_file()):
            digest.update(f"{path.name}\t{path.stat().st_size}\n".encode())
        return f"local checkpoint {digest.hexdigest()[:16]} (file names and sizes)"
    return f"{type(source).__name__} of {name}"


def run_bundle(services: Services, client: str | None, run: Any) -> str:
    """A caller's evidence bundle: one offline HTML page of a run's JSON (as /decisions returns it) or of a bundle,
    its listed tokens decoded by the model it ran on."""
    if not isinstance(run, str) or not run.strip():
        raise Refused("run must be a run's JSON text (the 'run' field of /decisions)")
    record = run_from_json(run) if run.lstrip().startswith("{") else read_bundle(run)
    fingerprint = weights_fingerprint(services, record.model)
    with services.admit(client, ModelRequest(record.model, sampling=False)) as admitted:
        labels = admitted.backend.token_texts(listed_ids(record))
    return bundle_html(record, fingerprint, labels)


@dataclass(frozen=True)
class AnswerBundle:
    page: str  # the bundle's HTML
    run: RunRecord
    fingerprint: str
    restored: bool  # made from the browser's compact copy of the run (no per-stage probabilities)


def answer_bundle(services: Services, client: str | None, conversation: Conversation) -> AnswerBundle:
    """The evidence bundle of the chat's last answer: from its view while the page has it, else (after a reload)
    from the run the browser kept, its tokens decoded by the model it ran on."""
    view = conversation.view
    if view is not None:
        services.check_rate(client)
        fingerprint = weights_fingerprint(services, view.run.model)
        page = bundle_html(view.run, fingerprint, view.labels, prompt="".join(piece[1] for piece in view.prompt))
        return AnswerBundle(page=page, run=view.run, fingerprint=fingerprint, restored=False)
    run = conversation.saved_run()
    if run is None:
        raise Refused("The chat's last answer has no run kept in this browser (an imported conversation, or runs "
                      "older than the last 30): send a message to make an answer to bundle.")
    fingerprint = weights_fingerprint(services, run.model)
    prompt = list(run.prefill.prompt_ids)
    with services.admit(client, ModelRequest(run.model, sampling=False)) as admitted:
        labels = admitted.backend.token_texts(listed_ids(run) + prompt)
    page = bundle_html(run, fingerprint, labels, prompt="".join(labels[i] for i in prompt))
    return AnswerBundle(page=page, run=run, fingerprint=fingerprint, restored=True)


def bundle_meta_or_empty(raw: bytes) -> dict[str, Any]:
    """A bundle's provenance, or {} for a plain run JSON."""
    try:
        return bundle_meta(raw)
    except ValueError:
        return {}


def decision_rows(run: Any) -> list[dict[str, Any]]:
    """One row per answer token: what each stage decided there."""
    rows = []
    for d, event in zip(token_decisions(run.tokens), run.tokens):
        rows.append({"index": d.index, "token_id": d.token_id, "text": event.text, "raw_top": d.raw_top,
                     "changed_by": ",".join(d.changed_by), "argmax_removed_by": d.argmax_removed_by or "",
                     **{f"removed_{name}": mass for name, mass in d.removed},
                     "not_argmax": d.not_argmax, "below_final_top": d.below_final_top})
    return rows


def listed_ids(run: Any) -> list[int]:
    """Every token id a run's view names: the chosen ones and each stage's listed alternatives."""
    ids = {t.token_id for t in run.tokens}
    for t in run.tokens:
        for stage in t.stages:
            ids.update(stage.token_ids)
    return sorted(ids)


def run_summary(run: Any) -> str:
    lines = answer_summary(token_decisions(run.tokens))
    return "Which stage decided: " + "; ".join(lines) + "." if lines else ""
