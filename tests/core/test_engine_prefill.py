"""Chunked prefill: a long prompt is prefilled a chunk per turn at the step gate, so another user's steps go in
between, Stop and the time limit act between chunks, and the tokens are those of a one-forward prefill."""

from __future__ import annotations

import contextlib
import threading

import pytest

from qdemo.core.engine import collect, generate
from qdemo.forwards.gate import StepGate
from qdemo.sampling import SamplingParams

LONG = list(range(5, 150))  # 145 prompt tokens


def test_chunked_prefill_gives_the_same_tokens_as_one_forward(tiny_lm):
    for params in (SamplingParams(max_new_tokens=12),
                   SamplingParams(do_sample=True, temperature=0.9, top_k=30, seed=4, max_new_tokens=12)):
        whole = collect(generate(tiny_lm, input_ids=LONG, params=params, prefill_chunk=10_000, ignore_eos=True))
        chunked = collect(generate(tiny_lm, input_ids=LONG, params=params, prefill_chunk=16, ignore_eos=True))
        assert [t.token_id for t in chunked["tokens"]] == [t.token_id for t in whole["tokens"]]
        for a, b in zip(chunked["tokens"], whole["tokens"]):
            assert a.stages[0].probs == pytest.approx(b.stages[0].probs, abs=1e-5)
        assert chunked["prefill"].kv_cache_bytes == whole["prefill"].kv_cache_bytes


class RecordingLock:
    """A step lock that records who stepped, in order, and can act after the n-th step."""

    def __init__(self, name: str, log: list, gate: StepGate, after=None):
        self.name, self.log, self.gate, self.after, self.count = name, log, gate, after, 0

    @contextlib.contextmanager
    def __call__(self):
        with self.gate.step():
            self.count += 1
            self.log.append(self.name)
            yield
        if self.after is not None:
            self.after(self.count)


def test_stop_during_a_long_prefill_ends_within_one_chunk(tiny_lm):
    stop = threading.Event()
    log: list = []
    lock = RecordingLock("long", log, StepGate(), after=lambda n: stop.set() if n == 2 else None)
    run = collect(generate(tiny_lm, input_ids=LONG, params=SamplingParams(max_new_tokens=5), prefill_chunk=16,
                           stop_event=stop, step_lock=lock))
    assert run["done"].reason == "stopped" and run["tokens"] == [] and len(log) == 2  # of 10 chunks
    assert run["prefill"].prompt_ids == tuple(LONG)


def test_time_limit_ends_prefill_and_decode(tiny_lm):
    run = collect(generate(tiny_lm, input_ids=LONG, params=SamplingParams(max_new_tokens=50), prefill_chunk=16,
                           time_limit_s=0.0))
    assert run["done"].reason == "time_limit" and run["tokens"] == []
    short = collect(generate(tiny_lm, input_ids=[5, 6], params=SamplingParams(max_new_tokens=50), time_limit_s=0.0,
                             ignore_eos=True))
    assert short["done"].reason == "time_limit" and len(short["tokens"]) == 1


def test_a_short_request_steps_between_the_chunks_of_a_long_one(tiny_lm):
    """Two users on one model: the short chat's prefill and first tokens come before the long prompt's prefill
    has finished, instead of waiting for all of it."""
    gate = StepGate()  # the pool's FIFO gate: whoever asked first steps first
    log: list = []
    started = threading.Event()
    long_lock = RecordingLock("long", log, gate, after=lambda n: started.set())
    short_lock = RecordingLock("short", log, gate)
    results = {}

    def run(name, ids, lock):
        results[name] = collect(generate(tiny_lm, input_ids=ids, params=SamplingParams(max_new_tokens=3),
                                         prefill_chunk=8, step_lock=lock, ignore_eos=True))

    long_thread = threading.Thread(target=run, args=("long", LONG, long_lock))
    long_thread.start()
    started.wait(10)
    short_thread = threading.Thread(target=run, args=("short", [5, 6, 7], short_lock))
    short_thread.start()
    long_thread.join()
    short_thread.join()
    long_prefill_end = [i for i, who in enumerate(log) if who == "long"][18]  # 145 tokens / 8 = 19 chunks
    first_short = log.index("short")
    assert first_short < long_prefill_end, log
    assert len(results["short"]["tokens"]) == 3 and len(results["long"]["tokens"]) == 3
