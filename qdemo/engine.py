"""The generation core: one generator of events that every tab consumes.

It knows nothing of Gradio. Contract: `generate(...)` validates its inputs eagerly (ValueError naming
the field), then returns an iterator that yields one PrefillEvent, a TokenEvent per generated token
(an ending eos/stop token included, with empty text) and exactly one DoneEvent. Beam search first yields a
ProgressEvent per search step (its tokens are only known at the end).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from qdemo.chain import run_chain, summarise
from qdemo.errors import PromptTooLongError
from qdemo.events import DoneEvent, Event, GenerationStats, PrefillEvent, ProgressEvent, StageTopN, TokenEvent
from qdemo.loader import LoadedModel
from qdemo.metrics import kv_cache_bytes, memory_sample, now
from qdemo.prompting import build_prompt
from qdemo.sampling import SamplingParams, build_stages
from qdemo.textstream import IncrementalDetokenizer

StepLock = Callable[[], ContextManager[Any]]


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
    """
    started = time.perf_counter()
    params = params if params is not None else lm.spec.sampling
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be an integer >= 0, got {top_n!r}")
    if (messages is None) == (input_ids is None):
        raise ValueError("pass exactly one of messages or input_ids")
    chunk = default_prefill_chunk(lm.device) if prefill_chunk is None else prefill_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill_chunk must be an integer >= 1, got {chunk!r}")
    if messages is not None:
        prompt = build_prompt(lm.tokenizer, messages, lm.max_context, params.max_new_tokens,
                              lm.spec.system_prompt, lm.spec.name, lm.family.build_prompt)
        ids, dropped = prompt.ids, prompt.dropped_turns
    else:
        ids, dropped = _check_ids(lm, input_ids, params), tuple(int(i) for i in dropped_turns)
    prep_s = time.perf_counter() - started
    lock = step_lock or contextlib.nullcontext
    clock = _Deadline(started, time_limit_s, stop_event)
    if params.beam_search:
        return _run_beams(lm, ids, dropped, params, clock, prep_s, lock)
    return _run(lm, ids, dropped, params, clock, top_n, ignore_eos, prep_s, lock, chunk)


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
    ids = [int(t) for t in input_ids]
    vocab = lm.model.get_input_embeddings().num_embeddings
    if not ids:
        raise ValueError("input_ids is empty")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"input_ids contains {bad[0]}, outside the vocabulary of {lm.spec.name} (0..{vocab - 1})")
    budget = lm.max_context - params.max_new_tokens
    if len(ids) > budget:
        raise PromptTooLongError(f"{lm.spec.name}: {len(ids)} prompt tokens exceed the {budget} that fit "
                                 "(max_context − max_new_tokens)")
    return ids


