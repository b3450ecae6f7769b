"""Named API endpoints for gradio_client: /chat (streams the answer), /compare, /next_token, /batch (and the
Inspect views' endpoints, qdemo.ui.api_probes). Each converts its arguments for the same services the page calls
and their results into JSON; the flow (admission, the turn, its run) is the services'. Refusals name the field and
reach the caller as a gr.Error (the one guard in qdemo.ui.context), never a crashed worker."""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import gradio as gr

from qdemo.core.runs import RunRecord
from qdemo.services import batch as batch_service
from qdemo.services import chat, lab
from qdemo.services import compare as compare_service
from qdemo.ui import api_probes
from qdemo.ui.context import UIContext


def register(ui: UIContext) -> None:
    for fn, name in ((chat_endpoint, "chat"), (compare_endpoint, "compare"), (next_token_endpoint, "next_token"),
                     (batch_endpoint, "batch")):
        ui.endpoint(partial(fn, ui), name)
    api_probes.register(ui)


def chat_endpoint(ui: UIContext, message: str, history: list[dict] | None = None, model: str = "",
                  settings: dict | None = None, system: str | None = None, request: gr.Request = None
                  ) -> Iterator[str]:
    """Stream the answer to `message` after `history` ([{role, content}]). Yields the text so far."""
    run = None
    for run in chat.api_turn(ui.services, ui.client(request), message, history, model, settings, system):
        if run.done is None and run.tokens:
            yield chat.answer_text(run)
    yield chat.answer_text(run)


def compare_endpoint(ui: UIContext, prompt: str, model_a: str = "", model_b: str = "", settings_a: dict | None = None,
                     settings_b: dict | None = None, seed: int = 1234, request: gr.Request = None
                     ) -> dict[str, Any]:
    """Both answers to one prompt with one seed, and where they diverge."""
    final = compare_service.api_compare(ui.services, ui.client(request), prompt, model_a, model_b, settings_a,
                                        settings_b, seed)
    return {"a": _summary(final.a), "b": _summary(final.b), "divergence": final.report}


def next_token_endpoint(ui: UIContext, context: str, model: str = "", settings: dict | None = None,
                        mode: str = "chat", top_n: int = 20, request: gr.Request = None) -> dict[str, Any]:
    """The next-token distribution after `context`, stage by stage (no generation)."""
    return lab.next_token_report(ui.services, ui.client(request), context, model, settings, mode, top_n)


def batch_endpoint(ui: UIContext, prompts: list[str], model: str = "", settings: dict | None = None,
                   mode: str = "chat", task: str = "generate", request: gr.Request = None) -> list[dict[str, Any]]:
    """Up to 8 prompts in one left-padded batch: "generate" answers each, "score" gives each text's tokens
    with their log-probability and its perplexity."""
    return batch_service.batch(ui.services, ui.client(request), prompts, model, settings, mode, task)


def _summary(run: RunRecord) -> dict[str, Any]:
    done = run.done
    return {"model": run.model, "text": done.text if done else "", "reason": done.reason if done else None,
            "tokens": list(done.token_ids) if done else [], "error": done.error if done else None,
            "ttft_s": done.stats.ttft_seconds if done else None,
            "decode_tok_s": done.stats.decode_tokens_per_s if done else None}
