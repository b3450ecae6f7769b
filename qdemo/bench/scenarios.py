"""`python -m qdemo bench NAME --scenario multiturn|ab|assisted`: each new path of the engine against the old way
of doing the same, alternating in one process, medians reported (the "single" scenario is qdemo.bench.single).

- multiturn: the first token of a chat turn after ~3,000 history tokens, with the decode state kept from the last
  turn (only the new turn is prefilled) vs a full re-prefill of the whole conversation.
- ab: one-model Compare as the app runs it against its two sides as two chats (qdemo.bench.pairs).
- assisted: speculative decoding with the registry's draft model vs the target alone, greedy, on a code prompt;
  with the draft's acceptance rate.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch

from qdemo.bench import pairs, sweeps
from qdemo.bench.pairs import CODE_PROMPT
from qdemo.bench.forwards import load_line
from qdemo.bench.probes import format_inspect, run_inspect_bench
from qdemo.core.decode import new_state
from qdemo.core.engine import collect, generate, generate_assisted
from qdemo.forwards.llama_cpp import load_llama_model
from qdemo.models.loader import LoadedModel, load_model
from qdemo.models.prompting import build_prompt
from qdemo.models.registry import load_registry
from qdemo.sampling import SamplingParams

SCENARIOS = ("single", "multiturn", "ab", "assisted", "inspect", "sweep")
HISTORY_TURN = ("Here is a log line: [{i:04d}] worker {w} finished task {t} in {s}.{d} s with status ok. "
                "What does it say about worker {w}?")


def _alternate(runs: int, first: Callable[[], float], second: Callable[[], float]) -> tuple[list[float], list[float]]:
    a, b = [], []
    for r in range(runs):
        pair = [(a, first), (b, second)]
        for bucket, fn in (pair if r % 2 == 0 else pair[::-1]):
            bucket.append(fn())
    return a, b


def _chat_ids(lm: LoadedModel, messages: list[dict[str, str]], new_tokens: int) -> list[int]:
    return build_prompt(lm.tokenizer, messages, lm.max_context, new_tokens, lm.spec.system_prompt, lm.spec.name,
                        lm.family.build_prompt).ids


def multiturn(lm: LoadedModel, runs: int = 3, history_tokens: int = 3000) -> dict[str, Any]:
    """TTFT of the next turn: kept state vs full re-prefill (same first token checked)."""
    messages: list[dict[str, str]] = []
    i = 0
    while True:
        messages += [{"role": "user", "content": HISTORY_TURN.format(i=i, w=i % 7, t=i * 13 % 101, s=i % 9, d=i % 10)},
                     {"role": "assistant", "content": f"Worker {i % 7} finished task {i * 13 % 101} successfully."}]
        i += 1
        if len(_chat_ids(lm, messages[:-1], 8)) >= history_tokens:
            break
    previous = _chat_ids(lm, messages[:-1], 8)  # the last turn as it was asked
    current = _chat_ids(lm, messages + [{"role": "user", "content": "Which worker was slowest?"}], 8)
    params = SamplingParams(max_new_tokens=1)
    first_tokens = []

    def kept() -> float:
        state = new_state(lm)
        collect(generate(lm, input_ids=previous, params=SamplingParams(max_new_tokens=1), state=state))
        run = collect(generate(lm, input_ids=current, params=params, state=state))
        first_tokens.append(run["done"].token_ids[0])
        return run["done"].stats.ttft_seconds

    def full() -> float:
        run = collect(generate(lm, input_ids=current, params=params))
        first_tokens.append(run["done"].token_ids[0])
        return run["done"].stats.ttft_seconds

    reuse, fresh = _alternate(runs, kept, full)
    return {"scenario": "multiturn", "model": lm.spec.name, "history_tokens": len(previous),
            "prompt_tokens": len(current), "runs": runs, "kept_ttft_s": statistics.median(reuse),
            "full_ttft_s": statistics.median(fresh), "ratio": statistics.median(reuse) / statistics.median(fresh),
            "target": "<= 0.15", "same_first_token": len(set(first_tokens)) == 1,
            "kept_runs_s": reuse, "full_runs_s": fresh}


def assisted(target: LoadedModel, draft: LoadedModel, runs: int = 3, tokens: int = 64, k: int = 4
             ) -> dict[str, Any]:
    """Greedy decode speed of the target with the draft proposing `k` tokens vs the target alone."""
    ids = _chat_ids(target, [{"role": "user", "content": CODE_PROMPT}], tokens)
    params = SamplingParams(max_new_tokens=tokens)
    outputs: dict[str, tuple] = {}
    acceptance = []

    def with_draft() -> float:
        t0 = time.perf_counter()
        done = collect(generate_assisted(target, draft, ids, params, draft_tokens=k, ignore_eos=True))["done"]
        outputs["assisted"] = done.token_ids
        acceptance.append(done.stats.draft_accepted / max(1, done.stats.draft_proposed))
        return tokens / (time.perf_counter() - t0)

    def alone() -> float:
        t0 = time.perf_counter()
        done = collect(generate(target, input_ids=ids, params=params, ignore_eos=True))["done"]
        outputs["alone"] = done.token_ids
        return tokens / (time.perf_counter() - t0)

    fast, base = _alternate(runs, with_draft, alone)
    return {"scenario": "assisted", "model": target.spec.name, "draft": draft.spec.name, "k": k,
            "prompt_tokens": len(ids), "tokens": tokens, "runs": runs,
            "assisted_tok_s": statistics.median(fast), "alone_tok_s": statistics.median(base),
            "speedup": statistics.median(fast) / statistics.median(base), "acceptance": statistics.median(acceptance),
            "same_tokens": outputs["assisted"] == outputs["alone"],
            "target": ">= 1.4 where a k-token verification costs about one step",
            "assisted_runs_tok_s": fast, "alone_runs_tok_s": base}


def run_scenario(scenario: str, name: str, runs: int = 3, tokens: int = 64, registry_path: str | None = None,
                 device=None, dtype=None, lm: LoadedModel | None = None, forward: str = "torch") -> dict[str, Any]:
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    registry = load_registry(registry_path)

    def load(spec) -> LoadedModel:
        if forward == "llama.cpp":
            return load_llama_model(spec)
        return load_model(spec, device=device, dtype=dtype)

    if lm is None:
        lm = load(registry.get(name))
    load_before = os.getloadavg()[0]
    result: dict[str, Any]
    if scenario == "multiturn":
        result = multiturn(lm, runs)
    elif scenario == "ab":
        result = pairs.ab(lm, runs, min(tokens, 64))
    elif scenario == "inspect":
        result = run_inspect_bench(lm, runs)
    elif scenario == "sweep":
        result = sweeps.sweep_bench(lm, min(tokens, 48))
    else:
        if lm.spec.draft is None:
            raise ValueError(f"{name} names no draft model in models.yaml (field 'draft')")
        draft = load(registry.get(lm.spec.draft))
        result = assisted(lm, draft, runs, tokens, lm.spec.draft_tokens)
    result.update(device=str(lm.device), dtype=lm.forward_label, threads=torch.get_num_threads(),
                  load={"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count() or 1})
    return result


def format_scenario(r: dict[str, Any]) -> str:
    """The scenario's table, then the load average it ran under (marked when the machine was busy)."""
    return _table(r) + ("\n" + load_line(r["load"]) if "load" in r else "")


