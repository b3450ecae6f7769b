"""The generation core: one generator of events that every tab consumes.

It knows nothing of Gradio. Contract: `generate(...)` validates its inputs eagerly (ValueError naming
the field), then returns an iterator that yields one PrefillEvent, a TokenEvent per generated token
(an ending eos/stop token included, with empty text) and exactly one DoneEvent. Beam search first yields a
ProgressEvent per search step (its tokens are only known at the end).

The runs here differ only in how they choose tokens (a row chooser per row in lockstep, speculative rounds, beam
search); every chosen token goes to its row's Emitter (qdemo.core.emit), the one place that turns tokens into
events and applies the stop rules, the clock and error reporting.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Sequence

import torch

from qdemo.core.beams import Hypothesis, beam_search, step_candidates, transition_probs
from qdemo.core.decode import (
    DecodeState,
    RowChooser,
    StepLock,
    choose,
    common_prefix,
    decode_step,
    new_state,
    prefill,
)
from qdemo.core.emit import Deadline, Emitter, end_early, fail, finish, new_emitter
from qdemo.core.events import (
    DoneEvent,
    Event,
    PrefillEvent,
    ProgressEvent,
    StageTopN,
    TokenEvent,
)
from qdemo.core.metrics import memory_sample, now
from qdemo.core.speculative import SpeculativeDecoder
from qdemo.errors import PromptTooLongError
from qdemo.models.loader import LoadedModel, same_tokenizer
from qdemo.models.prompting import build_prompt
from qdemo.sampling import SamplingParams, build_stages

PREFILL_CHUNK = {"cpu": 64, "cuda": 512}  # tokens per prefill forward: one chunk is what another user may wait


def default_prefill_chunk(device: torch.device) -> int:
    """QDEMO_PREFILL_CHUNK, else a chunk sized for the device (a 64-token chunk is ≈ 0.5 s on a 2-core CPU)."""
    configured = os.environ.get("QDEMO_PREFILL_CHUNK", "").strip()
    if configured:
        return int(configured)
    return PREFILL_CHUNK.get(device.type, PREFILL_CHUNK["cuda"])


def generate(
    lm: LoadedModel,
    messages: Sequence[dict[str, str]] | None = None,
    input_ids: Sequence[int] | None = None,
    params: SamplingParams | None = None,
    stop_event: threading.Event | None = None,
    top_n: int = 20,
    ignore_eos: bool = False,
    step_lock: StepLock | None = None,
    dropped_turns: Sequence[int] = (),
    prefill_chunk: int | None = None,
    time_limit_s: float | None = None,
    state: DecodeState | None = None,
    exact_draw: bool = False,
) -> Iterator[Event]:
    """Stream a completion of `messages` (via the chat template) or of raw `input_ids`.

    top_n: how many tokens per stage to report (0 turns stage capture off). Beam search reports one stage, "beam":
    the top-N of the distribution each answer token was chosen from.
    ignore_eos: keep going past eos/stop tokens (benchmarks that need a fixed length), beam search included.
    step_lock: held around every model forward (a serving pool's per-model gate), so concurrent generations on
    one model take turns step by step.
    dropped_turns: with input_ids built by a caller, the message indices it left out (reported as is).
    prefill_chunk: prompt tokens per prefill forward (default: by device). Each chunk takes its own turn at the
    step gate, so a long prompt never holds the model for everyone, and Stop is honoured between chunks.
    time_limit_s: the run ends (reason "time_limit") once it has taken this long, checked every step and chunk.
    state: a one-row DecodeState kept from an earlier call on this model. Only the prompt tokens after its
    longest common prefix with the new prompt are prefilled (the rest is cropped away); the PrefillEvent says how
    many were reused. The state then holds this run's prompt and answer for the next call (unless it is
    `broken`, when a forward failed). Without one, a fresh state is used and dropped.
    exact_draw: sample as transformers' generate does (multinomial over the full vocabulary: the same tokens under
    the same seed, for oracle tests) instead of the fast draw among the tokens the filters left.
    """
    started = time.perf_counter()
    params, chunk = _check_common(lm, params, top_n, prefill_chunk)
    if (messages is None) == (input_ids is None):
        raise ValueError("pass exactly one of messages or input_ids")
    if messages is not None:
        prompt = build_prompt(lm.tokenizer, messages, lm.max_context, params.max_new_tokens,
                              lm.spec.system_prompt, lm.spec.name, lm.family.build_prompt)
        ids, dropped = prompt.ids, prompt.dropped_turns
    else:
        ids, dropped = _check_ids(lm, input_ids, params), tuple(int(i) for i in dropped_turns)
    if state is not None and (state.rows != 1 or state.model != lm.key):
        raise ValueError(f"a kept decode state must be one row of {lm.spec.name}")
    prep_s = time.perf_counter() - started
    lock = step_lock or contextlib.nullcontext
    clock = Deadline(started, time_limit_s, stop_event)
    if params.beam_search:
        return _run_beams(lm, ids, dropped, params, clock, prep_s, lock, chunk, top_n, ignore_eos)
    return _run(lm, state, [ids], [params], dropped, clock, top_n, ignore_eos, prep_s, lock, chunk, fork=True,
                exact_draw=exact_draw)


def generate_rows(
    lm: LoadedModel, input_ids: Sequence[int], params: Sequence[SamplingParams],
    stop_event: threading.Event | None = None, top_n: int = 20, ignore_eos: bool = False,
    step_lock: StepLock | None = None, dropped_turns: Sequence[int] = (), prefill_chunk: int | None = None,
    time_limit_s: float | None = None, exact_draw: bool = False, state: DecodeState | None = None,
) -> Iterator[Event]:
    """One prompt, several continuations: the prompt is prefilled once and forked into one row per SamplingParams,
    and the rows decode as one batch (one forward per step for all of them). Each row's tokens equal its solo run
    with the same settings and seed. Events carry their row; each row ends with its own DoneEvent.
    state: a kept one-row state supplies its longest common prefix with the prompt, as in `generate`; it ends as
    one row again (the prompt and the answer of a row that decoded to the last step), ready to be kept."""
    started = time.perf_counter()
    if not params:
        raise ValueError("generate_rows needs at least one SamplingParams")
    checked = [_check_common(lm, p, top_n, prefill_chunk) for p in params]
    chunk = checked[0][1]
    if any(p.beam_search for p, _ in checked):
        raise ValueError("beam search runs alone (num_beams > 1 is not a row of a batch)")
    longest = max(p.max_new_tokens for p, _ in checked)
    ids = _check_ids(lm, input_ids, checked[0][0].replace(max_new_tokens=longest))
    if state is not None and (state.rows != 1 or state.model != lm.key):
        raise ValueError(f"a kept decode state must be one row of {lm.spec.name}")
    clock = Deadline(started, time_limit_s, stop_event)
    return _run(lm, state, [ids], [p for p, _ in checked], tuple(int(i) for i in dropped_turns), clock, top_n,
                ignore_eos, time.perf_counter() - started, step_lock or contextlib.nullcontext, chunk, fork=True,
                exact_draw=exact_draw)


def generate_batch(
    lm: LoadedModel, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
    stop_event: threading.Event | None = None, top_n: int = 20, ignore_eos: bool = False,
    step_lock: StepLock | None = None, prefill_chunk: int | None = None, time_limit_s: float | None = None,
    state: DecodeState | None = None,
) -> Iterator[Event]:
    """Different prompts in one padded batch (the batched inference of the seed articles): one prefill and one
    forward per step for all rows. The prefix all prompts share is prefilled once (a kept one-row `state` supplies
    what it already holds of it) and the rows are padded after it. Row i answers prompts[i]; events carry their
    row. A kept state ends holding the shared prefix."""
    started = time.perf_counter()
    if not prompts:
        raise ValueError("generate_batch needs at least one prompt")
    params_rows = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params_rows) != len(prompts):
        raise ValueError(f"generate_batch got {len(params_rows)} settings for {len(prompts)} prompts")
    checked = [_check_common(lm, p, top_n, prefill_chunk) for p in params_rows]
    if any(p.beam_search for p, _ in checked):
        raise ValueError("beam search runs alone (num_beams > 1 is not a row of a batch)")
    rows = [_check_ids(lm, prompt, p) for prompt, (p, _) in zip(prompts, checked)]
    if state is not None and (state.rows != 1 or state.model != lm.key):
        raise ValueError(f"a kept decode state must be one row of {lm.spec.name}")
    clock = Deadline(started, time_limit_s, stop_event)
    return _run(lm, state, rows, [p for p, _ in checked], (), clock, top_n, ignore_eos,
                time.perf_counter() - started, step_lock or contextlib.nullcontext, checked[0][1], fork=False)


def generate_assisted(
    target: LoadedModel, draft: LoadedModel, input_ids: Sequence[int], params: SamplingParams | None = None,
    draft_tokens: int = 4, stop_event: threading.Event | None = None, top_n: int = 20, ignore_eos: bool = False,
    target_lock: StepLock | None = None, draft_lock: StepLock | None = None, dropped_turns: Sequence[int] = (),
    prefill_chunk: int | None = None, time_limit_s: float | None = None,
) -> Iterator[Event]:
    """Speculative decoding: `draft` proposes `draft_tokens` tokens a round, `target` verifies them in one forward
    (see qdemo.core.speculative). Events as `generate`'s, each TokenEvent marking whether the draft proposed it, and the
    DoneEvent's stats counting proposed and accepted tokens. Greedy output equals the target's own greedy output.
    Stop and the time limit act between prefill chunks (both models'), then after each round."""
    started = time.perf_counter()
    params, chunk = _check_common(target, params, top_n, prefill_chunk)
    if params.beam_search:
        raise ValueError("speculative decoding does not take beam search (num_beams must be 1)")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= 16:
        raise ValueError(f"draft_tokens must be a whole number from 1 to 16, got {draft_tokens!r}")
    if not same_tokenizer(target, draft):
        raise ValueError(f"{draft.spec.name} cannot draft for {target.spec.name}: their tokenizers differ")
    ids = _check_ids(target, input_ids, params)
    clock = Deadline(started, time_limit_s, stop_event)
    return _run_assisted(target, draft, ids, params, draft_tokens, tuple(int(i) for i in dropped_turns), clock,
                         top_n, ignore_eos, time.perf_counter() - started, target_lock or contextlib.nullcontext,
                         draft_lock or contextlib.nullcontext, chunk)


def _check_common(lm: LoadedModel, params: SamplingParams | None, top_n: int, prefill_chunk: int | None
                  ) -> tuple[SamplingParams, int]:
    params = params if params is not None else lm.spec.sampling
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be an integer >= 0, got {top_n!r}")
    chunk = default_prefill_chunk(lm.device) if prefill_chunk is None else prefill_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill_chunk must be an integer >= 1, got {chunk!r}")
    return params, chunk


def _check_ids(lm: LoadedModel, input_ids: Sequence[int], params: SamplingParams) -> list[int]:
    ids = lm.check_ids(input_ids, "input_ids")
    budget = lm.max_context - params.max_new_tokens
    if len(ids) > budget:
        raise PromptTooLongError(f"{lm.spec.name}: {len(ids)} prompt tokens exceed the {budget} that fit "
                                 "(max_context − max_new_tokens)")
    return ids


@dataclass
class _Row:
    """One row while the batch decodes: how it chooses its tokens, and the emitter they go to."""

    chooser: RowChooser
    out: Emitter


def _new_row(lm: LoadedModel, index: int, prompt: Sequence[int], params: SamplingParams, top_n: int,
             ignore_eos: bool, prep_s: float, exact_draw: bool = False) -> _Row:
    seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(31))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=lm.device)
        generator.manual_seed(seed)
    chooser = RowChooser(stages=build_stages(params), greedy=params.greedy, generator=generator, top_n=top_n,
                         exact_draw=exact_draw)
    return _Row(chooser=chooser, out=new_emitter(lm, index, prompt, params.max_new_tokens, seed, ignore_eos, prep_s))


