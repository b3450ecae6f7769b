"""The generation core: one generator of events that every tab consumes.

It knows nothing of Gradio. Contract: `generate(...)` validates its inputs eagerly (ValueError naming
the field), then returns an iterator that yields one PrefillEvent, a TokenEvent per generated token
(an ending eos/stop token included, with empty text) and exactly one DoneEvent. Beam search first yields a
ProgressEvent per search step (its tokens are only known at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from qdemo.core.beams import beam_search, transition_probs
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
from qdemo.core.events import (
    DoneEvent,
    Event,
    GenerationStats,
    PrefillEvent,
    ProgressEvent,
    StageTopN,
    TokenEvent,
)
from qdemo.core.metrics import memory_sample, now
from qdemo.core.speculative import SpeculativeDecoder
from qdemo.core.textstream import IncrementalDetokenizer
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
) -> Iterator[Event]:
    """Stream a completion of `messages` (via the chat template) or of raw `input_ids`.

    top_n: how many tokens per stage to report (0 turns stage capture off).
    ignore_eos: keep going past eos/stop tokens (benchmarks that need a fixed length).
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
    clock = _Deadline(started, time_limit_s, stop_event)
    if params.beam_search:
        return _run_beams(lm, ids, dropped, params, clock, prep_s, lock, chunk)
    return _run(lm, state, [ids], [params], dropped, clock, top_n, ignore_eos, prep_s, lock, chunk, fork=True)


def generate_rows(
    lm: LoadedModel, input_ids: Sequence[int], params: Sequence[SamplingParams],
    stop_event: threading.Event | None = None, top_n: int = 20, ignore_eos: bool = False,
    step_lock: StepLock | None = None, dropped_turns: Sequence[int] = (), prefill_chunk: int | None = None,
    time_limit_s: float | None = None,
) -> Iterator[Event]:
    """One prompt, several continuations: the prompt is prefilled once and forked into one row per SamplingParams,
    and the rows decode as one batch (one forward per step for all of them). Each row's tokens equal its solo run
    with the same settings and seed. Events carry their row; each row ends with its own DoneEvent."""
    started = time.perf_counter()
    if not params:
        raise ValueError("generate_rows needs at least one SamplingParams")
    checked = [_check_common(lm, p, top_n, prefill_chunk) for p in params]
    chunk = checked[0][1]
    if any(p.beam_search for p, _ in checked):
        raise ValueError("beam search runs alone (num_beams > 1 is not a row of a batch)")
    longest = max(p.max_new_tokens for p, _ in checked)
    ids = _check_ids(lm, input_ids, checked[0][0].replace(max_new_tokens=longest))
    clock = _Deadline(started, time_limit_s, stop_event)
    return _run(lm, None, [ids], [p for p, _ in checked], tuple(int(i) for i in dropped_turns), clock, top_n,
                ignore_eos, time.perf_counter() - started, step_lock or contextlib.nullcontext, chunk, fork=True)


def generate_batch(
    lm: LoadedModel, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
    stop_event: threading.Event | None = None, top_n: int = 20, ignore_eos: bool = False,
    step_lock: StepLock | None = None, prefill_chunk: int | None = None, time_limit_s: float | None = None,
) -> Iterator[Event]:
    """Different prompts in one left-padded batch (the batched inference of the seed articles): one prefill and
    one forward per step for all rows. Row i answers prompts[i]; events carry their row."""
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
    clock = _Deadline(started, time_limit_s, stop_event)
    return _run(lm, None, rows, [p for p, _ in checked], (), clock, top_n, ignore_eos,
                time.perf_counter() - started, step_lock or contextlib.nullcontext, checked[0][1], fork=False)


