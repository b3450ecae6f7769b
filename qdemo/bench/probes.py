"""`python -m qdemo bench NAME --scenario inspect`: the Inspect views' cost on a 512-token chat against one
prefill of the same tokens, measured in one process with the views and the prefill alternating, medians
reported (the figures the issue asks for: lens ≤ 1.5× a prefill; occlusion per turn by default)."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch

from qdemo.core.decode import new_state, prefill
from qdemo.models.loader import LoadedModel
from qdemo.models.prompting import build_prompt, raw_text_ids
from qdemo.probes.attribution import (
    gradient_x_input,
    occlusion,
    token_pieces,
    turn_units,
)
from qdemo.probes.lens import logit_lens
from qdemo.probes.scoring import score_ids

CHAT_TOKENS = 512
ANSWER_TOKENS = 48
PARAGRAPH = ("The scheduler keeps a queue of jobs; each worker takes the oldest job, runs it, and reports how long "
             "it took. 调度器维护一个任务队列，每个工作进程取出最早的任务并报告耗时。 ")
ANSWER = ("The queue is first in, first out: worker 3 took the oldest job, so the job that waited longest ran "
          "first. 队列是先进先出的，所以等待最久的任务最先运行。 If a worker fails, its job goes back to the front of "
          "the queue and the next free worker takes it.")


def chat_subject(lm: LoadedModel, total: int = CHAT_TOKENS, answer_tokens: int = ANSWER_TOKENS
                 ) -> tuple[list[int], int, list[dict[str, str]]]:
    """(ids, where the answer starts, messages): a system prompt, two user turns and an assistant turn of
    bilingual text, then an answer, `total` tokens in all."""
    answer = raw_text_ids(lm.tokenizer, ANSWER)[:answer_tokens]
    sentences = [x.strip() + "." for x in PARAGRAPH.replace("。", ".").split(".") if x.strip()]
    history: list[str] = []
    while True:
        body = " ".join(history)
        messages = [{"role": "system", "content": lm.spec.system_prompt or "You are a helpful assistant."},
                    {"role": "user", "content": body + " What happens to the oldest job?"},
                    {"role": "assistant", "content": "It runs first. " + PARAGRAPH},
                    {"role": "user", "content": "Explain the queue order again, briefly."}]
        prompt = build_prompt(lm.tokenizer, messages, 1 << 20, 1, None, lm.spec.name, lm.family.build_prompt).ids
        if len(prompt) + len(answer) >= total or len(history) > 4 * total:
            break
        history.append(sentences[len(history) % len(sentences)])  # one sentence at a time: close to `total`
    return list(prompt) + answer, len(prompt), messages


def _timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def run_inspect_bench(lm: LoadedModel, runs: int = 3) -> dict[str, Any]:
    ids, answer_from, messages = chat_subject(lm)
    positions = list(range(answer_from - 1, len(ids) - 1))
    target_at = len(ids) - 1
    context, target = ids[:target_at], ids[target_at]
    units = turn_units(token_pieces(lm.tokenizer.decode, context), messages, answer_from)

    def one_prefill() -> None:
        state = new_state(lm)
        try:
            prefill(lm, state, [ids], nullcontext, chunk=len(ids))
        finally:
            state.release()

    views: dict[str, Callable[[], Any]] = {
        "prefill": one_prefill,
        "lens": lambda: logit_lens(lm, ids, positions, chunk=len(ids)),
        "lens_sublayers": lambda: logit_lens(lm, ids, positions, sublayers=True, chunk=len(ids)),
        "gradient_x_input": lambda: gradient_x_input(lm, context, target),
        "occlusion_per_turn": lambda: occlusion(lm, context, target, units, chunk=len(ids)),
        "score": lambda: score_ids(lm, ids, chunk=len(ids)),
    }
    for fn in views.values():  # warm-up: first-call allocations and kernel selection
        fn()
    times: dict[str, list[float]] = {name: [] for name in views}
    for r in range(runs):
        order = list(views) if r % 2 == 0 else list(views)[::-1]
        for name in order:
            times[name].append(_timed(views[name]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["prefill"]
    return {"scenario": "inspect", "model": lm.spec.name, "runs": runs, "chat_tokens": len(ids),
            "answer_tokens": len(ids) - answer_from, "turn_units": [u.label for u in units],
            "seconds": medians, "vs_prefill": {n: s / base for n, s in medians.items()},
            "runs_s": times, "targets": {"lens": 1.5}, "device": str(lm.device), "dtype": lm.forward_label,
            "threads": torch.get_num_threads()}


def format_inspect(r: dict[str, Any]) -> str:
    head = (f"inspect: {r['model']} ({r['device']}, {r['dtype']}, {r['threads']} threads), {r['chat_tokens']}-token "
            f"chat with a {r['answer_tokens']}-token answer, median of {r['runs']}")
    rows = [f"  {name:<20} {seconds:7.2f} s   {r['vs_prefill'][name]:5.2f}× a prefill"
            for name, seconds in r["seconds"].items()]
    note = (f"  occlusion units: {', '.join(r['turn_units'])}; lens target ≤ {r['targets']['lens']}× a prefill "
            f"(lens over the answer's {r['answer_tokens']} tokens, every layer)")
    return "\n".join([head, *rows, note])
