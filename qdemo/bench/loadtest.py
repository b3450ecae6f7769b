"""`python -m qdemo loadtest`: the app on loopback, N concurrent gradio_client sessions streaming seeded chats.

Phases: (1) launch the app in this process on 127.0.0.1; (2) each session's chat once alone, in turn, for its
reference answer (the model loads during the first); (3) all N sessions at once, released together. Reports
completions, errors, time to first streamed text (p50/p95, queue wait included), aggregate tokens per second over
the concurrent phase, process RSS before and after, and whether every concurrent answer equals its solo answer
(same seed: any difference is cross-talk). Bounded: at most MAX_SESSIONS sessions and MAX_TOKENS tokens each,
and an overall deadline.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil
from gradio_client import Client
from transformers import AutoTokenizer  # noqa: F401  (imported here so the timing below excludes it)

from qdemo.models.loader import load_tokenizer
from qdemo.models.registry import Registry, load_registry
from qdemo.serving.limits import Limits
from qdemo.serving.pool import ModelPool
from qdemo.ui.app import build_app, queue_settings

MAX_SESSIONS, MAX_TOKENS = 64, 512
PROMPTS = ["Write a Python function that reverses a string.", "用一句话解释什么是 KV cache。",
           "What is a prime number?", "写一个冒泡排序。", "Explain recursion to a child.",
           "列出三种常见的排序算法。"]


@dataclass
class LoadResult:
    model: str
    sessions: int
    tokens: int
    concurrency: int
    completions: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[int] = field(default_factory=list)  # sessions whose concurrent answer differs from solo
    ttft_p50_s: float = 0.0
    ttft_p95_s: float = 0.0
    wall_s: float = 0.0
    generated_tokens: int = 0
    aggregate_tok_s: float = 0.0
    solo_tok_s: float = 0.0  # one session alone, for scale
    rss_start_mib: float = 0.0  # app up, no model loaded
    rss_warm_mib: float = 0.0  # after the solo runs (model loaded)
    rss_end_mib: float = 0.0  # after the concurrent phase

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def _stream(url: str, prompt: str, settings: dict, deadline: float) -> tuple[str, float]:
    """(final text, seconds to the first streamed text) for one chat in its own session."""
    client = Client(url, verbose=False)
    start = time.perf_counter()
    job = client.submit(prompt, [], "", settings, None, api_name="/chat")
    first = None
    while not job.done():
        if time.perf_counter() > deadline:
            job.cancel()
            raise TimeoutError("deadline passed")
        if first is None and job.outputs():
            first = time.perf_counter() - start
        time.sleep(0.005)
    text = job.result()
    return text, first if first is not None else time.perf_counter() - start


def run_loadtest(sessions: int, model: str | None = None, registry_path: str | None = None, tokens: int = 32,
                 concurrency: int | None = None, timeout_s: float = 900.0, device: str | None = None,
                 log=print) -> LoadResult:
    """The module's three phases with `sessions` sessions of `tokens` new tokens each, bounded by `timeout_s`."""
    _check_bounds(sessions, tokens)
    registry = load_registry(registry_path)
    name = model or registry.default
    spec = registry.get(name)
    limits = Limits.from_env(concurrency=concurrency, requests_per_minute=10 * MAX_SESSIONS)
    result = LoadResult(model=name, sessions=sessions, tokens=tokens, concurrency=limits.concurrency)
    pool = ModelPool(registry, device)
    demo = build_app(registry, device=device, default=name, limits=limits, pool=pool)
    demo.queue(**queue_settings(limits)).launch(server_name="127.0.0.1", server_port=None,
                                                prevent_thread_lock=True, quiet=True)
    deadline = time.perf_counter() + timeout_s
    try:
        url = demo.local_url
        result.rss_start_mib = _rss_mib()

        # Load the model with a one-token request, so solo timings are of generation only.
        _stream(url, "hi", {"max_new_tokens": 1}, deadline)
        log("model loaded")
        jobs = [(PROMPTS[i % len(PROMPTS)], {**spec.sampling.to_dict(), "seed": 1000 + i, "max_new_tokens": tokens,
                                              "num_beams": 1}) for i in range(sessions)]
        solo = _solo_phase(url, jobs, deadline, result, registry, name, log)
        result.rss_warm_mib = _rss_mib()
        answers, ttfts = _concurrent_phase(url, jobs, deadline, result)
        result.rss_end_mib = _rss_mib()
        _summarise(result, solo, answers, ttfts, registry, name)
    finally:
        demo.close()
        for loaded in pool.loaded():  # free the weights now: the next run in this process starts clean
            pool.unload(loaded)
    return result


