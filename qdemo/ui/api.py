"""Named API endpoints for gradio_client: /chat (streams the answer), /compare, /next_token, /batch (and the
Inspect views' endpoints, qdemo.ui.api_probes). Wiring only: each
passes the same admission as the page's events (qdemo.services) and turns a refusal into a gr.Error naming the
field, never a crashed worker."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterator

import gradio as gr

from qdemo.core.runs import RunRecord
from qdemo.services import batch as batch_service
from qdemo.services import chat, lab
from qdemo.services import compare as compare_service
from qdemo.services.admission import ModelRequest, Refused
from qdemo.ui import api_probes
from qdemo.ui.context import UIContext, log, refuse_api
from qdemo.ui.zerogpu import on_gpu


def register(ui: UIContext) -> None:
    services = ui.services

    def chat_endpoint(message: str, history: list[dict] | None = None, model: str = "", settings: dict | None = None,
                      system: str | None = None, request: gr.Request = None) -> Iterator[str]:
        """Stream the answer to `message` after `history` ([{role, content}]). Yields the text so far."""
        if history is not None and not isinstance(history, list):
            raise refuse_api(f"history must be a list of {{role, content}} messages, got {type(history).__name__}")
        if system is not None and not isinstance(system, str):
            raise refuse_api(f"system must be text, got {type(system).__name__}")
        try:
            turn = chat.prepare_turn(message, history or [], system, services.limits, strict=True)
        except ValueError as exc:
            raise refuse_api(str(exc)) from None
        if turn is None:
            raise refuse_api("message is empty")
        try:
            with services.admit(ui.client(request), ModelRequest(model, settings)) as admitted:
                backend, params = admitted.backend, admitted.params[0]
                run = RunRecord(run_id=0, model=backend.name, settings=params.to_dict(), label="api",
                                forward=backend.forward_label)
                events = chat.chat_events(services, backend, turn.messages, params, top_n=0)
                try:
                    for event in events:
                        run.add(event)
                        if run.done is None and run.tokens:
                            yield chat.answer_text(run)
                finally:
                    events.close()
        except (Refused, ValueError) as exc:
            raise refuse_api(str(exc)) from None
        if run.done and run.done.error:
            raise refuse_api(run.done.error)
        yield chat.answer_text(run)

    def compare_endpoint(prompt: str, model_a: str = "", model_b: str = "", settings_a: dict | None = None,
                         settings_b: dict | None = None, seed: int = 1234, request: gr.Request = None
                         ) -> dict[str, Any]:
        """Both answers to one prompt with one seed, and where they diverge."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise refuse_api(f"seed must be a whole number from 0 to 2**63 - 1, got {str(seed)[:40]}")
        if not all(s is None or isinstance(s, dict) for s in (settings_a, settings_b)):
            raise refuse_api("settings_a and settings_b must be JSON objects of sampling fields")
        final = None
        for update in compare_service.compare(services, None, ui.client(request), prompt, model_a, model_b,
                                              settings_a, settings_b, seed, 1, top_n=0):
            final = update
        return {"a": _summary(final.a), "b": _summary(final.b), "divergence": final.report}

    def next_token_endpoint(context: str, model: str = "", settings: dict | None = None, mode: str = "chat",
                            top_n: int = 20, request: gr.Request = None) -> dict[str, Any]:
        """The next-token distribution after `context`, stage by stage (no generation)."""
        return lab.next_token_report(services, ui.client(request), context, model, settings, mode, top_n)

    def batch_endpoint(prompts: list[str], model: str = "", settings: dict | None = None, mode: str = "chat",
                       task: str = "generate", request: gr.Request = None) -> list[dict[str, Any]]:
        """Up to 8 prompts in one left-padded batch: "generate" answers each, "score" gives each text's tokens
        with their log-probability and its perplexity."""
        return batch_service.batch(services, ui.client(request), prompts, model, settings, mode, task)

    queue = ui.queue_kwargs()
    gr.api(on_gpu(guarded(chat_endpoint)), api_name="chat", **queue)
    gr.api(on_gpu(guarded(compare_endpoint)), api_name="compare", **queue)
    gr.api(on_gpu(guarded(next_token_endpoint)), api_name="next_token", **queue)
    gr.api(on_gpu(guarded(batch_endpoint)), api_name="batch", **queue)
    api_probes.register(ui, guarded)


def guarded(fn):
    """A refusal or bad value in an endpoint becomes a gr.Error with its message (no traceback); a crash is logged
    with its traceback and answered with a message, never a blank error."""
    def crashed():
        log.exception("api %s failed", fn.__name__)
        return gr.Error("Something went wrong on the server (it is logged); please try again.",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except (Refused, ValueError) as exc:  # what the caller can act on, naming the field or value
                raise refuse_api(str(exc)) from None
            except Exception:  # noqa: BLE001
                raise crashed() from None
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (Refused, ValueError) as exc:
            raise refuse_api(str(exc)) from None
        except Exception:  # noqa: BLE001
            raise crashed() from None
    return call


def _summary(run: RunRecord) -> dict[str, Any]:
    done = run.done
    return {"model": run.model, "text": done.text if done else "", "reason": done.reason if done else None,
            "tokens": list(done.token_ids) if done else [], "error": done.error if done else None,
            "ttft_s": done.stats.ttft_seconds if done else None,
            "decode_tok_s": done.stats.decode_tokens_per_s if done else None}