def generate_assisted(
    target: LoadedModel, draft: LoadedModel, input_ids: Sequence[int], params: SamplingParams | None = None,
    draft_tokens: int = 4, stop_event: threading.Event | None = None, top_n: int = 20, ignore_eos: bool = False,
    target_lock: StepLock | None = None, draft_lock: StepLock | None = None, dropped_turns: Sequence[int] = (),
    prefill_chunk: int | None = None, time_limit_s: float | None = None,
) -> Iterator[Event]:
    """Speculative decoding: `draft` proposes `draft_tokens` tokens a round, `target` verifies them in one forward
    (see qdemo.core.speculative). Events as `generate`'s, each TokenEvent marking whether the draft proposed it, and the
    DoneEvent's stats counting proposed and accepted tokens. Greedy output equals the target's own greedy output."""
    started = time.perf_counter()
    params, chunk = _check_common(target, params, top_n, prefill_chunk)
    if params.beam_search:
        raise ValueError("speculative decoding does not take beam search (num_beams must be 1)")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= 16:
        raise ValueError(f"draft_tokens must be a whole number from 1 to 16, got {draft_tokens!r}")
    if not same_tokenizer(target, draft):
        raise ValueError(f"{draft.spec.name} cannot draft for {target.spec.name}: their tokenizers differ")
    ids = _check_ids(target, input_ids, params)
    clock = _Deadline(started, time_limit_s, stop_event)
    return _run_assisted(target, draft, ids, params, draft_tokens, tuple(int(i) for i in dropped_turns), clock,
                         top_n, ignore_eos, time.perf_counter() - started, target_lock or contextlib.nullcontext,
                         draft_lock or contextlib.nullcontext, chunk)


def _run_assisted(
    target: LoadedModel, draft: LoadedModel, ids: list[int], params: SamplingParams, k: int,
    dropped: tuple[int, ...], clock: _Deadline, top_n: int, ignore_eos: bool, prep_s: float, target_lock: StepLock,
    draft_lock: StepLock, chunk: int,
) -> Iterator[Event]:
    device = target.device
    row = _new_row(target, 0, ids, params, top_n)
    draft_generator = None
    if row.seed is not None:
        draft_generator = torch.Generator(device=draft.device)
        draft_generator.manual_seed(row.seed + 1)
    decoder = SpeculativeDecoder(target=target, draft=draft, target_state=new_state(target),
                                 draft_state=new_state(draft), target_lock=target_lock, draft_lock=draft_lock,
                                 stages=row.chooser.stages, greedy=params.greedy, k=k,
                                 generator=row.chooser.generator, draft_generator=draft_generator, top_n=top_n)
    eos, stops = target.eos_token_ids, target.stop_token_ids
    prefill_s, proposed, accepted = 0.0, 0, 0
    try:
        queued = now(device)
        decoder.start(ids, chunk)
        prefill_s = now(device) - queued
        mem = memory_sample(device)
        row.peak = max(mem.used_bytes, mem.cuda_peak or 0)
        yield PrefillEvent(prompt_ids=tuple(ids), prefill_seconds=prefill_s, dropped_turns=dropped, seed=row.seed,
                           kv_cache_bytes=decoder.target_state.kv_bytes(), memory=mem)
        step_start = now(device) - prefill_s
        ended = False
        while not ended:
            result = decoder.step(params.max_new_tokens - len(row.generated))
            proposed += result.proposed
            accepted += result.accepted
            share = (now(device) - step_start) / len(result.emitted)  # the round's time, shared by its tokens
            mem = memory_sample(device)
            row.peak = max(row.peak, mem.used_bytes, mem.cuda_peak or 0)
            for item in result.emitted:
                row.generated.append(item.token)
                ends = not ignore_eos and (item.token in eos or item.token in stops)
                last = len(row.generated) >= params.max_new_tokens
                text = "" if ends else row.detok.push(item.token)
                if ends or last:
                    text += row.detok.flush()
                row.step_times.append(share)
                yield TokenEvent(step=len(row.generated) - 1, token_id=item.token, text=text, stages=item.stages,
                                 step_seconds=share, kv_cache_bytes=decoder.target_state.kv_bytes(), memory=mem,
                                 drafted=item.drafted)
                if ends:
                    row.reason = "eos" if item.token in eos else "stop_token"
                if ends or last:
                    ended = True
                    break
            if not ended:
                early = clock.reason()
                if early:
                    row.reason, ended = early, True
            step_start = now(device)
    except Exception as exc:
        row.reason, row.error = "error", _describe_error(target, exc)
    finally:
        decoder.target_state.release()
        decoder.draft_state.release()
    done = _done(row, prep_s, prefill_s)
    yield dataclasses.replace(done, stats=dataclasses.replace(done.stats, draft_proposed=proposed,
                                                              draft_accepted=accepted))


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


