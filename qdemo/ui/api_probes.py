"""Named API endpoints of the Inspect views: /lens, /attribution, /decisions, /branch, /score, /divergence,
/sinks, /bundle. Each answers JSON with a "csv" field holding the same table as the page's CSV download. Arguments
are read at the boundary through one strict reader (qdemo.services.arguments: every refusal names its field, a long
text is cut with a notice) and results converted here; the flow is the services' (qdemo.services.probing, chat,
branches, internals), with the same admission as the page. A caller who cancels or goes away sets the request's
`stop`, which the views and the answer read between chunks (qdemo.ui.context.stoppable)."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import gradio as gr
import pandas as pd

from qdemo.core.runs import run_to_json
from qdemo.services import branches, chat, internals
from qdemo.services import probing as service
from qdemo.services.arguments import Arguments
from qdemo.ui.context import UIContext
from qdemo.views.export import csv_text

MAX_ANSWER_TOKEN = 1_000_000  # a token index beyond any answer (the view checks the answer's own length)


def register(ui: UIContext) -> None:
    for fn in (lens, attribution, decisions, branch, score, divergence, sinks, bundle):
        ui.endpoint(partial(fn, ui), fn.__name__)


def _joined(*notes: str) -> str:
    """The reader's notices (sentences) and a view's (clauses) as one line."""
    return "; ".join(n.rstrip(".") for n in notes if n)


def lens(ui: UIContext, history: list[dict], model: str = "", system: str | None = None, sublayers: bool = False,
         request: gr.Request = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """Logit lens over the answer that ends `history`: per layer (and sublayer) and answer token, the lens's
    top-10 and the probability of the token that followed; the commitment layer per token."""
    args = Arguments(ui.services.limits)
    past, name = args.history(history, answer="to inspect"), args.model(model) or ui.services.default_model
    subject = service.history_subject(name, past, args.optional_text(system, "system"))
    result = service.lens_view(ui.services, ui.client(request), subject, sublayers=args.flag(sublayers, "sublayers"),
                               stop=stop)
    return {**result.grid.to_dict(), "tokens": result.columns, "notice": _joined(args.notice, result.notice),
            "forward": result.forward, "seconds": round(result.seconds, 3),
            "csv": csv_text(result.grid.to_frame(result.texts))}


def attribution(ui: UIContext, history: list[dict], token: int, method: str = "gradient×input",
                per_token: bool = False, model: str = "", system: str | None = None, request: gr.Request = None,
                stop: threading.Event | None = None) -> dict[str, Any]:
    """What in the prompt drove answer token `token` (0-based): gradient×input per token and summed per turn,
    or occlusion per turn (or per token)."""
    args = Arguments(ui.services.limits)
    past = args.history(history, answer="to inspect")
    position = args.whole(token, "token (an answer position)", 0, MAX_ANSWER_TOKEN)
    how = args.choice(method, "method", service.METHODS, default="gradient×input")
    subject = service.history_subject(args.model(model) or ui.services.default_model, past,
                                      args.optional_text(system, "system"))
    result = service.attribution_view(ui.services, ui.client(request), subject, position, how,
                                      args.flag(per_token, "per_token"), stop=stop)
    texts = dict(enumerate(result.pieces))
    return {**result.attribution.to_dict(), "pieces": result.pieces, "target_text": result.target_text,
            "per_turn": [{"unit": u.label, "kind": u.kind, "score": s} for u, s in result.per_turn],
            "notice": _joined(args.notice, result.notice), "seconds": round(result.seconds, 3),
            "csv": csv_text(result.attribution.to_frame(texts))}


def decisions(ui: UIContext, message: str, history: list[dict] | None = None, model: str = "",
              settings: dict | None = None, system: str | None = None, request: gr.Request = None,
              stop: threading.Event | None = None) -> dict[str, Any]:
    """Answer `message` and say, per token, which sampling stage decided what; with the run's JSON (for
    /bundle)."""
    args = Arguments(ui.services.limits)
    text, past = args.text(message, "message", required=True), args.history(history)
    run = chat.api_answer(ui.services, ui.client(request), text, past, args.model(model), args.settings(settings),
                          args.optional_text(system, "system"), top_n=20, stop=stop)
    rows = service.decision_rows(run)
    return {"text": chat.answer_text(run), "reason": run.done.reason if run.done else None, "notice": args.notice,
            "summary": service.run_summary(run), "tokens": rows, "run": run_to_json(run),
            "reused_tokens": run.prefill.reused_tokens if run.prefill else 0,
            "csv": csv_text(pd.DataFrame.from_records(rows))}


def branch(ui: UIContext, history: list[dict], at: int, token: Any, model: str = "", settings: dict | None = None,
           system: str | None = None, request: gr.Request = None) -> dict[str, Any]:
    """Write `token` (an id or one token's text) at answer token `at` of the answer ending `history`, and
    generate on from there."""
    args = Arguments(ui.services.limits)
    past = args.history(history, answer="to branch from")
    report = branches.branch_report(ui.services, ui.client(request), args.model(model), past,
                                    args.optional_text(system, "system"), args.whole(at, "at", 0, MAX_ANSWER_TOKEN),
                                    args.token(token, "token"), args.settings(settings))
    return {**report, "notice": args.notice, "csv": csv_text(pd.DataFrame({"token_id": report["token_ids"]}))}


def score(ui: UIContext, text: str, model: str = "", question: str = "", template: bool = False,
          request: gr.Request = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """Per-token probability, rank, surprisal and entropy of `text` under `model`, and its perplexity; in
    the chat template as the answer to `question` when `template`."""
    args = Arguments(ui.services.limits)
    scored, asked = args.text(text, "text", required=True), args.text(question, "question")
    result = service.score_view(ui.services, ui.client(request), args.model(model) or ui.services.default_model,
                                scored, asked, args.flag(template, "template"), stop=stop)
    return {**result.score.to_dict(), "notice": _joined(args.notice, result.notice),
            "seconds": round(result.seconds, 3), "csv": csv_text(result.score.to_frame(result.texts))}


def divergence(ui: UIContext, text: str, model_a: str, model_b: str, question: str = "", template: bool = False,
               request: gr.Request = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """Two models that share a tokenizer on one text: per-token KL both ways, top-1 agreement, the ten
    positions where they differ most."""
    args = Arguments(ui.services.limits)
    compared, asked = args.text(text, "text", required=True), args.text(question, "question")
    result = service.divergence_view(ui.services, ui.client(request), args.model(model_a, "model_a"),
                                     args.model(model_b, "model_b"), compared, asked, args.flag(template, "template"),
                                     stop=stop)
    return {**result.divergence.to_dict(), "notice": _joined(args.notice, result.notice),
            "seconds": round(result.seconds, 3), "csv": csv_text(result.divergence.to_frame(result.texts))}


def sinks(ui: UIContext, history: list[dict], model: str = "", system: str | None = None,
          request: gr.Request = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """Per layer and head: the attention mass on the first token and on template/special tokens over the
    conversation's last tokens (an empty history: over a short example text, as the page does)."""
    args = Arguments(ui.services.limits)
    past, instructions = args.history(history), args.optional_text(system, "system")
    cache, view = internals.conversation_sinks(ui.services, ui.client(request), args.model(model), past,
                                               instructions, stop=stop)
    return {"model": cache.model, "summary": view.summary, "notice": args.notice,
            "heads": view.table.to_dict(orient="records"), "csv": csv_text(view.table)}


def bundle(ui: UIContext, run: str, request: gr.Request = None) -> str:
    """An evidence bundle (one offline HTML page) of a run's JSON as /decisions returns it."""
    Arguments(ui.services.limits).run(run, ui.services)
    return service.run_bundle(ui.services, ui.client(request), run)