def _check_bounds(sessions: int, tokens: int) -> None:
    if not 1 <= sessions <= MAX_SESSIONS:
        raise ValueError(f"sessions must be from 1 to {MAX_SESSIONS}, got {sessions}")
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be from 1 to {MAX_TOKENS}, got {tokens}")


def _solo_phase(url: str, jobs: list[tuple[str, dict]], deadline: float, result: LoadResult, registry: Registry,
                name: str, log: Callable[[str], object]) -> list[str | None]:
    """Each session's chat alone, in turn: its reference answer (None where it failed, with the error in
    `result`), and the first one's rate as `result.solo_tok_s`."""
    solo: list[str | None] = []
    for i, (prompt, settings) in enumerate(jobs):
        started = time.perf_counter()
        try:
            solo.append(_stream(url, prompt, settings, deadline)[0])
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            solo.append(None)
            result.errors.append(f"solo {i}: {type(exc).__name__}: {exc}")
        if i == 0:  # end to end like the concurrent phase: client set-up, queue, prefill and decode
            elapsed = time.perf_counter() - started
            result.solo_tok_s = count_tokens(registry, name, solo[-1] or "") / elapsed
        log(f"solo {i + 1}/{len(jobs)} done")
    return solo


def _concurrent_phase(url: str, jobs: list[tuple[str, dict]], deadline: float, result: LoadResult
                      ) -> tuple[dict[int, str], dict[int, float]]:
    """All sessions at once, released together by a barrier: (answers, seconds to first text) by session, what
    finished before the deadline; `result.wall_s` is the phase's wall time and failures go to `result.errors`."""
    answers: dict[int, str] = {}
    ttfts: dict[int, float] = {}
    barrier = threading.Barrier(len(jobs))

    def session(i: int) -> None:
        prompt, settings = jobs[i]
        barrier.wait()
        try:
            answers[i], ttfts[i] = _stream(url, prompt, settings, deadline)
        except Exception as exc:  # noqa: BLE001
            result.errors.append(f"session {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(len(jobs))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    result.wall_s = time.perf_counter() - started
    return answers, ttfts


def _summarise(result: LoadResult, solo: list[str | None], answers: dict[int, str], ttfts: dict[int, float],
               registry: Registry, name: str) -> None:
    """The concurrent phase's figures: completions, answers that differ from solo, TTFT percentiles, tokens."""
    result.completions = len(answers)
    result.mismatches = sorted(i for i, text in answers.items() if solo[i] is not None and text != solo[i])
    if ttfts:
        values = list(ttfts.values())
        result.ttft_p50_s, result.ttft_p95_s = percentile(values, 50), percentile(values, 95)
    result.generated_tokens = sum(count_tokens(registry, name, text) for text in answers.values())
    result.aggregate_tok_s = result.generated_tokens / result.wall_s if result.wall_s else 0.0


_TOKENIZERS: dict[str, Any] = {}


def count_tokens(registry, name: str, text: str) -> int:
    """Tokens in an answer (re-tokenized: the API returns text)."""
    if name not in _TOKENIZERS:
        spec = registry.get(name)
        local = getattr(spec.source, "tokenizer", None) if spec.source.describe().startswith("remote") else name
        if local is None:
            raise ValueError(f"{name}: counting tokens of a remote entry needs source.openai.tokenizer")
        _TOKENIZERS[name] = load_tokenizer(registry.get(local))
    return len(_TOKENIZERS[name](text, add_special_tokens=False)["input_ids"])


def format_result(r: LoadResult) -> str:
    rows = [
        ("model / sessions", f"{r.model} / {r.sessions} concurrent (app concurrency {r.concurrency}), "
                             f"{r.tokens} new tokens each, seeded sampling"),
        ("completions / errors", f"{r.completions} / {len(r.errors)}"),
        ("same text as solo", f"{r.completions - len(r.mismatches)} of {r.completions}"
                              + (f" (differ: {r.mismatches})" if r.mismatches else "")),
        ("TTFT p50 / p95", f"{r.ttft_p50_s:.2f} s / {r.ttft_p95_s:.2f} s (queue wait included)"),
        ("aggregate decode", f"{r.aggregate_tok_s:.1f} tok/s ({r.generated_tokens} tokens in {r.wall_s:.1f} s); "
                             f"one session alone {r.solo_tok_s:.1f} tok/s"),
        ("RSS start / warm / end", f"{r.rss_start_mib:.0f} / {r.rss_warm_mib:.0f} / {r.rss_end_mib:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"  error: {e}" for e in r.errors[:10]]
    return "\n".join(lines)
