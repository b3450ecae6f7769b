"""The Inspect views on a chat's last answer or a pasted text: logit lens, prompt attribution, scoring,
divergence between two models. No Gradio: the tab and the named endpoints call these.

Every model runs through admission and its backend's gated path. Long inputs are cut with a notice (the newest
tokens kept), never run to a hang.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Sequence

from qdemo.core.runs import run_from_json
from qdemo.forwards.choice import split_ref
from qdemo.models.prompting import with_system
from qdemo.models.registry import GgufPartsSource, HubSource, LocalSource
from qdemo.probes.attribution import Attribution, Unit, token_units, turn_units
from qdemo.probes.decided import token_decisions
from qdemo.probes.lens import LensGrid
from qdemo.probes.scoring import Divergence, TextScore
from qdemo.services.admission import ModelRequest, ProgressFn, Refused, Services
from qdemo.services.chat import AnswerView, history_messages
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
                       source="the given conversation")


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


def chat_subject(view: AnswerView | None) -> Subject:
    if view is None or not view.run.tokens:
        raise Refused("No answer to inspect yet: send a message in Chat first (or paste a text).")
    prompt = [p[0] for p in view.prompt]
    answer = [t.token_id for t in view.run.tokens]  # a RunRecord holds one row's tokens
    return Subject(model=view.model or view.run.model, ids=tuple(prompt + answer), answer_from=len(prompt),
                   messages=tuple(view.messages))


def _cut(ids: Sequence[int], limit: int = MAX_TOKENS) -> tuple[list[int], int, str]:
    ids = list(ids)
    if len(ids) <= limit:
        return ids, 0, ""
    dropped = len(ids) - limit
    return ids[dropped:], dropped, (f"the text has {len(ids)} tokens: the first {dropped} were left out, the "
                                    f"newest {limit} are read")


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
              sublayers: bool = False, progress: ProgressFn | None = None) -> LensResult:
    """The lens over the answer's tokens (the first MAX_LENS_COLUMNS), or over a pasted text's last tokens."""
    with services.admit(client, ModelRequest(model or subject.model, sampling=False, weights=True),
                        progress=progress) as admitted:
        backend = admitted.backend
        subject = subject.resolved(backend)
        # Nothing after the last column is read: cut to it first, so the context kept is the newest before it.
        needed = subject.ids[:subject.answer_from + MAX_LENS_COLUMNS] if subject.answer_ids else subject.ids
        ids, dropped, notice = _cut(needed)
        if len(subject.answer_ids) > MAX_LENS_COLUMNS:
            notice = "; ".join(n for n in (notice, f"the grid shows the first {MAX_LENS_COLUMNS} of "
                                                   f"{len(subject.answer_ids)} answer tokens") if n)
        answer_from = max(0, subject.answer_from - dropped)
        if answer_from < len(ids):
            positions = list(range(max(answer_from - 1, 0), len(ids) - 1))
        else:
            positions = list(range(len(ids)))
        if len(positions) > MAX_LENS_COLUMNS:
            notes = f"the grid shows the first {MAX_LENS_COLUMNS} of {len(positions)} tokens"
            positions = positions[:MAX_LENS_COLUMNS] if answer_from < len(ids) else positions[-MAX_LENS_COLUMNS:]
            notice = "; ".join(n for n in (notice, notes) if n)
        began = time.perf_counter()
        try:
            grid = backend.logit_lens(ids, positions, sublayers=sublayers)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        seconds = time.perf_counter() - began
        texts = backend.token_texts(list(grid.top_ids.ravel()) + [t for t in grid.targets if t >= 0] + ids)
        forward = backend.forward_label
    columns = [texts.get(t, "(end)") if t >= 0 else "(end)" for t in grid.targets]
    commitment = [grid.rows[c] if (c := grid.commitment(i)) is not None else "" for i in range(len(positions))]
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
                     per_token: bool = False, model: str | None = None, progress: ProgressFn | None = None
                     ) -> AttributionResult:
    """How much each earlier token (and each turn) drove answer token `token` (0-based in the answer)."""
    if method not in METHODS:
        raise Refused(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    with services.admit(client, ModelRequest(model or subject.model, sampling=False, weights=True),
                        progress=progress) as admitted:
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
                result = backend.gradient_x_input(context, subject.ids[at])
            else:
                if per_token:
                    first = max(0, len(context) - MAX_TOKEN_UNITS)
                    if first:
                        notice = "; ".join(n for n in (notice, f"per-token occlusion covers the newest "
                                                       f"{MAX_TOKEN_UNITS} tokens") if n)
                    chosen = token_units(pieces, range(first, len(context)))
                else:
                    chosen = units
                result = backend.occlusion(context, subject.ids[at], chosen)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        seconds = time.perf_counter() - began
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
               template: bool = False, progress: ProgressFn | None = None, subject: Subject | None = None
               ) -> ScoreResult:
    """Score a pasted text, or (given `subject`) the chat's answer exactly as its tokens were generated."""
    if subject is None:
        text = _checked_text(text)
    with services.admit(client, ModelRequest(model, sampling=False), progress=progress) as admitted:
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
            score = backend.score(ids, first)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        seconds = time.perf_counter() - began
        texts = backend.token_texts(list(score.ids) + list(score.top1_ids))
    return ScoreResult(score=score, texts=texts, notice=notice, seconds=seconds)


@dataclass
class DivergenceResult:
    divergence: Divergence
    texts: dict[int, str]
    notice: str
    seconds: float


def divergence_view(services: Services, client: str | None, model_a: str, model_b: str, text: str,
                    question: str = "", template: bool = False, progress: ProgressFn | None = None
                    ) -> DivergenceResult:
    text = _checked_text(text)
    if not model_a or not model_b:
        raise Refused("pick two models to compare on the text")
    requests = [ModelRequest(model_a, sampling=False), ModelRequest(model_b, sampling=False)]
    with services.admit(client, *requests, progress=progress) as admitted:
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
            result = a.divergence(b, ids, first)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        seconds = time.perf_counter() - began
        texts = a.token_texts(list(result.ids) + list(result.top1_a) + list(result.top1_b))
    return DivergenceResult(divergence=result, texts=texts, notice=notice, seconds=seconds)


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