def _run(
    lm: LoadedModel, kept: DecodeState | None, prompts: list[list[int]], params: list[SamplingParams],
    dropped: tuple[int, ...], clock: Deadline, top_n: int, ignore_eos: bool, prep_s: float, lock: StepLock,
    chunk: int, fork: bool, exact_draw: bool = False,
) -> Iterator[Event]:
    """Prefill, then decode all rows in lockstep until each ends. `fork`: one prompt, one row per params (a kept
    one-row state may supply its prefix); else one row per prompt, left-padded."""
    rows = [_new_row(lm, i, prompts[0] if fork else prompts[i], p, top_n, ignore_eos, prep_s, exact_draw)
            for i, p in enumerate(params)]
    outs = [row.out for row in rows]
    state = kept if kept is not None and not kept.broken else new_state(lm)
    try:
        logits, waited = yield from _prefill_rows(lm, state, prompts, outs, dropped, clock, lock, chunk, fork)
        if logits is not None:
            yield from _decode_rows(lm, state, rows, logits, waited, clock, lock)
    except Exception as exc:  # reported to the consumer; every unfinished row still ends with a DoneEvent
        state.broken = True
        fail(outs, lm, exc)
    finally:
        if kept is None or state is not kept:
            # Drop the KV cache now rather than when the consumer lets go of this generator.
            state.release()
        elif not state.broken:
            state.settle()  # a kept state is one row: the shared prompt and (forked rows) one row's answer
    yield from finish(outs)  # rows stopped during the prefill, or failed


