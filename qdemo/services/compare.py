"""Compare: two generations from one prompt and seed, stepped in turn so both stream at once, and what tells
them apart: the first diverging token and each side's probability of the other's token there. No Gradio here.

The cross-probabilities are computed while both models are still leased, through their gated backends.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from qdemo.core.decode import DecodeState
from qdemo.core.runs import RunRecord
from qdemo.models.sources import ProgressFn
from qdemo.probes.stages import stage_distributions
from qdemo.sampling import SamplingParams
from qdemo.services.admission import ModelRequest, Refused, Services
from qdemo.services.chat import UI_INTERVAL_S, answer_text, chat_events, prepare_turn, run_record
from qdemo.services.history import client_owner, keep_run
from qdemo.services.kept_states import client_state
from qdemo.serving.limits import Client
from qdemo.serving.protocol import Backend, same_tokenizer
from qdemo.views.compare import Divergence, first_divergence
from qdemo.views.labels import percent


class CompareSession:
    """The Compare tab's stop signal for one browser session (fresh per session, like ChatSession), or a named
    endpoint caller's own (`stop`: set when the caller goes; every run of the session keeps it)."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop if stop is not None else threading.Event()
        self._given = stop is not None

    def __deepcopy__(self, memo: dict) -> "CompareSession":
        return type(self)()

    def arm(self) -> threading.Event:
        if not self._given:
            self.stop = threading.Event()
        return self.stop


@dataclass(frozen=True)
class CrossProbability:
    """At the divergence step: the probability this side gave the OTHER side's token (raw and after its own
    sampling stages), or None when that cannot be said (different tokenizers, a side had ended)."""

    raw: float | None
    final: float | None


@dataclass
class CompareUpdate:
    a: RunRecord
    b: RunRecord
    status: str  # what is happening, or the verdict at the end
    report: dict | None = None
    done: bool = False


ROWS, ONE_AFTER_THE_OTHER, TAKING_TURNS = "rows", "one after the other", "taking turns"
SEQUENTIAL_NOTE = ("B follows A: on this model here, two rows in one batch have decoded slower than one row at a "
                   "time, so the sides run one after the other from one shared prefill.")


def pair_mode(backend_a: Backend, backend_b: Backend, params_a: SamplingParams, params_b: SamplingParams) -> str:
    """How the two sides run: one model whose batch pays decodes them as two rows of one batch; one model whose
    two-row steps cost more than two single steps (some CPU forwards) runs them one after the other from one
    prefill; two models (or beam search) take turns."""
    one_model = backend_a.key == backend_b.key and backend_a.capabilities.rows
    if not one_model or params_a.beam_search or params_b.beam_search:
        return TAKING_TURNS
    return ROWS if backend_a.batch_pays(2) else ONE_AFTER_THE_OTHER