@dataclass
class _Deadline:
    """Why a run should end early, if it should: the user's Stop or the server's time limit."""

    started: float
    limit_s: float | None
    stop_event: threading.Event | None

    def reason(self) -> str | None:
        if self.stop_event is not None and self.stop_event.is_set():
            return "stopped"
        if self.limit_s is not None and time.perf_counter() - self.started >= self.limit_s:
            return "time_limit"
        return None


def _check_ids(lm: LoadedModel, input_ids: Sequence[int], params: SamplingParams) -> list[int]:
    ids = lm.check_ids(input_ids, "input_ids")
    budget = lm.max_context - params.max_new_tokens
    if len(ids) > budget:
        raise PromptTooLongError(f"{lm.spec.name}: {len(ids)} prompt tokens exceed the {budget} that fit "
                                 "(max_context − max_new_tokens)")
    return ids


@dataclass
class _Row:
    """One row's bookkeeping while the batch decodes."""

    index: int
    prompt: tuple[int, ...]
    params: SamplingParams
    chooser: RowChooser
    seed: int | None
    detok: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    reason: str = "max_tokens"
    error: str | None = None
    peak: int = 0


def _new_row(lm: LoadedModel, index: int, prompt: Sequence[int], params: SamplingParams, top_n: int) -> _Row:
    seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(31))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=lm.device)
        generator.manual_seed(seed)
    chooser = RowChooser(stages=build_stages(params), greedy=params.greedy, generator=generator, top_n=top_n)
    return _Row(index=index, prompt=tuple(prompt), params=params, chooser=chooser, seed=seed,
                detok=IncrementalDetokenizer(lm.tokenizer))