def _prefill_rows(
    lm: LoadedModel, state: DecodeState, prompts: list[list[int]], outs: list[Emitter], dropped: tuple[int, ...],
    clock: Deadline, lock: StepLock, chunk: int, fork: bool,
) -> Generator[Event, None, tuple[torch.Tensor | None, float]]:
    """The prompts into the state, a chunk per turn at the gate, then every row's PrefillEvent. A kept state keeps
    its longest common prefix with a forked prompt (at least one token is prefilled: its logits choose the first
    token). Returns the first logits, or None when Stop or the time limit came between chunks (the rows have
    ended), and how long the rows waited for them."""
    device = lm.device
    queued = now(device)
    t0 = now(device)
    if fork:
        ids = prompts[0]
        tail = state.tail_of(ids)
        reused = state.keep_prefix(ids, len(ids) if tail is not None else len(ids) - 1)
        if tail is not None:  # the whole prompt and its last logits are held: nothing to feed
            logits, early = tail[None].clone(), None
        else:
            logits, early = prefill(lm, state, [ids[reused:]], lock, chunk, clock.reason)
            if early is None:
                state.tail = (tuple(ids), logits[0].clone())
    else:
        reused, rests, early = _shared_prefix(lm, state, prompts, lock, chunk, clock.reason)
        logits, early = (None, early) if early else prefill(lm, state, rests, lock, chunk, clock.reason)
    prefill_s = now(device) - t0  # includes waits at the gate between chunks: what the user waited
    if fork and len(outs) > 1 and early is None:
        state.fork(len(outs))
        logits = logits.expand(len(outs), -1)
    waited = now(device) - queued
    mem = memory_sample(device)
    kv = state.kv_bytes() // max(1, state.rows)  # one row's keys and values (a shared prefix counts in each row)
    for out in outs:
        yield out.prefill_event(prefill_s, kv, mem, dropped, reused, state.kv_allocated())
    if early:
        for out in outs:
            out.end(early)
        return None, waited
    return logits, waited