def _run(
    lm: LoadedModel, ids: list[int], dropped: tuple[int, ...], params: SamplingParams, clock: _Deadline,
    top_n: int, ignore_eos: bool, prep_s: float, lock: StepLock, chunk: int,
) -> Iterator[Event]:
    # 1. Set-up: buffers sized once so the decode loop never concatenates.
    device, model = lm.device, lm.model
    stages = build_stages(params)
    seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(31))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    prompt_len, limit = len(ids), params.max_new_tokens
    seq = torch.empty((1, prompt_len + limit), dtype=torch.long, device=device)
    seq[0, :prompt_len] = torch.tensor(ids, dtype=torch.long)
    mask = torch.ones((1, prompt_len + limit), dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    detok = IncrementalDetokenizer(lm.tokenizer)
    eos, stops = lm.eos_token_ids, lm.stop_token_ids
    generated: list[int] = []
    step_times: list[float] = []
    peak = 0
    reason, error = "max_tokens", None
    prefill_s = 0.0

    def done() -> DoneEvent:
        ttft = prep_s + step_times[0] if step_times else 0.0
        stats = _stats(prompt_len, len(generated), ttft, prefill_s, prep_s, step_times, peak)
        return DoneEvent(reason=reason, stats=stats, text=detok.text, token_ids=tuple(generated), error=error)

    try:
        # 2. Prefill in chunks, each its own turn at the gate; the last chunk's logits choose the first token.
        queued = now(device)
        logits = None
        for start in range(0, prompt_len, chunk):
            end = min(prompt_len, start + chunk)
            with lock():
                t0 = now(device)
                logits = _forward(model, seq[:, start:end], mask[:, :end], cache, cache_kw)
                prefill_s += now(device) - t0
            early = clock.reason() if end < prompt_len else None
            if early:
                reason = early
                break
        waited = now(device) - queued
        mem = memory_sample(device)
        peak = max(peak, mem.used_bytes, mem.cuda_peak or 0)
        yield PrefillEvent(prompt_ids=tuple(ids), prefill_seconds=prefill_s, dropped_turns=dropped, seed=seed,
                           kv_cache_bytes=kv_cache_bytes(cache), memory=mem)
        # Time the consumer spends on the PrefillEvent is not ours; time waiting for the model is (TTFT).
        step_start = now(device) - waited
        # 3. Decode: choose, report, stop or feed the token back (nothing left to do when the prefill was cut).
        for step in range(limit if reason == "max_tokens" else 0):
            length = prompt_len + step
            token, snapshots = _choose(logits, seq[:, :length], stages, generator, top_n, params.greedy)
            seq[0, length] = token
            generated.append(token)
            ends = not ignore_eos and (token in eos or token in stops)
            text = "" if ends else detok.push(token)
            if ends or step == limit - 1:
                text += detok.flush()
            step_times.append(now(device) - step_start)
            mem = memory_sample(device)
            peak = max(peak, mem.used_bytes, mem.cuda_peak or 0)
            yield TokenEvent(step=step, token_id=token, text=text, stages=snapshots, step_seconds=step_times[-1],
                             kv_cache_bytes=kv_cache_bytes(cache), memory=mem)
            if ends:
                reason = "eos" if token in eos else "stop_token"
                break
            if step == limit - 1:
                break
            early = clock.reason()
            if early:
                reason = early
                break
            step_start = now(device)  # waiting for the lock counts: it is the latency this user sees
            with lock():
                logits = _forward(model, seq[:, length:length + 1], mask[:, :length + 1], cache, cache_kw)
    except Exception as exc:  # reported to the consumer; the stream still ends with a DoneEvent
        reason, error = "error", _describe_error(lm, exc)
    finally:
        # Drop the KV cache now rather than when the consumer lets go of this generator.
        cache = None
        logits = None
    yield done()


@torch.inference_mode()
def _forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, cache_kw: str) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    # fp32 copy as generate() makes, so processors see the same numbers.
    return out.logits[:, -1, :].to(copy=True, dtype=torch.float32)


@torch.inference_mode()
def _choose(
    logits: torch.Tensor, seq: torch.Tensor, stages, generator, top_n: int, greedy: bool
) -> tuple[int, tuple[StageTopN, ...]]:
    """Run the processor chain, pick the token, and summarise each stage's top-N.
    Only the top-N of each stage (and the chosen token's probabilities) leave the device."""
    scores, names, stage_probs = run_chain(logits, seq, stages, keep=top_n > 0)
    if greedy:
        token = torch.argmax(scores, dim=-1)
    else:
        probs = stage_probs[-1] if top_n else torch.softmax(scores, dim=-1)
        token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    if not top_n:
        return int(token.item()), ()
    return summarise(names, stage_probs, token, top_n)


class _BeamClock(StoppingCriteria):
    """Times every beam step, reports it, and ends the search on Stop, at the time limit, or when the consumer
    went away (within one step)."""

    def __init__(self, device: torch.device, deadline: _Deadline, report: Callable[[int], None]) -> None:
        self.device, self.deadline, self.report, self.times = device, deadline, report, []
        self.abandoned = threading.Event()
        self.ended_by: str | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(now(self.device))
        self.report(len(self.times))
        self.ended_by = self.ended_by or self.deadline.reason()
        stop = self.abandoned.is_set() or self.ended_by is not None
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@dataclass
class _BeamResult:
    new_ids: list[int] = field(default_factory=list)
    step_probs: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    error: str | None = None


