"""Batch generation and scoring: several prompts through one left-padded batch (one prefill, one forward per step
for all of them), or several texts scored teacher-forced (each token's log-probability given the ones before).
No Gradio here; the named endpoint /batch wires it."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

from qdemo.sampling import SamplingParams
from qdemo.services.admission import ModelRequest, Refused, Services
from qdemo.services.kept_states import client_state
from qdemo.services.lab import context_ids
from qdemo.serving.limits import Client

MAX_PROMPTS = 8
TASKS = ("generate", "score")


def batch(services: Services, client: Client | str | None, texts: list[str], model: str | None = None,
          settings: SamplingParams | Mapping | None = None, mode: str = "chat", task: str = "generate",
          stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """One result per prompt. "generate": the answer of each (chat mode: each prompt is a user message), decoded
    together, until `stop` (the caller left) or the time limit. "score": each text's tokens with their
    log-probability, the mean and the perplexity. `texts` (at most MAX_PROMPTS), `mode` (CONTEXT_MODES) and `task`
    (TASKS) as the endpoint read them (qdemo.services.arguments)."""
    with services.admit(client, ModelRequest(model, settings, sampling=task == "generate")) as admitted:
        backend, params = admitted.backend, admitted.params[0]
        if not backend.capabilities.rows:  # a remote server: one request per prompt, sent at once
            if task == "score":
                services.need_logits(backend, "scoring a batch")
            return _generate_remote(backend, texts, params, mode, services.limits.max_generation_seconds,
                                    services.limits.max_prompt_tokens, stop)
        try:
            rows = [context_ids(backend, text, mode) for text in texts]
        except ValueError as exc:
            raise Refused(f"prompt {_which(exc, texts)}: {exc}") from None
        too_long = [i for i, r in enumerate(rows) if len(r) > services.limits.max_prompt_tokens]
        if too_long:
            raise Refused(f"prompt {too_long[0]} has {len(rows[too_long[0]])} tokens; this server's prompt limit is "
                          f"{services.limits.max_prompt_tokens}")
        if task == "score":
            return _score(backend, rows)
        with client_state(services.states, client, backend, use=not params.beam_search) as state:
            return _generate(backend, rows, params, services.limits.max_generation_seconds, stop, state)


def _generate_remote(backend, texts: list[str], params: SamplingParams, mode: str, time_limit_s: float,
                     max_prompt_tokens: int, stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """A remote server's answers: the prompts sent at once (the server batches them in its slots) under one
    deadline for the whole batch; chat mode through /v1/chat/completions, raw text through /v1/completions. The
    token ids are the server's own (one log-probability per token is asked for: without it a server sends text
    only). A prompt that fails gets its error; the others keep their answers."""
    if params.beam_search:
        raise Refused("beam search runs alone, not in a batch: set num_beams to 1")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise Refused(f"prompt {empty[0]} is empty")
    lengths = [len(backend.chat_prompt([{"role": "user", "content": t}], 1).ids) if mode == "chat" else
               backend.count_tokens(t) for t in texts]
    if all(n for n in lengths):  # counted with the entry's local tokenizer; without one the server decides
        too_long = [i for i, n in enumerate(lengths) if n > max_prompt_tokens]
        if too_long:
            raise Refused(f"prompt {too_long[0]} has {lengths[too_long[0]]} tokens; this server's prompt limit is "
                          f"{max_prompt_tokens}")
    deadline = time.perf_counter() + time_limit_s

    def one(text: str) -> dict[str, Any]:
        left = max(0.0, deadline - time.perf_counter())
        try:
            if mode == "chat":
                messages = [{"role": "user", "content": text}]
                events = backend.chat(messages, backend.chat_prompt(messages, params.max_new_tokens), params, stop,
                                      top_n=1, time_limit_s=left)
            else:
                events = backend.complete(text, params, stop, top_n=1, time_limit_s=left)
            done = [e for e in events if type(e).__name__ == "DoneEvent"][-1]
        except ValueError as exc:  # the server could not be reached or refused this prompt
            return {"text": "", "tokens": [], "reason": "error", "error": str(exc), "prompt_tokens": None}
        return {"text": done.text, "tokens": list(done.token_ids), "reason": done.reason, "error": done.error,
                "prompt_tokens": done.stats.prompt_tokens}

    with ThreadPoolExecutor(max_workers=len(texts), thread_name_prefix="qdemo-remote-batch") as pool:
        return list(pool.map(one, texts))


def _which(exc: Exception, texts: Sequence[str]) -> int:
    return next((i for i, t in enumerate(texts) if not t.strip()), 0)


def _generate(backend, rows: list[list[int]], params: SamplingParams, time_limit_s: float,
              stop: threading.Event | None = None, state: Any = None) -> list[dict[str, Any]]:
    """The rows' answers; `state` (the caller's kept decode state) supplies the prefix it holds of theirs."""
    if params.beam_search:
        raise Refused("beam search runs alone, not in a batch: set num_beams to 1")
    results: list[dict[str, Any]] = [{} for _ in rows]
    reused = 0
    for event in backend.generate_batch(rows, params, stop_event=stop, time_limit_s=time_limit_s, state=state):
        if type(event).__name__ == "PrefillEvent":
            reused = event.reused_tokens
        elif type(event).__name__ == "DoneEvent":
            results[event.row] = {"text": event.text, "tokens": list(event.token_ids), "reason": event.reason,
                                  "error": event.error, "prompt_tokens": len(rows[event.row]),
                                  "reused_tokens": reused}
    return results


def _score(backend, rows: list[list[int]]) -> list[dict[str, Any]]:
    short = [i for i, r in enumerate(rows) if len(r) < 2]
    if short:
        raise Refused(f"prompt {short[0]} is one token long; scoring needs at least two")
    scores = backend.token_logprobs(rows)
    results = []
    for ids, logprobs in zip(rows, scores):
        texts = backend.token_texts(ids)
        mean = sum(logprobs) / len(logprobs)
        results.append({"tokens": [{"id": t, "text": texts[t], "logprob": lp} for t, lp in zip(ids[1:], logprobs)],
                        "first_token": {"id": ids[0], "text": texts[ids[0]]},
                        "mean_logprob": mean, "perplexity": math.exp(-mean)})
    return results
