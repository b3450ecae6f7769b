"""Named API endpoints of the Inspect views: /lens, /attribution, /decisions, /branch, /score, /divergence,
/sinks, /bundle. Each answers JSON with a "csv" field holding the same table as the page's CSV download. Arguments
and results are converted here; the flow is the services' (qdemo.services.probing, chat, branches, internals),
with the same admission as the page."""

from __future__ import annotations

from functools import partial
from typing import Any

import gradio as gr
import pandas as pd

from qdemo.core.runs import run_to_json
from qdemo.services import branches, chat, internals
from qdemo.services import probing as service
from qdemo.ui.context import UIContext
from qdemo.views.export import csv_text


def register(ui: UIContext) -> None:
    for fn in (lens, attribution, decisions, branch, score, divergence, sinks, bundle):
        ui.endpoint(partial(fn, ui), fn.__name__)


def lens(ui: UIContext, history: list[dict], model: str = "", system: str | None = None, sublayers: bool = False,
         request: gr.Request = None) -> dict[str, Any]:
    """Logit lens over the answer that ends `history`: per layer (and sublayer) and answer token, the lens's
    top-10 and the probability of the token that followed; the commitment layer per token."""
    subject = service.history_subject(model or ui.services.default_model, history, system)
    result = service.lens_view(ui.services, ui.client(request), subject, sublayers=bool(sublayers))
    return {**result.grid.to_dict(), "tokens": result.columns, "notice": result.notice,
            "forward": result.forward, "seconds": round(result.seconds, 3),
            "csv": csv_text(result.grid.to_frame(result.texts))}


def attribution(ui: UIContext, history: list[dict], token: int, method: str = "gradient×input",
                per_token: bool = False, model: str = "", system: str | None = None, request: gr.Request = None
                ) -> dict[str, Any]:
    """What in the prompt drove answer token `token` (0-based): gradient×input per token and summed per turn,
    or occlusion per turn (or per token)."""
    subject = service.history_subject(model or ui.services.default_model, history, system)
    result = service.attribution_view(ui.services, ui.client(request), subject, token, method, bool(per_token))
    texts = dict(enumerate(result.pieces))
    return {**result.attribution.to_dict(), "pieces": result.pieces, "target_text": result.target_text,
            "per_turn": [{"unit": u.label, "kind": u.kind, "score": s} for u, s in result.per_turn],
            "notice": result.notice, "seconds": round(result.seconds, 3),
            "csv": csv_text(result.attribution.to_frame(texts))}


def decisions(ui: UIContext, message: str, history: list[dict] | None = None, model: str = "",
              settings: dict | None = None, system: str | None = None, request: gr.Request = None
              ) -> dict[str, Any]:
    """Answer `message` and say, per token, which sampling stage decided what; with the run's JSON (for
    /bundle)."""
    run = chat.api_answer(ui.services, ui.client(request), message, history, model, settings, system, top_n=20)
    rows = service.decision_rows(run)
    return {"text": chat.answer_text(run), "summary": service.run_summary(run), "tokens": rows,
            "run": run_to_json(run), "csv": csv_text(pd.DataFrame.from_records(rows))}


def branch(ui: UIContext, history: list[dict], at: int, token: Any, model: str = "", settings: dict | None = None,
           system: str | None = None, request: gr.Request = None) -> dict[str, Any]:
    """Write `token` (an id or one token's text) at answer token `at` of the answer ending `history`, and
    generate on from there."""
    report = branches.branch_report(ui.services, ui.client(request), model, history, system, at, token, settings)
    return {**report, "csv": csv_text(pd.DataFrame({"token_id": report["token_ids"]}))}


def score(ui: UIContext, text: str, model: str = "", question: str = "", template: bool = False,
          request: gr.Request = None) -> dict[str, Any]:
    """Per-token probability, rank, surprisal and entropy of `text` under `model`, and its perplexity; in
    the chat template as the answer to `question` when `template`."""
    result = service.score_view(ui.services, ui.client(request), model or ui.services.default_model, text,
                                question or "", bool(template))
    return {**result.score.to_dict(), "notice": result.notice, "seconds": round(result.seconds, 3),
            "csv": csv_text(result.score.to_frame(result.texts))}


def divergence(ui: UIContext, text: str, model_a: str, model_b: str, question: str = "", template: bool = False,
               request: gr.Request = None) -> dict[str, Any]:
    """Two models that share a tokenizer on one text: per-token KL both ways, top-1 agreement, the ten
    positions where they differ most."""
    result = service.divergence_view(ui.services, ui.client(request), model_a, model_b, text, question or "",
                                     bool(template))
    return {**result.divergence.to_dict(), "notice": result.notice, "seconds": round(result.seconds, 3),
            "csv": csv_text(result.divergence.to_frame(result.texts))}


def sinks(ui: UIContext, history: list[dict], model: str = "", system: str | None = None,
          request: gr.Request = None) -> dict[str, Any]:
    """Per layer and head: the attention mass on the first token and on template/special tokens over the
    conversation's last tokens."""
    cache, view = internals.conversation_sinks(ui.services, ui.client(request), model, history, system)
    return {"model": cache.model, "summary": view.summary, "heads": view.table.to_dict(orient="records"),
            "csv": csv_text(view.table)}


def bundle(ui: UIContext, run: str, request: gr.Request = None) -> str:
    """An evidence bundle (one offline HTML page) of a run's JSON as /decisions returns it."""
    return service.run_bundle(ui.services, ui.client(request), run)
