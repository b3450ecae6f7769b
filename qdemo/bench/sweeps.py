"""`python -m qdemo bench NAME --scenario sweep [--forward llama.cpp]`: a 3×3 sampling sweep × 8 samples × 48
tokens as the Sweep runs it (rows of one batch after one shared prefill, in chunks) against the same 72 runs one
after the other (one row at a time from the same kept prefill), tokens per second of each; the step's cost by rows
(where the batch stops paying); and, on the llama.cpp forward, llama-server's aggregate throughput on the same GGUF
with as many parallel slots (-np) as the Sweep's rows a step, running the same 72 completions."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qdemo.bench.forwards import Server
from qdemo.bench.llama_server import server_binary
from qdemo.forwards.gate import StepGate
from qdemo.models.loader import LoadedModel
from qdemo.models.sources import gguf_file
from qdemo.sampling import SamplingParams
from qdemo.services.sweep import ROWS_PER_CHUNK, Grid, SweepProgress, read_grid, run_sweep
from qdemo.serving.local import LocalBackend

CONTEXT = "Write a four-line poem about the sea at night."
AXES = {"temperature": [0.5, 0.8, 1.1], "top_p": [0.8, 0.9, 1.0]}
ROW_COUNTS = (1, 2, 4, 7, 8)  # rows a step, for the cost-by-rows table
PROBE_TOKENS = 12  # tokens a probe sweep decodes to time a step of its row count


def _timed(backend: LocalBackend, ids: list[int], base: SamplingParams, grid: Grid, rows: int
           ) -> tuple[float, int, SweepProgress]:
    """One whole sweep at `rows` rows a step from a fresh prefill: (seconds, tokens made, its result)."""
    state = backend.new_state()
    try:
        t0 = time.perf_counter()
        final = list(run_sweep(backend, ids, base, grid, state=state, rows_per_chunk=rows))[-1]
        seconds = time.perf_counter() - t0
    finally:
        state.release()
    return seconds, sum(len(r.events) for c in final.cells for r in c.rows if r is not None), final


def _agreement(batch: SweepProgress, alone: SweepProgress) -> dict[str, Any]:
    """How far the batch's rows equal the same rows run alone: rows token for token, and before the first token
    where a row parts from its solo run, the largest difference of a raw probability the two saw (a batch's
    kernels may round differently from a single row's, and a draw near a boundary then goes the other way)."""
    pairs = [(a, b) for ca, cb in zip(batch.cells, alone.cells) for a, b in zip(ca.rows, cb.rows)
             if a is not None and b is not None]
    same, parted, gap = 0, [], 0.0
    for a, b in pairs:
        ta, tb = a.sample.tokens, b.sample.tokens
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if first is None and len(ta) == len(tb):
            same += 1
        else:
            parted.append(first if first is not None else min(len(ta), len(tb)))
        for ea, eb in zip(a.events[:first], b.events[:first]):
            gap = max(gap, abs(ea.stages[0].chosen_prob - eb.stages[0].chosen_prob))
    return {"rows": len(pairs), "same_rows": same, "parted_at": sorted(parted), "max_raw_prob_gap": gap}


def _step_costs(lm: LoadedModel, backend: LocalBackend, ids: list[int], base: SamplingParams) -> dict[int, float]:
    """Median ms of a decode step of each row count (the engine's own step timer, inside the gate)."""
    for rows in ROW_COUNTS:
        probe = read_grid({"temperature": [0.8]}, samples=rows, seed=99)
        _timed(backend, ids, base.replace(max_new_tokens=PROBE_TOKENS), probe, rows)
    return {rows: 1000 * (lm.step_costs.median(rows) or float("nan")) for rows in ROW_COUNTS}


def sweep_bench(lm: LoadedModel, tokens: int = 48, samples: int = 8) -> dict[str, Any]:
    backend = LocalBackend(lm, StepGate())
    ids = backend.chat_prompt([{"role": "user", "content": CONTEXT}], tokens).ids
    base = SamplingParams(do_sample=True, top_k=40, max_new_tokens=tokens)
    grid = read_grid(AXES, samples=samples, seed=1)
    rows = min(backend.exact_rows(ROWS_PER_CHUNK), samples * 9)  # as the app
    _timed(backend, ids, base.replace(max_new_tokens=4), read_grid({"temperature": [0.8]}, 2, 0), 2)  # warm-up
    batch_s, batch_tokens, batch = _timed(backend, ids, base, grid, rows)
    alone_s, alone_tokens, alone = _timed(backend, ids, base, grid, 1)
    agreement = _agreement(batch, alone)
    result = {"scenario": "sweep", "model": lm.spec.name, "grid": "3x3", "samples": samples, "tokens": tokens,
              "runs": 9 * samples, "rows_per_step": rows, "prompt_tokens": len(ids), "same_samples": agreement["same_rows"] == 9 * samples,
              "agreement": agreement,
              "batch_s": batch_s, "batch_tok_s": batch_tokens / batch_s,
              "one_by_one_s": alone_s, "one_by_one_tok_s": alone_tokens / alone_s,
              "speedup": (batch_tokens / batch_s) / (alone_tokens / alone_s),
              "step_ms": _step_costs(lm, backend, ids, base),
              "target": ">= 1.3x one by one; >= 1.0x llama-server's parallel aggregate"}
    if lm.forward == "llama.cpp":
        server = server_aggregate(lm, ids, base, grid, rows)
        result["server"] = server
        if server:
            result["vs_server"] = result["batch_tok_s"] / server["aggregate_tok_s"]
    return result


def server_aggregate(lm: LoadedModel, ids: list[int], base: SamplingParams, grid: Grid, slots: int
                     ) -> dict[str, float] | None:
    """llama-server on the same GGUF and threads with `slots` parallel slots: the sweep's runs as completions,
    `slots` at a time (each with its cell's sampler and seed, n_probs 20 as the app's stages capture), against one
    stream alone."""
    binary = server_binary()
    if binary is None:
        return None
    runs = [base.replace(seed=grid.seed + i, **cell) for i, cell in enumerate(
        c for c in grid.cells() for _ in range(grid.samples))]
    server = Server.start(binary, gguf_file(lm.spec), lm.runner.weights.threads, parallel=slots,
                          context=1024 * slots)
    try:
        server.complete(ids, 4)  # warm-up
        t0 = time.perf_counter()
        server.complete(ids, base.max_new_tokens, sampling=runs[0])
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(slots) as pool:
            list(pool.map(lambda p: server.complete(ids, base.max_new_tokens, sampling=p), runs))
        many = time.perf_counter() - t0
    finally:
        server.stop()
    made = len(runs) * base.max_new_tokens  # the server ignores end tokens here: every run makes all its tokens
    return {"slots": slots, "one_tok_s": base.max_new_tokens / one, "aggregate_tok_s": made / many,
            "aggregate_vs_one": (made / many) / (base.max_new_tokens / one)}


def format_sweep(r: dict[str, Any]) -> str:
    head = f"sweep: {r['model']} ({r['device']}, {r['dtype']}, {r['threads']} threads)"
    lines = [head + f", {r['runs']} runs ({r['grid']} grid × {r['samples']} samples, at most {r['tokens']} tokens"
             f" each) after one prefill of {r['prompt_tokens']} tokens"]
    lines.append(f"  as one batch ({r['rows_per_step']} rows a step)  {r['batch_s']:7.2f} s  "
                 f"{r['batch_tok_s']:7.1f} tok/s")
    lines.append(f"  one after the other          {r['one_by_one_s']:7.2f} s  {r['one_by_one_tok_s']:7.1f} tok/s")
    agree = r["agreement"]
    lines.append(f"  batch / one by one: {r['speedup']:.2f}x (target {r['target']})")
    lines.append(f"  {agree['same_rows']} of {agree['rows']} samples equal their solo run token for token"
                 + (f"; the others part at tokens {agree['parted_at']}" if agree["parted_at"] else "")
                 + f"; before that, raw probabilities differ by at most {agree['max_raw_prob_gap']:.1e}")
    costs = r["step_ms"]
    one = costs.get(1, float("nan"))
    lines.append("  rows a step → ms a step, ms a row-token, throughput over one row: " + "; ".join(
        f"{n} → {ms:.1f}, {ms / n:.1f}, {n * one / ms:.2f}x" for n, ms in costs.items()))
    server = r.get("server")
    if server:
        lines.append(f"  llama-server, {server['slots']} parallel slots, the same {r['runs']} runs: "
                     f"{server['aggregate_tok_s']:.1f} tok/s aggregate ({server['aggregate_vs_one']:.2f}x its one "
                     f"stream, {server['one_tok_s']:.1f} tok/s); the Sweep's batch is {r['vs_server']:.2f}x that")
    return "\n".join(lines)
