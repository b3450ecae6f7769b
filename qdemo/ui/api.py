"""Named API endpoints for gradio_client: /chat (streams the answer), /compare, /next_token.

Each takes plain JSON-able values, checks them, and answers with text or a dict; bad values come back
as a gr.Error naming the field, never as a crashed worker.
"""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from qdemo.errors import QdemoError
from qdemo.runs import RunRecord
from qdemo.sampling import SamplingParams
from qdemo.ui import chatflow, compareflow, labflow
from qdemo.ui.context import AppContext


def _params(ctx: AppContext, model: str, settings: dict | None) -> SamplingParams:
    if settings is not None and not isinstance(settings, dict):
        raise gr.Error(f"settings must be a JSON object of sampling fields, got {type(settings).__name__}")
    try:
        return ctx.registry.get(model).sampling.replace(**(settings or {}))
    except (TypeError, ValueError) as exc:
        raise gr.Error(str(exc)) from None


def _model(ctx: AppContext, model: str | None):
    name = model or ctx.default_model
    try:
        return name, ctx.models.get(name)
    except (QdemoError, ValueError, OSError, RuntimeError) as exc:
        raise gr.Error(f"could not load {name}: {exc}") from None


def register(ctx: AppContext) -> None:
    def chat(message: str, history: list[dict] | None = None, model: str = "", settings: dict | None = None,
             system: str | None = None) -> Iterator[str]:
        """Stream the answer to `message` after `history` ([{role, content}]). Yields the text so far."""
        name, lm = _model(ctx, model)
        params = _params(ctx, name, settings)
        turn = chatflow.prepare_turn(message, list(history or []), system)
        if turn is None:
            raise gr.Error("message is empty")
        run = RunRecord(run_id=0, model=name, settings=params.to_dict(), label="api")
        try:
            for run in chatflow.stream_run(lm, turn.messages, params, run, top_n=0):
                if run.done is None and run.tokens:
                    yield chatflow.answer_text(run)
        except (QdemoError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        if run.done and run.done.error:
            raise gr.Error(run.done.error)
        yield chatflow.answer_text(run)

    def compare(prompt: str, model_a: str = "", model_b: str = "", settings_a: dict | None = None,
                settings_b: dict | None = None, seed: int = 1234) -> dict[str, Any]:
        """Both answers to one prompt with one seed, and where they diverge."""
        name_a, lm_a = _model(ctx, model_a)
        name_b, lm_b = _model(ctx, model_b)
        params_a = _params(ctx, name_a, {**(settings_a or {}), "seed": seed})
        params_b = _params(ctx, name_b, {**(settings_b or {}), "seed": seed})
        if not isinstance(prompt, str) or not prompt.strip():
            raise gr.Error("prompt is empty")
        messages = [{"role": "user", "content": prompt[:chatflow.MAX_INPUT_CHARS]}]
        run_a = RunRecord(run_id=1, model=name_a, settings=params_a.to_dict(), label="A")
        run_b = RunRecord(run_id=2, model=name_b, settings=params_b.to_dict(), label="B")
        try:
            for run_a, run_b in compareflow.run_pair(lm_a, lm_b, messages, params_a, params_b, run_a, run_b):
                pass
        except (QdemoError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        report = compareflow.divergence_report(lm_a, lm_b, run_a, run_b, params_a, params_b)
        return {"a": _summary(run_a), "b": _summary(run_b), "divergence": report}

    def next_token(context: str, model: str = "", settings: dict | None = None, mode: str = "chat",
                   top_n: int = 20) -> dict[str, Any]:
        """The next-token distribution after `context`, stage by stage (no generation)."""
        name, lm = _model(ctx, model)
        params = _params(ctx, name, settings)
        try:
            ids = labflow.context_ids(lm, context, mode)
            return labflow.next_token_report(lm, ids, params, int(top_n))
        except (QdemoError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None

    gr.api(chat, api_name="chat")
    gr.api(compare, api_name="compare")
    gr.api(next_token, api_name="next_token")


def _summary(run: RunRecord) -> dict[str, Any]:
    done = run.done
    return {"model": run.model, "text": done.text if done else "", "reason": done.reason if done else None,
            "tokens": list(done.token_ids) if done else [], "error": done.error if done else None,
            "ttft_s": done.stats.ttft_seconds if done else None,
            "decode_tok_s": done.stats.decode_tokens_per_s if done else None}