def run_pair(backend_a: Backend, backend_b: Backend, messages: list[dict[str, str]],
             params_a: SamplingParams, params_b: SamplingParams, run_a: RunRecord, run_b: RunRecord,
             stop_event: threading.Event | None = None, top_n: int = 20, services: Services | None = None,
             states: Sequence[DecodeState | None] = (None, None), mode: str | None = None
             ) -> Iterator[tuple[RunRecord, RunRecord]]:
    """Both sides, yielding both records after every step, run as `mode` (default: `pair_mode`) says; each side's
    tokens equal its solo run. With `services`, each side runs under the server's prompt and time limits. `states`:
    kept decode states of each side's model (one model: the first serves both sides) that supply their common
    prefix with the prompt and hold the run afterwards. A prompt that does not fit raises here, before anything
    streams."""
    mode = mode or pair_mode(backend_a, backend_b, params_a, params_b)
    if mode == ROWS:
        limit = max(params_a.max_new_tokens, params_b.max_new_tokens)
        cap = services.limits.max_prompt_tokens if services is not None else None
        prompt = backend_a.chat_prompt(messages, limit, max_prompt_tokens=cap)
        stream = backend_a.generate_rows(prompt.ids, [params_a, params_b], stop_event=stop_event, top_n=top_n,
                                         dropped_turns=prompt.dropped_turns,
                                         time_limit_s=services.limits.max_generation_seconds if services else None,
                                         state=states[0])
        return _route(stream, [run_a, run_b])

    def side(backend: Backend, params: SamplingParams, state: DecodeState | None) -> Iterator:
        if services is not None:
            return chat_events(services, backend, messages, params, stop_event, top_n, state=state)
        return backend.generate(messages=messages, params=params, stop_event=stop_event, top_n=top_n, state=state)

    if mode == ONE_AFTER_THE_OTHER:
        if services is not None:  # the prompt limit is checked before anything streams, as for rows
            backend_a.chat_prompt(messages, max(params_a.max_new_tokens, params_b.max_new_tokens),
                                  max_prompt_tokens=services.limits.max_prompt_tokens)
        return _one_after_the_other(backend_a, side, (params_a, params_b), states[0], [run_a, run_b])
    streams = [side(backend, params, state)
               for backend, params, state in zip((backend_a, backend_b), (params_a, params_b), states)]
    return _alternate(streams, [run_a, run_b])


def _one_after_the_other(backend: Backend, side: Callable[..., Iterator], params: Sequence[SamplingParams],
                         kept: DecodeState | None, records: list[RunRecord]) -> Iterator[tuple[RunRecord, RunRecord]]:
    """Side A to its end, then side B from the same decode state: B feeds nothing (the state keeps the prompt and
    the logits after it)."""
    state = kept if kept is not None else backend.new_state()
    try:
        for record, p in zip(records, params):
            stream = side(backend, p, state)
            try:
                for event in stream:
                    record.add(event)
                    yield records[0], records[1]
            finally:
                stream.close()
    finally:
        if kept is None and state is not None:
            state.release()


def _route(stream: Iterator, records: list[RunRecord]) -> Iterator[tuple[RunRecord, RunRecord]]:
    """One batched stream, its events sent to their row's record."""
    try:
        for event in stream:
            records[event.row].add(event)
            yield records[0], records[1]
    finally:
        stream.close()


def _alternate(streams: list[Iterator], records: list[RunRecord]) -> Iterator[tuple[RunRecord, RunRecord]]:
    live = [0, 1]
    try:
        while live:
            for side in list(live):
                event = next(streams[side], None)
                if event is None:
                    live.remove(side)
                    continue
                records[side].add(event)
            yield records[0], records[1]
    finally:  # a client that went away: both engines drop their KV caches now
        for stream in streams:
            stream.close()


def divergence(run_a: RunRecord, run_b: RunRecord) -> Divergence:
    return first_divergence([t.token_id for t in run_a.tokens], [t.token_id for t in run_b.tokens])


def cross_probability(backend: Backend, run: RunRecord, params: SamplingParams, step: int,
                      other_token: int | None, logits: torch.Tensor | None = None) -> CrossProbability:
    """This side's probability of `other_token` at `step` from `logits`, its model's next-token logits after its
    own prompt and the tokens both sides share up to `step` (`context_logits`)."""
    if other_token is None or run.prefill is None:
        return CrossProbability(None, None)
    if not backend.capabilities.stage_chain:
        # A remote side: no logits here, only what the server reported at that step (its top-N, raw).
        stages = run.tokens[step].stages if step < len(run.tokens) else ()
        listed = dict(zip(stages[0].token_ids, stages[0].probs)) if stages else {}
        return CrossProbability(raw=listed.get(other_token), final=None)
    if logits is None or not 0 <= other_token < logits.shape[-1]:
        return CrossProbability(None, None)
    context = _context(run, step)
    stages = stage_distributions(logits, context, params.replace(num_beams=1), top_n=1, chosen=other_token)
    return CrossProbability(raw=stages[0].chosen_prob, final=stages[-1].chosen_prob)


