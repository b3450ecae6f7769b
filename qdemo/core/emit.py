"""One emission path: a chosen token becomes the events every tab reads.

Plain runs, forked rows, left-padded batches, speculative rounds and beam search differ in how they choose tokens,
never in what happens once one is chosen. That is here, once (as vLLM has one output processor and llama.cpp one
sample-and-accept): an `Emitter` per row detokenizes, applies the stop rules, times and measures, and builds the
row's PrefillEvent, TokenEvents and its one DoneEvent; a `Deadline` shared by the rows is the clock (the user's
Stop and the server's time limit); `fail`, `end_early` and `finish` apply to all of a run's rows at once.

Stop rules (the reason words the UI and tests read): eos → "eos", the family's other stop tokens → "stop_token",
max_new_tokens reached → "max_tokens", Stop → "stopped", the time limit → "time_limit", an exception → "error".
The first reason a row gets is the one it keeps; only an error overrides it, until the row's DoneEvent is out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from qdemo.core.events import DoneEvent, GenerationStats, MemorySample, PrefillEvent, StageTopN, TokenEvent
from qdemo.core.textstream import IncrementalDetokenizer
from qdemo.models.loader import LoadedModel


@dataclass
class Deadline:
    """Why a run should end early, if it should: the user's Stop or the server's time limit. One per run, read once
    per step (or prefill chunk) for all its rows."""

    started: float
    limit_s: float | None
    stop_event: threading.Event | None

    def reason(self) -> str | None:
        if self.stop_event is not None and self.stop_event.is_set():
            return "stopped"
        if self.limit_s is not None and time.perf_counter() - self.started >= self.limit_s:
            return "time_limit"
        return None


@dataclass
class Emitter:
    """One row's answer as events: its tokens, text, timings and why it ended."""

    index: int  # the row events carry
    prompt: tuple[int, ...]
    seed: int | None  # reported in the PrefillEvent (None for greedy runs)
    max_new_tokens: int
    detok: IncrementalDetokenizer
    eos: frozenset[int]
    ending: frozenset[int]  # tokens that end the answer: eos and the family's stop tokens; none with ignore_eos
    prep_s: float  # prompt building and checks before the run started
    prefill_s: float = 0.0
    generated: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    reason: str | None = None  # None while the row runs (and at its end: "max_tokens")
    error: str | None = None
    peak: int = 0
    draft_proposed: int = 0  # speculative decoding: tokens the draft proposed for this row …
    draft_accepted: int = 0  # … and how many the target kept
    closed: bool = False  # the DoneEvent is out: nothing changes the row any more
    ttft_s: float | None = None  # set when the first token was visible later than after its own step
    lead_s: float = 0.0  # time before the first step that step 0's stats include but its event does not
    reused: int = 0  # prompt tokens a kept cache already held: not prefilled, so not in the prefill rate

    def prefill_event(self, prefill_s: float, kv: int, memory: MemorySample, dropped: tuple[int, ...] = (),
                      reused: int = 0, allocated: int = 0) -> PrefillEvent:
        """The row's PrefillEvent; the prefill's time and memory count towards its stats. `kv`: the row's keys and
        values in use; `allocated`: the cache's memory, in use or not."""
        self.prefill_s, self.reused = prefill_s, reused
        self.peak = max(memory.used_bytes, memory.cuda_peak or 0)
        return PrefillEvent(prompt_ids=self.prompt, prefill_seconds=prefill_s, dropped_turns=dropped, seed=self.seed,
                            kv_cache_bytes=kv, memory=memory, row=self.index, reused_tokens=reused,
                            kv_allocated_bytes=allocated)

    def emit(self, token: int, stages: tuple[StageTopN, ...], seconds: float, kv: int, memory: MemorySample,
             drafted: bool = False, last: bool = False, allocated: int = 0) -> tuple[TokenEvent, bool]:
        """A chosen token's TokenEvent, and whether the row has ended with it (a stop token or its length).
        An ending token shows no text; the text held back for an incomplete character goes out with the row's
        last token. `last`: the caller knows no token follows (beam search's answer ends here)."""
        self.generated.append(token)
        stops = token in self.ending
        ended = stops or last or len(self.generated) >= self.max_new_tokens
        text = "" if stops else self.detok.push(token)
        if ended:
            text += self.detok.flush()
            if stops and self.reason is None:
                self.reason = "eos" if token in self.eos else "stop_token"
        self.step_times.append(seconds)
        self.peak = max(self.peak, memory.used_bytes, memory.cuda_peak or 0)
        event = TokenEvent(step=len(self.generated) - 1, token_id=token, text=text, stages=stages,
                           step_seconds=seconds, kv_cache_bytes=kv, memory=memory, row=self.index, drafted=drafted,
                           kv_allocated_bytes=allocated)
        return event, ended

    def end(self, reason: str) -> None:
        """End the row for `reason` (Stop, the time limit) unless it already has one."""
        if self.reason is None:
            self.reason = reason

    def fail(self, error: str) -> None:
        """A forward or a step failed: the row ends with reason "error" unless its DoneEvent is already out."""
        if not self.closed:
            self.reason, self.error = "error", error

    def shown_at_end(self, prefill_s: float, search_s: float, memory: MemorySample) -> None:
        """Beam search: nothing is visible before the search ends, so the first token's time is the whole search
        and step 0 includes the prefill (as a plain run's first step does); the last reading counts to the peak."""
        self.ttft_s = self.prep_s + prefill_s + search_s
        self.lead_s = prefill_s
        self.peak = max(self.peak, memory.used_bytes, memory.cuda_peak or 0)

    def done(self) -> DoneEvent:
        """The row's DoneEvent (once): the whole text, the tokens, why it ended and its stats."""
        self.closed = True
        self.detok.flush()
        times = self.step_times
        if self.lead_s:
            times = [(times[0] if times else 0.0) + self.lead_s] + times[1:]
        ttft = self.ttft_s if self.ttft_s is not None else (self.prep_s + times[0] if times else 0.0)
        stats = _stats(len(self.prompt), len(self.generated), ttft, self.prefill_s, self.prep_s, times, self.peak,
                       self.draft_proposed, self.draft_accepted, self.reused)
        return DoneEvent(reason=self.reason or "max_tokens", stats=stats, text=self.detok.text,
                         token_ids=tuple(self.generated), error=self.error, row=self.index)