def _shared_prefix(lm: LoadedModel, state: DecodeState, prompts: list[list[int]], lock: StepLock, chunk: int,
                   should_stop: Callable[[], str | None]) -> tuple[int, list[list[int]], str | None]:
    """The prefix all prompts share (each keeps at least one token of its own: its logits choose its first), fed
    once into the one-row `state` (after what it already holds of it), which is then forked into one row per
    prompt. Returns (tokens the state already held, each row's tokens after the prefix, a stop between chunks)."""
    shared = min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        shared = min(shared, common_prefix(prompts[0], other))
    held = state.keep_prefix(prompts[0], shared)
    if shared > held:
        _, early = prefill(lm, state, [prompts[0][held:shared]], lock, chunk, should_stop)
        if early:
            return held, [], early
    state.fork(len(prompts))
    return held, [p[shared:] for p in prompts], None


def _decode_rows(lm: LoadedModel, state: DecodeState, rows: list[_Row], logits: torch.Tensor, waited: float,
                 clock: Deadline, lock: StepLock) -> Iterator[Event]:
    """Every live row chooses and emits its token; rows that end leave the batch, the others feed their token
    back, and one forward serves them all. The clock is read once a step."""
    device = lm.device
    live = list(rows)
    step_start = now(device) - waited  # time the consumer spent on the PrefillEvents is not ours
    while True:
        choices = choose(logits, state, [row.chooser for row in live])
        elapsed = now(device) - step_start
        mem = memory_sample(device)
        kv, allocated = state.kv_bytes() // max(1, state.rows), state.kv_allocated()
        keep: list[int] = []  # positions of the rows that go on
        finished: list[Emitter] = []
        for position, (row, (token, stages)) in enumerate(zip(live, choices)):
            event, ended = row.out.emit(token, stages, elapsed, kv, mem, allocated=allocated)
            yield event
            if ended:
                finished.append(row.out)
            else:
                keep.append(position)
        going = [live[position].out for position in keep]
        if end_early(clock, going):
            finished += going
            keep = []
        for out in finished:
            yield out.done()
        if not keep:
            return
        if len(keep) < len(live):
            state.select(keep)  # finished rows leave the batch: the rest decode without them
        live = [live[position] for position in keep]
        tokens = [row.out.generated[-1] for row in live]
        step_start = now(device)  # waiting for the gate counts: it is the latency this user sees
        logits = decode_step(lm, state, tokens, lock)