def _table(r: dict[str, Any]) -> str:
    if r["scenario"] == "inspect":
        return format_inspect(r)
    if r["scenario"] == "sweep":
        return sweeps.format_sweep(r)
    head = f"{r['scenario']}: {r['model']} ({r['device']}, {r['dtype']}, {r['threads']} threads), median of {r['runs']}"
    if r["scenario"] == "multiturn":
        rows = [("history / prompt tokens", f"{r['history_tokens']} / {r['prompt_tokens']}"),
                ("first token, kept state", f"{r['kept_ttft_s']:.3f} s  runs {_fmt(r['kept_runs_s'])}"),
                ("first token, full re-prefill", f"{r['full_ttft_s']:.3f} s  runs {_fmt(r['full_runs_s'])}"),
                ("ratio kept / full", f"{r['ratio']:.3f} (target {r['target']}); same first token: "
                                      f"{r['same_first_token']}")]
    elif r["scenario"] == "ab":
        return pairs.format_ab(r, head)
    else:
        rows = [("draft / tokens per round", f"{r['draft']} / {r['k']}"),
                ("with the draft", f"{r['assisted_tok_s']:.2f} tok/s  runs {_fmt(r['assisted_runs_tok_s'])}"),
                ("target alone", f"{r['alone_tok_s']:.2f} tok/s  runs {_fmt(r['alone_runs_tok_s'])}"),
                ("speedup / acceptance", f"{r['speedup']:.2f}x / {r['acceptance']:.0%} (target {r['target']}); "
                                         f"same tokens: {r['same_tokens']}")]
    width = max(len(k) for k, _ in rows)
    return head + "\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"