def _run(
    lm: LoadedModel, kept: DecodeState | None, prompts: list[list[int]], params: list[SamplingParams],
    dropped: tuple[int, ...], clock: _Deadline, top_n: int, ignore_eos: bool, prep_s: float, lock: StepLock,
    chunk: int, fork: bool,
) -> Iterator[Event]:
    """Prefill, then decode all rows in lockstep until each ends. `fork`: one prompt, one row per params (a kept
    one-row state may supply its prefix); else one row per prompt, left-padded."""
    device = lm.device
    rows = [_new_row(lm, i, prompts[0] if fork else prompts[i], p, top_n) for i, p in enumerate(params)]
    eos, stops = lm.eos_token_ids, lm.stop_token_ids
    state = kept if kept is not None and not kept.broken else new_state(lm, 1 if fork else len(rows))
    prefill_s, reused = 0.0, 0
    early: str | None = None
    error: str | None = None
    live: list[_Row] = []
    ended: set[int] = set()
    logits = None
    try:
        # 1. Prefill, a chunk per turn at the gate. A kept state keeps its longest common prefix with this prompt
        #    (at least one token is prefilled: its logits choose the first token).
        queued = now(device)
        if fork:
            ids = prompts[0]
            if state.width:
                reused = min(common_prefix(state.row_ids(0), ids), len(ids) - 1)
                state.crop(reused)
            rows_in = [ids[reused:]]
        else:
            rows_in = prompts
        t0 = now(device)
        logits, early = prefill(lm, state, rows_in, lock, chunk, clock.reason)
        prefill_s = now(device) - t0  # includes waits at the gate between chunks: what the user waited
        if fork and len(rows) > 1 and early is None:
            state.fork(len(rows))
            logits = logits.expand(len(rows), -1)
        waited = now(device) - queued
        mem = memory_sample(device)
        for row in rows:
            row.peak = max(mem.used_bytes, mem.cuda_peak or 0)
            yield PrefillEvent(prompt_ids=row.prompt, prefill_seconds=prefill_s, dropped_turns=dropped,
                               seed=row.seed, kv_cache_bytes=state.kv_bytes() // max(1, state.rows), memory=mem,
                               row=row.index, reused_tokens=reused)
        live = list(rows) if early is None else []
        for row in rows if early else ():
            row.reason = early
        # 2. Decode: every live row chooses, reports, stops or feeds its token back; one forward serves them all.
        step_start = now(device) - waited  # time the consumer spent on the PrefillEvents is not ours
        while live:
            choices = choose(logits, state, [r.chooser for r in live])
            elapsed = now(device) - step_start
            mem = memory_sample(device)
            kv = state.kv_bytes() // max(1, state.rows)
            keep: list[int] = []
            finished: list[_Row] = []
            for position, (row, (token, stages)) in enumerate(zip(live, choices)):
                row.generated.append(token)
                ends = not ignore_eos and (token in eos or token in stops)
                last = len(row.generated) >= row.params.max_new_tokens
                text = "" if ends else row.detok.push(token)
                if ends or last:
                    text += row.detok.flush()
                row.step_times.append(elapsed)
                row.peak = max(row.peak, mem.used_bytes, mem.cuda_peak or 0)
                yield TokenEvent(step=len(row.generated) - 1, token_id=token, text=text, stages=stages,
                                 step_seconds=elapsed, kv_cache_bytes=kv, memory=mem, row=row.index)
                if ends:
                    row.reason = "eos" if token in eos else "stop_token"
                    finished.append(row)
                elif last:
                    finished.append(row)
                else:
                    keep.append(position)
            early = clock.reason() if keep else None
            if early:
                for position in keep:
                    live[position].reason = early
                    finished.append(live[position])
                keep = []
            for row in finished:
                ended.add(row.index)
                yield _done(row, prep_s, prefill_s)
            if not keep:
                live = []
                break
            if len(keep) < len(live):
                state.select(keep)  # finished rows leave the batch: the rest decode without them
            tokens = [live[position].generated[-1] for position in keep]
            live = [live[position] for position in keep]
            step_start = now(device)  # waiting for the gate counts: it is the latency this user sees
            logits = decode_step(lm, state, tokens, lock)
    except Exception as exc:  # reported to the consumer; every unfinished row still ends with a DoneEvent
        error = _describe_error(lm, exc)
        state.broken = True
        for row in rows:
            if row.index not in ended:
                row.reason, row.error = "error", error
    finally:
        logits = None
        if kept is None or state is not kept:
            # Drop the KV cache now rather than when the consumer lets go of this generator.
            state.release()
    for row in rows:
        if row.index not in ended:  # stopped during the prefill, or an error
            yield _done(row, prep_s, prefill_s)


def _done(row: _Row, prep_s: float, prefill_s: float) -> DoneEvent:
    row.detok.flush()
    ttft = prep_s + row.step_times[0] if row.step_times else 0.0
    stats = _stats(len(row.prompt), len(row.generated), ttft, prefill_s, prep_s, row.step_times, row.peak)
    return DoneEvent(reason=row.reason, stats=stats, text=row.detok.text, token_ids=tuple(row.generated),
                     error=row.error, row=row.index)