def _run_assisted(
    target: LoadedModel, draft: LoadedModel, ids: list[int], params: SamplingParams, k: int,
    dropped: tuple[int, ...], clock: Deadline, top_n: int, ignore_eos: bool, prep_s: float, target_lock: StepLock,
    draft_lock: StepLock, chunk: int,
) -> Iterator[Event]:
    """Speculative decoding of one row: the decoder chooses a round of tokens at a time, the emitter reports them."""
    row = _new_row(target, 0, ids, params, top_n, ignore_eos, prep_s)
    draft_generator = None
    if row.out.seed is not None:
        draft_generator = torch.Generator(device=draft.device)
        draft_generator.manual_seed(row.out.seed + 1)
    decoder = SpeculativeDecoder(target=target, draft=draft, target_state=new_state(target),
                                 draft_state=new_state(draft), target_lock=target_lock, draft_lock=draft_lock,
                                 stages=row.chooser.stages, greedy=params.greedy, k=k,
                                 generator=row.chooser.generator, draft_generator=draft_generator, top_n=top_n)
    try:
        yield from _assisted_rounds(decoder, row.out, ids, dropped, clock, chunk)
    except Exception as exc:
        fail([row.out], target, exc)
    finally:
        decoder.target_state.release()
        decoder.draft_state.release()
    yield from finish([row.out])


def _assisted_rounds(decoder: SpeculativeDecoder, out: Emitter, ids: list[int], dropped: tuple[int, ...],
                     clock: Deadline, chunk: int) -> Iterator[Event]:
    """Both models' prefill (Stop and the time limit act between its chunks), the PrefillEvent, then a round at a
    time: the round's tokens share its time, and the clock is read after each round."""
    device = decoder.target.device
    queued = now(device)
    early = decoder.start(ids, chunk, clock.reason)
    prefill_s = now(device) - queued
    target = decoder.target_state
    yield out.prefill_event(prefill_s, target.kv_bytes(), memory_sample(device), dropped,
                            allocated=target.kv_allocated())
    if early:
        out.end(early)
        return
    step_start = now(device) - prefill_s
    while True:
        result = decoder.step(out.max_new_tokens - len(out.generated))
        out.draft_proposed += result.proposed
        out.draft_accepted += result.accepted
        share = (now(device) - step_start) / len(result.emitted)  # the round's time, shared by its tokens
        mem, kv, allocated = memory_sample(device), target.kv_bytes(), target.kv_allocated()
        for item in result.emitted:
            event, ended = out.emit(item.token, item.stages, share, kv, mem, drafted=item.drafted, allocated=allocated)
            yield event
            if ended:
                return
        if end_early(clock, (out,)):
            return
        step_start = now(device)


@dataclass
class _Search:
    """What a beam search leaves for its answer: the best hypothesis, each step's time and the beams' KV cache."""

    best: Hypothesis | None = None
    steps: list[float] = field(default_factory=list)
    kv: int = 0
    allocated: int = 0