def _run_beams(
    lm: LoadedModel, ids: list[int], dropped: tuple[int, ...], params: SamplingParams, deadline: _Deadline,
    prep_s: float, lock: StepLock,
) -> Iterator[Event]:
    """Beam search is transformers' own (the best beam can change until the end, so no token streams): it runs
    in a worker thread while this generator reports its progress each step; the tokens arrive when the search
    ends, each with its beam transition probability as its only stage."""
    device, model = lm.device, lm.model
    steps_done: "queue.Queue[int]" = queue.Queue()
    clock = _BeamClock(device, deadline, steps_done.put)
    stops = lm.eos_token_ids | lm.stop_token_ids
    pad = _pad_id(lm)
    result = _BeamResult()
    t0 = now(device)

    def search() -> None:
        try:
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            with lock(), torch.inference_mode():  # one search holds the model: beams do not interleave
                out = model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                    num_beams=params.num_beams, max_new_tokens=params.max_new_tokens,
                    repetition_penalty=params.repetition_penalty, eos_token_id=sorted(stops), pad_token_id=pad,
                    stopping_criteria=StoppingCriteriaList([clock]), output_scores=True,
                    return_dict_in_generate=True, length_penalty=1.0, early_stopping=False)
                result.new_ids = out.sequences[0, len(ids):].tolist()
                result.kv_bytes = kv_cache_bytes(getattr(out, "past_key_values", None))
                transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices,
                                                             normalize_logits=False)
                result.step_probs = torch.exp(transition[0, :len(result.new_ids)].float()).tolist()
            while result.new_ids and result.new_ids[-1] == pad and pad not in stops:
                result.new_ids.pop()
        except Exception as exc:
            result.error = _describe_error(lm, exc)
        finally:
            steps_done.put(-1)

    worker = threading.Thread(target=search, name=f"beam-search-{lm.spec.name}", daemon=True)
    worker.start()
    try:
        while True:
            step = steps_done.get()
            if step < 0:
                break
            yield ProgressEvent(phase="beam search", step=step, total=params.max_new_tokens,
                                seconds=time.perf_counter() - t0)
    finally:
        clock.abandoned.set()  # a consumer that closed us early ends the search within a step
        worker.join()
    reason, error, new_ids, step_probs = ("error" if result.error else "max_tokens"), result.error, \
        result.new_ids, result.step_probs
    mem = memory_sample(device)
    times = [t0] + clock.times
    steps = [b - a for a, b in zip(times, times[1:])][:len(new_ids)]
    prefill_s = steps[0] if steps else 0.0
    yield PrefillEvent(prompt_ids=tuple(ids), prefill_seconds=prefill_s, dropped_turns=dropped, seed=None,
                       kv_cache_bytes=result.kv_bytes, memory=mem)
    detok = IncrementalDetokenizer(lm.tokenizer)
    for step, token in enumerate(new_ids):
        ends = token in stops
        text = "" if ends else detok.push(token)
        if ends or step == len(new_ids) - 1:
            text += detok.flush()
        prob = step_probs[step] if step < len(step_probs) else float("nan")
        yield TokenEvent(step=step, token_id=token, text=text,
                         stages=(StageTopN(name="beam", token_ids=(token,), probs=(prob,), chosen_prob=prob),),
                         step_seconds=steps[step] if step < len(steps) else 0.0, kv_cache_bytes=result.kv_bytes,
                         memory=mem)
        if ends:
            reason = "eos" if token in lm.eos_token_ids else "stop_token"
            break
    if reason == "max_tokens" and clock.ended_by and len(new_ids) < params.max_new_tokens:
        reason = clock.ended_by
    # Nothing is visible before the search ends, so the first token's time is the whole search.
    stats = _stats(len(ids), len(new_ids), prep_s + sum(steps), prefill_s, prep_s, steps,
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


def _pad_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return int(pad) if pad is not None else min(lm.eos_token_ids)


def _cache_kwarg(model) -> str:
    # transformers 5.2x names the argument `cache`; earlier releases call it `past_key_values`.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
