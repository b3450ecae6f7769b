"""Sampling lab: compute one context's next-token logits once, then move the sliders and watch each stage of the
sampling chain reshape the distribution instantly (no model call), draw N samples, or append a token by hand.

The model runs only on "Compute" and "Append" (one forward each, via introspect.next_token_logits); everything
else re-applies the processor chain to the logits kept in the session's state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import torch

from qdemo.errors import QdemoError
from qdemo.events import StageTopN
from qdemo.introspect import next_token_logits
from qdemo.lab import MAX_SAMPLES, sample_counts, stage_distributions
from qdemo.limits import clean_text, cut_text
from qdemo.loader import LoadedModel
from qdemo.sampling import SamplingParams
from qdemo.ui.chat_tab import load_or_message
from qdemo.ui.context import AppContext, SessionComponents
from qdemo.ui.controls import to_params, whole_number
from qdemo.ui.labflow import CONTEXT_MODES, context_ids
from qdemo.ui.zerogpu import on_gpu
from qdemo.views.lab import histogram_figure
from qdemo.views.labels import token_label
from qdemo.views.stages import stage_figure, stage_table

DECODING = ("sample", "greedy")
EXAMPLES = [["The capital of France is", "raw text"],
            ["Once upon a time, there was a", "raw text"],
            ["床前明月光，", "raw text"],
            ["Give me one word that rhymes with 'cat'.", "chat"],
            ["用一个词形容今天的天气。", "chat"]]
HINT = "Type a context, press **Compute next-token logits**, then move the sliders."


@dataclass(frozen=True)
class LabContext:
    """One context and its next-token logits: what the sliders re-process without calling the model."""

    model: str
    ids: tuple[int, ...]
    logits: torch.Tensor  # fp32 [vocab], on the CPU


@dataclass(frozen=True)
class LabView:
    stages: tuple[StageTopN, ...]
    figure: go.Figure
    table: pd.DataFrame
    choices: list[tuple[str, int]]  # the final stage's tokens with p > 0, for the Append dropdown


# --- logic (no Gradio) ----------------------------------------------------------------------------------------

def lab_params(decoding: str, temperature: Any, top_k: Any, top_p: Any, min_p: Any,
               repetition_penalty: Any) -> SamplingParams:
    """Slider values → SamplingParams; ValueError with a readable sentence for a bad combination.
    Temperature 0 with "sample" is greedy, as SamplingParams defines it."""
    if decoding not in DECODING:
        raise ValueError(f"decoding must be one of {', '.join(DECODING)}, got {decoding!r}")
    return to_params(decoding, 2, temperature, top_k, top_p, min_p, repetition_penalty, 1, None)


def compute_context(lm: LoadedModel, text: str, mode: str) -> LabContext:
    """Tokenize the context (chat template or raw) and run the one forward."""
    ids = context_ids(lm, text, mode)
    return LabContext(model=lm.spec.name, ids=tuple(ids), logits=next_token_logits(lm, ids))


def append_token(lm: LoadedModel, context: LabContext, token_id: Any) -> LabContext:
    """The context grown by one token, with the logits of the longer context (one forward)."""
    if token_id is None or token_id == "":
        raise ValueError("pick a token to append first")
    token = int(token_id)
    ids = list(context.ids) + [token]
    if len(ids) >= lm.spec.max_context:
        raise ValueError(f"{lm.spec.name}: the context would have {len(ids)} tokens; the model takes "
                         f"{lm.spec.max_context}. Start again from a shorter context.")
    return LabContext(model=context.model, ids=tuple(ids), logits=next_token_logits(lm, ids))


def token_texts(lm: LoadedModel, ids: Sequence[int]) -> dict[int, str]:
    """Each id decoded on its own (the figures make whitespace visible themselves)."""
    return {int(i): lm.tokenizer.decode([int(i)]) for i in ids}


def lab_view(lm: LoadedModel, context: LabContext, params: SamplingParams, top_n: int = 20) -> LabView:
    """Re-apply the chain to the stored logits: stages, their figure and table, and the Append choices."""
    stages = stage_distributions(context.logits, context.ids, params, top_n=int(top_n))
    ids = {i for stage in stages for i in stage.token_ids}
    texts = token_texts(lm, ids)
    final = stages[-1]
    chosen = final.token_ids[0] if params.greedy else None  # greedy: the argmax is what generate would pick
    title = f"{context.model} · next token after {len(context.ids)} context tokens"
    choices = [(f"{token_label(texts[i])}  · id {i} · p={p:.3f}", int(i))
               for i, p in zip(final.token_ids, final.probs) if p > 0]
    table = stage_table(stages, texts).round(4).reset_index()
    return LabView(stages=stages, figure=stage_figure(stages, texts, chosen=chosen, title=title),
                   table=table, choices=choices)


def sample_view(lm: LoadedModel, context: LabContext, params: SamplingParams, n: Any,
                seed: Any = 0) -> tuple[Counter, go.Figure]:
    """Draw n next tokens from the final distribution (no model call) and chart how often each came out."""
    count = whole_number(n, "number of samples")
    counts = sample_counts(context.logits, context.ids, params, count, seed=whole_number(seed or 0, "seed"))
    title = f"{count:,} samples ({'greedy: always the argmax' if params.greedy else 'from the final stage'})"
    return counts, histogram_figure(counts, token_texts(lm, counts), title=title)


def context_text(lm: LoadedModel, context: LabContext) -> str:
    """The whole context as the model sees it, special tokens included."""
    return lm.tokenizer.decode(list(context.ids), skip_special_tokens=False)


def status_line(context: LabContext) -> str:
    return f"**{context.model}** · context {len(context.ids)} tokens · logits ready (the sliders reuse them)"


# --- UI -------------------------------------------------------------------------------------------------------

def build(ctx: AppContext, session: SessionComponents, tab: gr.Tab) -> None:
    s = ctx.registry.get(ctx.default_model).sampling
    state = gr.State(None)  # LabContext of this session, or None
    gr.Markdown("Compute the next-token logits **once**; every slider then re-applies the sampling chain "
                "(repetition penalty → temperature → top-k → top-p → min-p) to those same logits instantly. "
                "**Append** a token to step through a generation by hand.")
    with gr.Row():
        model = gr.Dropdown(ctx.choices(), value=ctx.default_model, label="model", elem_id="lab-model", scale=2)
        mode = gr.Radio(list(CONTEXT_MODES), value="raw text", label="context is", elem_id="lab-mode", scale=2)
    context_box = gr.Textbox(label="context · 上下文", lines=3, elem_id="lab-context",
                             placeholder="e.g. The capital of France is · 床前明月光，")
    gr.Examples(EXAMPLES, inputs=[context_box, mode], label="examples")
    compute_btn = gr.Button("Compute next-token logits", variant="primary", elem_id="lab-compute")
    message = gr.Markdown(HINT, elem_id="lab-message")
    with gr.Row():
        decoding = gr.Radio(list(DECODING), value="sample" if s.do_sample else "greedy", label="decoding",
                            elem_id="lab-decoding")
        top_n = gr.Slider(5, 50, value=20, step=1, label="tokens shown per stage", elem_id="lab-top-n")
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=s.temperature, step=0.05, label="temperature (0 = greedy)",
                                elem_id="lab-temperature")
        top_k = gr.Slider(0, 200, value=s.top_k, step=1, label="top-k (0 = off)", elem_id="lab-top-k")
        top_p = gr.Slider(0.01, 1.0, value=s.top_p, step=0.01, label="top-p (1 = off)", elem_id="lab-top-p")
    with gr.Row():
        min_p = gr.Slider(0.0, 0.99, value=s.min_p, step=0.01, label="min-p (0 = off)", elem_id="lab-min-p")
        repetition_penalty = gr.Slider(0.5, 2.0, value=s.repetition_penalty, step=0.01,
                                       label="repetition penalty (1 = off)", elem_id="lab-repetition-penalty")
    stages_plot = gr.Plot(label="stage by stage", elem_id="lab-stages")
    table = gr.Dataframe(label="probability per stage (blank: not in that stage's top-N)", interactive=False,
                         elem_id="lab-table")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Sample N")
            with gr.Row():
                n = gr.Number(value=1000, minimum=1, maximum=MAX_SAMPLES, precision=0, label="N (1–10000)",
                              elem_id="lab-n")
                seed = gr.Number(value=0, minimum=0, precision=0, label="seed", elem_id="lab-seed")
            sample_btn = gr.Button("Sample N", elem_id="lab-sample")
            histogram = gr.Plot(label="sampled tokens", elem_id="lab-histogram")
        with gr.Column():
            gr.Markdown("### Step by hand")
            token = gr.Dropdown([], label="token to append (final stage)", elem_id="lab-token")
            append_btn = gr.Button("Append", elem_id="lab-append")
            context_view = gr.Textbox(label="context so far (as the model sees it)", lines=6, interactive=False,
                                      elem_id="lab-context-view")

    slider_values = [decoding, temperature, top_k, top_p, min_p, repetition_penalty, top_n]
    view_outputs = [stages_plot, table, token, message]

    def render(lm: LoadedModel, context: LabContext, values: Sequence[Any], note: str = "") -> list[Any]:
        *chain, shown = values
        try:
            params = lab_params(*chain)
            view = lab_view(lm, context, params, top_n=whole_number(shown, "tokens shown"))
        except ValueError as exc:
            return [gr.skip(), gr.skip(), gr.skip(), f"⚠️ Sampling settings: {exc}"]
        first = view.choices[0][1] if view.choices else None
        return [view.figure, view.table, gr.Dropdown(choices=view.choices, value=first),
                note or status_line(context)]

    def compute(name, text, context_mode, *values, request: gr.Request = None, progress=gr.Progress()):
        refusal = ctx.admit(request)
        if refusal:
            return [gr.skip()] * 6 + [f"⚠️ {refusal}"]
        lm, error = load_or_message(ctx, name, progress)
        if lm is None:
            return [gr.skip()] * 3 + [gr.skip()] * 3 + [error]
        text, note = cut_text(clean_text(text) if isinstance(text, str) else "", ctx.limits.max_input_chars,
                              "context")
        try:
            with ctx.generation(name) as (lm, step_lock), step_lock():
                context = compute_context(lm, text, context_mode)
        except (QdemoError, ValueError) as exc:
            return [gr.skip()] * 6 + [f"⚠️ {exc}"]
        return [context, context_text(lm, context), None,
                *render(lm, context, values, f"{note} {status_line(context)}" if note else "")]

    compute = on_gpu(compute)
    compute_outputs = [state, context_view, histogram, *view_outputs]
    compute_btn.click(compute, [model, context_box, mode, *slider_values], compute_outputs,
                      api_visibility="private", **ctx.queue_kwargs())
    context_box.submit(compute, [model, context_box, mode, *slider_values], compute_outputs,
                       api_visibility="private", **ctx.queue_kwargs())

    def apply(context: LabContext | None, *values):
        if context is None:
            return [gr.skip()] * len(view_outputs)
        try:
            lm = ctx.models.get(context.model)  # already loaded by Compute: no forward, no load
        except (QdemoError, ValueError, OSError, RuntimeError) as exc:
            return [gr.skip()] * 3 + [f"⚠️ {exc}"]
        return render(lm, context, values)

    for slider in (temperature, top_k, top_p, min_p, repetition_penalty, top_n):
        slider.change(apply, [state, *slider_values], view_outputs, trigger_mode="always_last",
                      show_progress="hidden", api_visibility="private")
    decoding.change(apply, [state, *slider_values], view_outputs, show_progress="hidden",
                    api_visibility="private")

    def sample(context: LabContext | None, count, seed_value, *values):
        if context is None:
            return gr.skip(), "Compute the next-token logits first."
        try:
            lm = ctx.models.get(context.model)
            params = lab_params(*values[:-1])
            _, figure = sample_view(lm, context, params, count, seed_value)
        except (QdemoError, ValueError) as exc:
            return gr.skip(), f"⚠️ {exc}"
        return figure, status_line(context)

    sample_btn.click(sample, [state, n, seed, *slider_values], [histogram, message], api_visibility="private")

    def append(context: LabContext | None, token_id, *values, progress=gr.Progress()):
        if context is None:
            return [gr.skip()] * 3 + [gr.skip()] * 3 + ["Compute the next-token logits first."]
        lm, error = load_or_message(ctx, context.model, progress)
        if lm is None:
            return [gr.skip()] * 6 + [error]
        try:
            with ctx.generation(context.model) as (lm, step_lock), step_lock():
                longer = append_token(lm, context, token_id)
        except (QdemoError, ValueError) as exc:
            return [gr.skip()] * 6 + [f"⚠️ {exc}"]
        note = f"Appended {token_label(lm.tokenizer.decode([int(token_id)]))} (id {int(token_id)}). " \
               + status_line(longer)
        return [longer, context_text(lm, longer), None, *render(lm, longer, values, note)]

    append = on_gpu(append)
    append_btn.click(append, [state, token, *slider_values], compute_outputs, api_visibility="private",
                     **ctx.queue_kwargs())

    def change_model(name):
        spec = ctx.registry.get(name).sampling
        return [None, "", None, None, pd.DataFrame(columns=["token_id", "token"]), gr.Dropdown(choices=[], value=None),
                f"Model changed to **{name}**: press **Compute next-token logits**.",
                "sample" if spec.do_sample else "greedy", spec.temperature, spec.top_k, spec.top_p, spec.min_p,
                spec.repetition_penalty]

    model.input(change_model, model, [*compute_outputs, decoding, temperature, top_k, top_p, min_p,
                                      repetition_penalty], api_visibility="private")
