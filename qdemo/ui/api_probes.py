"""Named API endpoints of the Inspect views: /lens, /attribution, /decisions, /branch, /score, /divergence,
/sinks, /bundle. Each passes the same admission as the page and answers JSON with a "csv" field holding the same
table as the page's CSV download. Wiring only: the logic is in qdemo.services.probing (and branches, internals)."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from qdemo.core.runs import RunRecord, run_from_json, run_to_json
from qdemo.services import branches, chat, internals
from qdemo.services import probing as service
from qdemo.services.admission import ModelRequest, Refused
from qdemo.ui.context import UIContext
from qdemo.ui.zerogpu import on_gpu
from qdemo.views.bundle import bundle_html, read_bundle
from qdemo.views.export import csv_text


def register(ui: UIContext, guarded) -> None:
    services = ui.services

    def lens(history: list[dict], model: str = "", system: str | None = None, sublayers: bool = False,
             request: gr.Request = None) -> dict[str, Any]:
        """Logit lens over the answer that ends `history`: per layer (and sublayer) and answer token, the lens's
        top-10 and the probability of the token that followed; the commitment layer per token."""
        subject = service.history_subject(model or services.default_model, history, system)
        result = service.lens_view(services, ui.client(request), subject, sublayers=bool(sublayers))
        return {**result.grid.to_dict(), "tokens": result.columns, "notice": result.notice,
                "forward": result.forward, "seconds": round(result.seconds, 3),
                "csv": csv_text(result.grid.to_frame(result.texts))}

    def attribution(history: list[dict], token: int, method: str = "gradient×input", per_token: bool = False,
                    model: str = "", system: str | None = None, request: gr.Request = None) -> dict[str, Any]:
        """What in the prompt drove answer token `token` (0-based): gradient×input per token and summed per turn,
        or occlusion per turn (or per token)."""
        subject = service.history_subject(model or services.default_model, history, system)
        result = service.attribution_view(services, ui.client(request), subject, token, method, bool(per_token))
        texts = dict(enumerate(result.pieces))
        return {**result.attribution.to_dict(), "pieces": result.pieces, "target_text": result.target_text,
                "per_turn": [{"unit": u.label, "kind": u.kind, "score": s} for u, s in result.per_turn],
                "notice": result.notice, "seconds": round(result.seconds, 3),
                "csv": csv_text(result.attribution.to_frame(texts))}

    def decisions(message: str, history: list[dict] | None = None, model: str = "", settings: dict | None = None,
                  system: str | None = None, request: gr.Request = None) -> dict[str, Any]:
        """Answer `message` and say, per token, which sampling stage decided what; with the run's JSON (for
        /bundle)."""
        turn = chat.prepare_turn(message, history or [], system, services.limits, strict=True)
        if turn is None:
            raise Refused("message is empty")
        with services.admit(ui.client(request), ModelRequest(model, settings)) as admitted:
            backend, params = admitted.backend, admitted.params[0]
            run = RunRecord(run_id=0, model=backend.name, settings=params.to_dict(), label="api",
                            forward=backend.forward_label)
            for event in chat.chat_events(services, backend, turn.messages, params, top_n=20):
                run.add(event)
        if run.done and run.done.error:
            raise Refused(run.done.error)
        rows = service.decision_rows(run)
        return {"text": chat.answer_text(run), "summary": service.run_summary(run), "tokens": rows,
                "run": run_to_json(run), "csv": csv_text(pd.DataFrame.from_records(rows))}

    def branch(history: list[dict], at: int, token: Any, model: str = "", settings: dict | None = None,
               system: str | None = None, request: gr.Request = None) -> dict[str, Any]:
        """Write `token` (an id or one token's text) at answer token `at` of the answer ending `history`, and
        generate on from there."""
        report = branches.branch_report(services, ui.client(request), model, history, system, at, token, settings)
        return {**report, "csv": csv_text(pd.DataFrame({"token_id": report["token_ids"]}))}

    def score(text: str, model: str = "", question: str = "", template: bool = False,
              request: gr.Request = None) -> dict[str, Any]:
        """Per-token probability, rank, surprisal and entropy of `text` under `model`, and its perplexity; in
        the chat template as the answer to `question` when `template`."""
        result = service.score_view(services, ui.client(request), model or services.default_model, text,
                                    question or "", bool(template))
        return {**result.score.to_dict(), "notice": result.notice, "seconds": round(result.seconds, 3),
                "csv": csv_text(result.score.to_frame(result.texts))}

    def divergence(text: str, model_a: str, model_b: str, question: str = "", template: bool = False,
                   request: gr.Request = None) -> dict[str, Any]:
        """Two models that share a tokenizer on one text: per-token KL both ways, top-1 agreement, the ten
        positions where they differ most."""
        result = service.divergence_view(services, ui.client(request), model_a, model_b, text, question or "",
                                         bool(template))
        return {**result.divergence.to_dict(), "notice": result.notice,
                "seconds": round(result.seconds, 3),
                "csv": csv_text(result.divergence.to_frame(result.texts))}

    def sinks(history: list[dict], model: str = "", system: str | None = None,
              request: gr.Request = None) -> dict[str, Any]:
        """Per layer and head: the attention mass on the first token and on template/special tokens over the
        conversation's last tokens."""
        cache = internals.compute_attention(services, internals.InternalsSession(), ui.client(request),
                                            model or services.default_model, history, system)
        view = internals.attention_sinks(cache)
        return {"model": cache.model, "summary": view.summary, "heads": view.table.to_dict(orient="records"),
                "csv": csv_text(view.table)}

    def bundle(run: str, request: gr.Request = None) -> str:
        """An evidence bundle (one offline HTML page) of a run's JSON as /decisions returns it."""
        if not isinstance(run, str) or not run.strip():
            raise Refused("run must be a run's JSON text (the 'run' field of /decisions)")
        record = run_from_json(run) if run.lstrip().startswith("{") else read_bundle(run)
        fingerprint = service.weights_fingerprint(services, record.model)
        with services.admit(ui.client(request), ModelRequest(record.model, sampling=False)) as admitted:
            labels = admitted.backend.token_texts(service.listed_ids(record))
        return bundle_html(record, fingerprint, labels)

    queue = ui.queue_kwargs()
    for fn in (lens, attribution, decisions, branch, score, divergence, sinks, bundle):
        gr.api(on_gpu(guarded(fn)), api_name=fn.__name__, **queue)