def _run_beams(
    lm: LoadedModel, ids: list[int], dropped: tuple[int, ...], params: SamplingParams, clock: Deadline,
    prep_s: float, lock: StepLock, chunk: int, top_n: int, ignore_eos: bool,
) -> Iterator[Event]:
    """Beam search on the decode state (the beams are its rows): a PrefillEvent, then a ProgressEvent per step
    carrying the best running beam's text, then the answer's tokens and a DoneEvent. Stop and the time limit end
    it within a step, with the best beam so far; so does an error (its tokens so far, then reason "error")."""
    out = new_emitter(lm, 0, ids, params.max_new_tokens, None, ignore_eos, prep_s)
    state = new_state(lm)
    search = _Search()
    try:
        yield from _search_beams(lm, state, ids, dropped, params, clock, lock, chunk, top_n, out, search)
    except Exception as exc:
        fail([out], lm, exc)
    finally:
        search.kv, search.allocated = state.kv_bytes(), state.kv_allocated()
        state.release()
    yield from _beam_answer(lm, out, search, top_n)
    yield out.done()


def _search_beams(
    lm: LoadedModel, state: DecodeState, ids: list[int], dropped: tuple[int, ...], params: SamplingParams,
    clock: Deadline, lock: StepLock, chunk: int, top_n: int, out: Emitter, search: _Search,
) -> Iterator[Event]:
    """The prefill and its PrefillEvent, then the search a step at a time, each step's ProgressEvent showing the best
    running beam. The answer's end is the emitter's (no stop tokens with ignore_eos: a fixed length)."""
    device = lm.device
    started = now(device)
    logits, early = prefill(lm, state, [ids], lock, chunk, clock.reason)
    yield out.prefill_event(now(device) - started, state.kv_bytes(), memory_sample(device), dropped,
                            allocated=state.kv_allocated())
    if early:
        out.end(early)
        return
    last = now(device)
    for step in beam_search(lm, state, logits[0:1], params, out.ending, lock, top_n=top_n):
        t = now(device)  # one clock read (a device sync on CUDA) per step
        search.steps.append(t - last)
        last = t
        search.best = step.best
        yield ProgressEvent(phase="beam search", step=step.step, total=params.max_new_tokens, seconds=t - started,
                            kv_cache_bytes=state.kv_bytes(),
                            text=lm.tokenizer.decode(step.best.tokens, skip_special_tokens=True))
        if step.finished or end_early(clock, (out,)):
            return


def _beam_answer(lm: LoadedModel, out: Emitter, search: _Search, top_n: int) -> Iterator[TokenEvent]:
    """The best hypothesis's tokens, each with a "beam" stage: its transition probability as chosen_prob, and the
    step's top-N of the processed distribution (no stage with top_n = 0, as for plain runs)."""
    best = search.best
    tokens = best.tokens if best is not None else []
    probs = transition_probs(best) if best is not None else []
    tops = step_candidates(best) if best is not None and top_n else []
    mem = memory_sample(lm.device)
    for i, token in enumerate(tokens):
        stages: tuple[StageTopN, ...] = ()
        if top_n:
            stages = (StageTopN(name="beam", token_ids=tops[i][0], probs=tops[i][1], chosen_prob=probs[i]),)
        seconds = search.steps[i] if i < len(search.steps) else 0.0
        event, _ = out.emit(token, stages, seconds, search.kv, mem, last=i == len(tokens) - 1,
                            allocated=search.allocated)
        yield event
    # Nothing is visible before the search ends, so the first token's time is the whole search.
    out.shown_at_end(out.prefill_s, sum(search.steps), mem)

def collect(events: Iterator[Event]) -> dict[str, Any]:
    """Drain a stream into {prefill, tokens, done}: handy for tests, CLI and benchmarks."""
    prefill, tokens, final = None, [], None
    for event in events:
        if isinstance(event, PrefillEvent):
            prefill = event
        elif isinstance(event, TokenEvent):
            tokens.append(event)
        elif isinstance(event, DoneEvent):
            final = event
    return {"prefill": prefill, "tokens": tokens, "done": final}