def new_emitter(lm: LoadedModel, index: int, prompt: Sequence[int], max_new_tokens: int, seed: int | None,
                ignore_eos: bool, prep_s: float) -> Emitter:
    """A row's emitter with `lm`'s tokenizer and stop tokens (none with ignore_eos: a fixed length)."""
    ending = frozenset() if ignore_eos else lm.eos_token_ids | lm.stop_token_ids
    return Emitter(index=index, prompt=tuple(prompt), seed=seed, max_new_tokens=max_new_tokens,
                   detok=IncrementalDetokenizer(lm.tokenizer), eos=lm.eos_token_ids, ending=ending, prep_s=prep_s)


def end_early(clock: Deadline, rows: Sequence[Emitter]) -> bool:
    """Read the clock once for a step's running rows; on Stop or the time limit end them all (True)."""
    reason = clock.reason() if rows else None
    for row in rows if reason else ():
        row.end(reason)
    return reason is not None


def fail(rows: Sequence[Emitter], lm: LoadedModel, exc: Exception) -> None:
    """An exception reaches the consumer as a DoneEvent: every row still open ends with reason "error"."""
    error = describe_error(lm, exc)
    for row in rows:
        row.fail(error)


def finish(rows: Sequence[Emitter]) -> Iterator[DoneEvent]:
    """The DoneEvents of the rows that have none yet (stopped during the prefill, failed, or never run)."""
    for row in rows:
        if not row.closed:
            yield row.done()


def describe_error(lm: LoadedModel, exc: Exception) -> str:
    """What the user reads for a failed run: the model's name, and for running out of memory what to change."""
    if isinstance(exc, torch.OutOfMemoryError):
        return f"{lm.spec.name}: out of memory on {lm.device}; lower max_new_tokens or shorten the conversation"
    return f"{lm.spec.name}: {type(exc).__name__}: {exc}"


def _stats(prompt_len: int, new_tokens: int, ttft: float, prefill_s: float, prep_s: float,
           step_times: list[float], peak: int, proposed: int = 0, accepted: int = 0, reused: int = 0
           ) -> GenerationStats:
    """Stats of a finished run from its step times (step 0 includes the prefill). The prefill rate counts the tokens
    prefilled: a kept cache's `reused` ones took no time."""
    decode = sum(step_times[1:])
    return GenerationStats(
        prompt_tokens=prompt_len, new_tokens=new_tokens, ttft_seconds=ttft, prefill_seconds=prefill_s,
        prefill_tokens_per_s=(prompt_len - reused) / prefill_s if prefill_s else 0.0, reused_tokens=reused,
        decode_tokens_per_s=(len(step_times) - 1) / decode if decode > 0 else 0.0,
        total_seconds=prep_s + sum(step_times), peak_memory_bytes=peak, draft_proposed=proposed,
        draft_accepted=accepted)
