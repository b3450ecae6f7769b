"""Named API endpoints for gradio_client: /chat (streams the answer), /compare, /next_token.

Each takes plain JSON-able values, checks them, and answers with text or a dict; bad values come back
as a gr.Error naming the field, never as a crashed worker.
"""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from qdemo.errors import QdemoError
from qdemo.limits import clean_text, cut_text
from qdemo.runs import RunRecord
from qdemo.sampling import SamplingParams
from qdemo.ui import chatflow, compareflow, labflow
from qdemo.ui.context import AppContext
from qdemo.ui.zerogpu import on_gpu


def _params(ctx: AppContext, model: str, settings: dict | None) -> SamplingParams:
    if settings is not None and not isinstance(settings, dict):
        raise gr.Error(f"settings must be a JSON object of sampling fields, got {type(settings).__name__}")
    try:
        params = ctx.registry.get(model).sampling.replace(**(settings or {}))
    except (TypeError, ValueError, OverflowError) as exc:
        raise gr.Error(str(exc)) from None
    return chatflow.cap_params(params, ctx.limits.max_new_tokens)[0]


def _model(ctx: AppContext, model: str | None):
    if model is not None and not isinstance(model, str):
        raise gr.Error(f"model must be a model name (text), got {type(model).__name__}")
    name = model or ctx.default_model
    if name not in ctx.registry.models:  # never a path or hub id: only what models.yaml lists
        raise gr.Error(f"unknown model {name!r}; this server has: {', '.join(ctx.registry.names())}")
    try:
        return name, ctx.models.get(name)
    except (QdemoError, ValueError, OSError, RuntimeError) as exc:
        raise gr.Error(f"could not load {name}: {exc}") from None


def _admit(ctx: AppContext, request: gr.Request | None) -> None:
    refusal = ctx.admit(request)
    if refusal:
        raise gr.Error(refusal)


def register(ctx: AppContext) -> None:
    def chat(message: str, history: list[dict] | None = None, model: str = "", settings: dict | None = None,
             system: str | None = None, request: gr.Request = None) -> Iterator[str]:
        """Stream the answer to `message` after `history` ([{role, content}]). Yields the text so far."""
        if history is not None and not isinstance(history, list):
            raise gr.Error(f"history must be a list of {{role, content}} messages, got {type(history).__name__}")
        if system is not None and not isinstance(system, str):
            raise gr.Error(f"system must be text, got {type(system).__name__}")
        turn = chatflow.prepare_turn(message, list(history or []), system, ctx.limits.max_input_chars,
                                     ctx.limits.max_turns)
        if turn is None:
            raise gr.Error("message is empty")
        _admit(ctx, request)  # before any model loads
        name, _ = _model(ctx, model)
        params = _params(ctx, name, settings)
        run = RunRecord(run_id=0, model=name, settings=params.to_dict(), label="api")
        try:
            with ctx.generation(name) as (lm, step_lock):
                for run in chatflow.stream_run(lm, turn.messages, params, run, top_n=0, step_lock=step_lock):
                    if run.done is None and run.tokens:
                        yield chatflow.answer_text(run)
        except (QdemoError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        if run.done and run.done.error:
            raise gr.Error(run.done.error)
        yield chatflow.answer_text(run)

    def compare(prompt: str, model_a: str = "", model_b: str = "", settings_a: dict | None = None,
                settings_b: dict | None = None, seed: int = 1234, request: gr.Request = None) -> dict[str, Any]:
        """Both answers to one prompt with one seed, and where they diverge."""
        turn = chatflow.prepare_turn(prompt, [], None, ctx.limits.max_input_chars)
        if turn is None:
            raise gr.Error("prompt is empty")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise gr.Error(f"seed must be a whole number, got {seed!r}")
        if not all(s is None or isinstance(s, dict) for s in (settings_a, settings_b)):
            raise gr.Error("settings_a and settings_b must be JSON objects of sampling fields")
        _admit(ctx, request)
        name_a, _ = _model(ctx, model_a)
        name_b, _ = _model(ctx, model_b)
        params_a = _params(ctx, name_a, {**(settings_a or {}), "seed": seed})
        params_b = _params(ctx, name_b, {**(settings_b or {}), "seed": seed})
        run_a = RunRecord(run_id=1, model=name_a, settings=params_a.to_dict(), label="A")
        run_b = RunRecord(run_id=2, model=name_b, settings=params_b.to_dict(), label="B")
        try:
            with ctx.generation(name_a) as (lm_a, lock_a), ctx.generation(name_b) as (lm_b, lock_b):
                for run_a, run_b in compareflow.run_pair(lm_a, lm_b, turn.messages, params_a, params_b, run_a,
                                                         run_b, step_locks=(lock_a, lock_b)):
                    pass
                report = compareflow.divergence_report(lm_a, lm_b, run_a, run_b, params_a, params_b)
        except (QdemoError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        return {"a": _summary(run_a), "b": _summary(run_b), "divergence": report}

    def next_token(context: str, model: str = "", settings: dict | None = None, mode: str = "chat",
                   top_n: int = 20, request: gr.Request = None) -> dict[str, Any]:
        """The next-token distribution after `context`, stage by stage (no generation)."""
        if not isinstance(context, str):
            raise gr.Error(f"context must be text, got {type(context).__name__}")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= 200:
            raise gr.Error(f"top_n must be a whole number from 1 to 200, got {top_n!r}")
        _admit(ctx, request)
        name, _ = _model(ctx, model)
        params = _params(ctx, name, settings)
        context, _ = cut_text(clean_text(context), ctx.limits.max_input_chars)  # the report counts the tokens
        try:
            with ctx.generation(name) as (lm, step_lock), step_lock():
                ids = labflow.context_ids(lm, context, mode)
                return labflow.next_token_report(lm, ids, params, top_n)
        except (QdemoError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None

    queue = ctx.queue_kwargs()
    chat, compare, next_token = on_gpu(chat), on_gpu(compare), on_gpu(next_token)
    gr.api(chat, api_name="chat", **queue)
    gr.api(compare, api_name="compare", **queue)
    gr.api(next_token, api_name="next_token", **queue)


def _summary(run: RunRecord) -> dict[str, Any]:
    done = run.done
    return {"model": run.model, "text": done.text if done else "", "reason": done.reason if done else None,
            "tokens": list(done.token_ids) if done else [], "error": done.error if done else None,
            "ttft_s": done.stats.ttft_seconds if done else None,
            "decode_tok_s": done.stats.decode_tokens_per_s if done else None}