def _run_beams(
    lm: LoadedModel, ids: list[int], dropped: tuple[int, ...], params: SamplingParams, clock: _Deadline,
    prep_s: float, lock: StepLock, chunk: int,
) -> Iterator[Event]:
    """Beam search on the decode state (the beams are its rows): a PrefillEvent, then a ProgressEvent per step
    carrying the best running beam's text, then the answer's tokens (each with its beam transition probability
    as its only stage) and a DoneEvent. Stop and the time limit end it within a step, with the best beam so far."""
    device = lm.device
    stops = lm.eos_token_ids | lm.stop_token_ids
    state = new_state(lm)
    reason, error, best, steps = "max_tokens", None, None, []
    prefill_s, started = 0.0, now(device)
    try:
        t0 = now(device)
        logits, early = prefill(lm, state, [ids], lock, chunk, clock.reason)
        prefill_s = now(device) - t0
        mem = memory_sample(device)
        yield PrefillEvent(prompt_ids=tuple(ids), prefill_seconds=prefill_s, dropped_turns=dropped, seed=None,
                           kv_cache_bytes=state.kv_bytes(), memory=mem)
        if early:
            reason = early
        else:
            last = now(device)
            for step in beam_search(lm, state, logits[0:1], params, stops, lock):
                t = now(device)  # one clock read (a device sync on CUDA) per step
                steps.append(t - last)
                last = t
                best = step.best
                yield ProgressEvent(phase="beam search", step=step.step, total=params.max_new_tokens,
                                    seconds=t - started, kv_cache_bytes=state.kv_bytes(),
                                    text=lm.tokenizer.decode(best.tokens, skip_special_tokens=True))
                if step.finished:
                    break
                early = clock.reason()
                if early:
                    reason = early
                    break
    except Exception as exc:
        reason, error = "error", _describe_error(lm, exc)
    kv = state.kv_bytes()
    state.release()
    new_ids = list(best.tokens) if best is not None else []
    probs = transition_probs(best) if best is not None else []
    mem = memory_sample(device)
    detok = IncrementalDetokenizer(lm.tokenizer)
    for i, token in enumerate(new_ids):
        ends = token in stops
        text = "" if ends else detok.push(token)
        if ends or i == len(new_ids) - 1:
            text += detok.flush()
        yield TokenEvent(step=i, token_id=token, text=text,
                         stages=(StageTopN(name="beam", token_ids=(token,), probs=(probs[i],),
                                           chosen_prob=probs[i]),),
                         step_seconds=steps[i] if i < len(steps) else 0.0, kv_cache_bytes=kv, memory=mem)
        if ends and reason == "max_tokens":
            reason = "eos" if token in lm.eos_token_ids else "stop_token"
    # Nothing is visible before the search ends, so the first token's time is the whole search.
    step_times = [prefill_s + (steps[0] if steps else 0.0)] + steps[1:len(new_ids)]
    stats = _stats(len(ids), len(new_ids), prep_s + sum(steps) + prefill_s, prefill_s, prep_s, step_times,
                   max(mem.used_bytes, mem.cuda_peak or 0))
    yield DoneEvent(reason=reason, stats=stats, text=detok.text, token_ids=tuple(new_ids), error=error)


def _stats(prompt_len: int, new_tokens: int, ttft: float, prefill_s: float, prep_s: float,
           step_times: list[float], peak: int) -> GenerationStats:
    """Stats of a finished run from its step times (step 0 includes the prefill)."""
    decode = sum(step_times[1:])
    return GenerationStats(
        prompt_tokens=prompt_len, new_tokens=new_tokens, ttft_seconds=ttft, prefill_seconds=prefill_s,
        prefill_tokens_per_s=prompt_len / prefill_s if prefill_s else 0.0,
        decode_tokens_per_s=(len(step_times) - 1) / decode if decode > 0 else 0.0,
        total_seconds=prep_s + sum(step_times), peak_memory_bytes=peak)


def _describe_error(lm: LoadedModel, exc: Exception) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return f"{lm.spec.name}: out of memory on {lm.device}; lower max_new_tokens or shorten the conversation"
    return f"{lm.spec.name}: {type(exc).__name__}: {exc}"


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