def _context(run: RunRecord, step: int) -> list[int]:
    return list(run.prefill.prompt_ids) + [t.token_id for t in run.tokens[:step]]


def context_logits(backend: Backend, run: RunRecord, step: int, state: DecodeState | None = None
                   ) -> torch.Tensor | None:
    """One gated forward for the side's logits at `step`: with its kept `state` (which holds the side's prompt and
    answer) only the context's last token is fed. None when this side has no logits here (a remote server)."""
    if run.prefill is None or not backend.capabilities.stage_chain:
        return None
    usable = state is not None and not state.broken and state.model == backend.key
    return backend.next_token_logits(_context(run, step), state=state if usable else None)


def divergence_report(backend_a: Backend, backend_b: Backend, run_a: RunRecord, run_b: RunRecord,
                      params_a: SamplingParams, params_b: SamplingParams,
                      states: Sequence[DecodeState | None] = (None, None)) -> dict:
    """Everything the Compare tab says under the panes, as plain data (also the API's answer). On one model both
    sides share the context before the divergence, so one forward serves both cross-probabilities."""
    if not same_tokenizer(backend_a, backend_b):
        text_a, text_b = answer_text(run_a), answer_text(run_b)
        index = next((i for i, (x, y) in enumerate(zip(text_a, text_b)) if x != y), None)
        if index is None and len(text_a) != len(text_b):
            index = min(len(text_a), len(text_b))
        return {"level": "text", "step": index, "a_token": None, "b_token": None,
                "a_prob_of_b": None, "b_prob_of_a": None}
    d = divergence(run_a, run_b)
    texts = backend_a.token_texts([t for t in (d.a_token, d.b_token) if t is not None])
    report = {"level": "token", "step": d.step, "a_token": d.a_token, "b_token": d.b_token,
              "a_token_text": texts.get(d.a_token), "b_token_text": texts.get(d.b_token),
              "a_prob_of_b": None, "b_prob_of_a": None}
    if d.step is not None and run_a.prefill and run_b.prefill and \
            list(run_a.prefill.prompt_ids) == list(run_b.prefill.prompt_ids):
        logits_a = context_logits(backend_a, run_a, d.step, states[0]) if d.b_token is not None else None
        if backend_b.key == backend_a.key and logits_a is not None:
            logits_b = logits_a
        else:
            logits_b = context_logits(backend_b, run_b, d.step, states[1]) if d.a_token is not None else None
        a = cross_probability(backend_a, run_a, params_a, d.step, d.b_token, logits_a)
        b = cross_probability(backend_b, run_b, params_b, d.step, d.a_token, logits_b)
        report.update(a_prob_of_b=a.final, a_raw_prob_of_b=a.raw, b_prob_of_a=b.final, b_raw_prob_of_a=b.raw)
    return report


def describe(report: dict) -> str:
    """One paragraph for people, from divergence_report's data."""
    if report["step"] is None:
        return "Both answers are identical token for token."
    if report["level"] == "text":
        return f"The models use different tokenizers; their texts first differ at character {report['step']}."

    a, b = report.get("a_token_text"), report.get("b_token_text")
    a_shown = "(ended)" if a is None else repr(a)
    b_shown = "(ended)" if b is None else repr(b)
    return (f"The answers first diverge at token {report['step']}: A chose {a_shown}, B chose {b_shown}. "
            f"A gave B's token {percent(report['a_prob_of_b'])} (raw {percent(report.get('a_raw_prob_of_b'))}); "
            f"B gave A's token {percent(report['b_prob_of_a'])} (raw {percent(report.get('b_raw_prob_of_a'))}).")


