"""`python -m qdemo bench NAME --scenario ab [--forward llama.cpp]`: one-model Compare as the app runs it (its
pair runner in each mode, and the divergence report with its cross-probabilities) against its two sides as two
chats one after the other, alternating, medians; where the time goes (a two-row step against two one-row steps,
the cross-probabilities); and, on the llama.cpp forward, the aggregate llama-server's parallel slots reach on the
same GGUF (the ceiling for two sequences on this CPU)."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from qdemo.bench.forwards import Server
from qdemo.bench.llama_server import server_binary
from qdemo.core.engine import collect
from qdemo.forwards.gate import StepGate
from qdemo.models.loader import LoadedModel
from qdemo.models.sources import gguf_file
from qdemo.sampling import SamplingParams
from qdemo.services.chat import run_record
from qdemo.services.compare import ONE_AFTER_THE_OTHER, ROWS, divergence_report, pair_mode, run_pair
from qdemo.serving.local import LocalBackend

CODE_PROMPT = "Write a Python function that parses an ISO 8601 date string and returns a datetime, with tests."


def _compare(backend: LocalBackend, sides: tuple[SamplingParams, SamplingParams], mode: str
             ) -> tuple[float, float, tuple[int, int]]:
    """One Compare to its end in `mode`: (seconds for both answers and the report, of which the report's, the
    tokens of each side)."""
    messages = [{"role": "user", "content": CODE_PROMPT}]
    run_a, run_b = run_record(backend, sides[0], 1, "A"), run_record(backend, sides[1], 2, "B")
    state = backend.new_state()
    try:
        t0 = time.perf_counter()
        for _ in run_pair(backend, backend, messages, sides[0], sides[1], run_a, run_b, top_n=20,
                          states=(state, None), mode=mode):
            pass
        t1 = time.perf_counter()
        divergence_report(backend, backend, run_a, run_b, sides[0], sides[1], (state, None))
        t2 = time.perf_counter()
    finally:
        state.release()
    return t2 - t0, t2 - t1, (len(run_a.tokens), len(run_b.tokens))


def _two_chats(backend: LocalBackend, sides: tuple[SamplingParams, SamplingParams]) -> float:
    """The two sides as a user would run them without Compare: two chats, each prefilling its prompt."""
    t0 = time.perf_counter()
    for params in sides:
        collect(backend.generate(messages=[{"role": "user", "content": CODE_PROMPT}], params=params, top_n=20))
    return time.perf_counter() - t0


def ab(lm: LoadedModel, runs: int = 3, tokens: int = 48) -> dict[str, Any]:
    backend = LocalBackend(lm, StepGate())
    sides = (SamplingParams(max_new_tokens=tokens),
             SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, seed=1, max_new_tokens=tokens))
    _compare(backend, sides, ROWS)  # warm-up, and a few steps of each row count for the chooser
    _two_chats(backend, sides)
    columns: dict[str, Callable[[], float]] = {
        "Compare, two rows in one batch": lambda: _compare(backend, sides, ROWS)[0],
        "Compare, one after the other": lambda: _compare(backend, sides, ONE_AFTER_THE_OTHER)[0],
        "two chats one after the other": lambda: _two_chats(backend, sides),
    }
    seen: dict[str, list[float]] = {k: [] for k in columns}
    order = list(columns)
    for r in range(runs):
        for key in (order if r % 2 == 0 else order[::-1]):
            seen[key].append(columns[key]())
    chosen = pair_mode(backend, backend, *sides)
    auto = _compare(backend, sides, chosen)
    med = {k: statistics.median(v) for k, v in seen.items()}
    chats = med["two chats one after the other"]
    picked = med["Compare, two rows in one batch" if chosen == ROWS else "Compare, one after the other"]
    result = {"scenario": "ab", "model": lm.spec.name, "tokens": tokens, "side_tokens": auto[2], "runs": runs,
              "median_s": med,
              "runs_s": seen, "chosen": chosen, "speedup": chats / picked,
              "speedups": {k: chats / v for k, v in med.items() if k != "two chats one after the other"},
              "cross_probabilities_s": auto[1],
              "step_ms": {"one row": 1000 * (lm.step_costs.median(1) or float("nan")),
                          "two rows": 1000 * (lm.step_costs.median(2) or float("nan"))},
              "target": ">= 1.0 (Compare is never slower than its sides one after the other)"}
    if lm.forward == "llama.cpp":
        result["server_parallel"] = server_parallel(lm, tokens)
    return result


def server_parallel(lm: LoadedModel, tokens: int, slots: int = 2) -> dict[str, float] | None:
    """llama-server with `slots` parallel slots on the same GGUF and threads: `slots` concurrent completions against
    one, as aggregate tokens per second over one stream's."""
    binary = server_binary()
    if binary is None:
        return None
    server = Server.start(binary, gguf_file(lm.spec), lm.runner.weights.threads, parallel=slots,
                          context=4096 * slots)
    try:
        ids = lm.tokenizer(CODE_PROMPT, add_special_tokens=False)["input_ids"]
        server.complete(ids, 4)  # warm-up
        t0 = time.perf_counter()
        server.complete(ids, tokens)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(slots) as pool:
            list(pool.map(lambda _: server.complete(ids, tokens), range(slots)))
        many = time.perf_counter() - t0
    finally:
        server.stop()
    return {"slots": slots, "one_s": one, "parallel_s": many, "aggregate": slots * one / many}


def format_ab(r: dict[str, Any], head: str) -> str:
    lines = [head + f", A {r['side_tokens'][0]} and B {r['side_tokens'][1]} tokens (at most {r['tokens']} each)"]
    for key, seconds in r["median_s"].items():
        speed = r["speedups"].get(key)
        lines.append(f"  {key:32} {seconds:6.2f} s  runs [{', '.join(f'{x:.2f}' for x in r['runs_s'][key])}]"
                     + (f"  {speed:.2f}x the two chats" if speed else ""))
    steps = r["step_ms"]
    lines.append(f"  a two-row step {steps['two rows']:.1f} ms against two one-row steps {2 * steps['one row']:.1f} ms;"
                 f" the cross-probabilities {1000 * r['cross_probabilities_s']:.0f} ms")
    lines.append(f"  Compare here runs {r['chosen']}: {r['speedup']:.2f}x its sides as two chats (target {r['target']})")
    ceiling = r.get("server_parallel")
    if ceiling:
        lines.append(f"  llama-server, {ceiling['slots']} parallel slots on the same GGUF: {ceiling['aggregate']:.2f}x "
                     f"one stream's throughput ({ceiling['parallel_s']:.2f} s for {ceiling['slots']} vs "
                     f"{ceiling['one_s']:.2f} s for one): the ceiling for two rows on this CPU")
    return "\n".join(lines)