def compare(services: Services, session: CompareSession | None, client: str | None, prompt: Any,
            model_a: str, model_b: str, settings_a: SamplingParams | Mapping | None,
            settings_b: SamplingParams | Mapping | None, seed: int | None, first_run_id: int,
            progress: ProgressFn | None = None, top_n: int = 20, owner: str | None = None
            ) -> Iterator[CompareUpdate]:
    """Both answers, streaming together, then the divergence report ("comparing…" while it is computed).
    One seed for both sides (None: a fresh one, the same for both). Both runs go to the run store as `owner`'s
    (None: the client's; a page passes its browser's)."""
    turn = prepare_turn(prompt, [], None, services.limits)
    if turn is None:
        raise Refused("Type a prompt first.")
    stop = session.arm() if session is not None else None
    requests = [ModelRequest(model_a, settings_a), ModelRequest(model_b, settings_b)]
    with services.admit(client, *requests, progress=progress) as admitted, contextlib.ExitStack() as kept:
        (backend_a, backend_b), (params_a, params_b) = admitted.backends, admitted.params
        if seed is None:
            seed = secrets.randbits(31)
        params_a, params_b = params_a.replace(seed=seed), params_b.replace(seed=seed)
        notice = " ".join(n for n in (turn.notice, admitted.notice) if n)
        run_a = run_record(backend_a, params_a, first_run_id, "A")
        run_b = run_record(backend_b, params_b, first_run_id + 1, "B")
        states = _client_states(services, kept, client, (backend_a, backend_b), (params_a, params_b))
        shown_at = 0.0
        mode = pair_mode(backend_a, backend_b, params_a, params_b)
        try:
            # closed before the states are kept (the stack unwinds in reverse), also when the caller leaves
            pairs = kept.enter_context(contextlib.closing(run_pair(
                backend_a, backend_b, turn.messages, params_a, params_b, run_a, run_b, stop, top_n, services, states,
                mode)))
        except ValueError as exc:  # the prompt does not fit
            raise Refused(str(exc)) from None
        if mode == ONE_AFTER_THE_OTHER:
            notice = " ".join(n for n in (notice, SEQUENTIAL_NOTE) if n)
        for run_a, run_b in pairs:
            if time.perf_counter() - shown_at >= UI_INTERVAL_S:
                shown_at = time.perf_counter()
                yield CompareUpdate(a=run_a, b=run_b, status=notice or "streaming…")
        yield CompareUpdate(a=run_a, b=run_b, status="Comparing the two answers…")
        for run in (run_a, run_b):
            keep_run(services.store, owner or client_owner(client), "compare", run, turn.messages)
        report = divergence_report(backend_a, backend_b, run_a, run_b, params_a, params_b, states)
        verdict = describe(report) + (f"\n\n{notice}" if notice else "")
        yield CompareUpdate(a=run_a, b=run_b, status=verdict, report=report, done=True)


def _client_states(services: Services, kept: contextlib.ExitStack, client: Client | str | None,
                   backends: Sequence[Backend], params: Sequence[SamplingParams]) -> list[DecodeState | None]:
    """The caller's kept decode state of each side's model, kept again when `kept` closes. On one model a single
    state serves: the rows' batch, or the first side that does not search beams."""
    def take(side: int) -> DecodeState | None:
        use = not params[side].beam_search
        return kept.enter_context(client_state(services.states, client, backends[side], use=use))

    first = take(0)
    if backends[1].key == backends[0].key and (first is not None or not backends[1].capabilities.rows):
        return [first, None]
    return [first, take(1)]


def api_compare(services: Services, client: str | None, prompt: Any, model_a: Any, model_b: Any, settings_a: Any,
                settings_b: Any, seed: Any) -> CompareUpdate:
    """A named endpoint's comparison: the page's `compare` run to its end, with its fields read strictly."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise Refused(f"seed must be a whole number from 0 to 2**63 - 1, got {str(seed)[:40]}")
    if not all(s is None or isinstance(s, dict) for s in (settings_a, settings_b)):
        raise Refused("settings_a and settings_b must be JSON objects of sampling fields")
    final = None
    for final in compare(services, None, client, prompt, model_a, model_b, settings_a, settings_b, seed, 1,
                         top_n=0):
        pass
    return final
