"""Compare tab: panes A | B with their own model and settings, one prompt and seed, streaming together."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from qdemo.errors import QdemoError
from qdemo.runs import RunRecord
from qdemo.ui import chatflow, compareflow
from qdemo.ui.chat_tab import UI_INTERVAL_S, load_or_message
from qdemo.ui.context import AppContext, SessionComponents, StopFlag, next_run_id
from qdemo.ui.controls import build_controls, defaults_for, to_params
from qdemo.ui.zerogpu import on_gpu
from qdemo.views.compare import side_by_side_frame, tps_overlay_figure

EXAMPLES = ["Write a limerick about a GPU.", "用三句话解释什么是注意力机制。"]


def build(ctx: AppContext, session: SessionComponents, tab: gr.Tab) -> None:
    spec = ctx.registry.get(ctx.default_model)
    stop = gr.State(StopFlag())
    with gr.Row():
        prompt = gr.Textbox(label="prompt (both sides)", lines=2, scale=4, elem_id="compare-prompt")
        seed = gr.Number(value=1234, precision=0, label="seed (both sides)", scale=1, elem_id="compare-seed")
    with gr.Row():
        run_btn = gr.Button("Run both", variant="primary", elem_id="compare-run")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    gr.Examples(EXAMPLES, inputs=prompt, label="examples")
    panes = []
    with gr.Row():
        for side, mode in (("A", "greedy"), ("B", "sample")):
            with gr.Column():
                gr.Markdown(f"### {side}")
                model = gr.Dropdown(ctx.choices(), value=ctx.default_model, label=f"model {side}",
                                    elem_id=f"compare-model-{side.lower()}")
                with gr.Accordion(f"sampling {side}", open=False):
                    controls = build_controls(spec, prefix=f"compare-{side.lower()}-", decoding=mode)
                output = gr.Markdown("", elem_id=f"compare-out-{side.lower()}", height=320)
                metrics = gr.Markdown(chatflow.metrics_line(None))
                panes.append((model, controls, output, metrics))
    verdict = gr.Markdown("", elem_id="compare-verdict")
    with gr.Row():
        table = gr.Dataframe(label="side by side", interactive=False, elem_id="compare-table")
        chart = gr.Plot(label="tokens per second", elem_id="compare-chart")

    for model, controls, _, _ in panes:
        model.input(lambda name: defaults_for(ctx.registry.get(name)), model, controls.components(),
                    api_visibility="private")

    (model_a, controls_a, out_a, metrics_a), (model_b, controls_b, out_b, metrics_b) = panes
    n_a = len(controls_a.components())
    outputs = [out_a, out_b, metrics_a, metrics_b, verdict, table, chart, session.runs]

    def run_both(text, seed_value, name_a, name_b, *rest, request: gr.Request = None, progress=gr.Progress()):
        values_a, values_b, (flag, runs) = rest[:n_a], rest[n_a:2 * n_a], rest[2 * n_a:]
        def verdict_only(text: str) -> list[Any]:
            return [gr.skip()] * 4 + [text] + [gr.skip()] * (len(outputs) - 5)

        turn = chatflow.prepare_turn(text, [], None, ctx.limits.max_input_chars)
        if turn is None:
            yield verdict_only("Type a prompt first.")
            return
        refusal = ctx.admit(request)
        if refusal:
            yield verdict_only(f"⚠️ {refusal}")
            return
        try:
            params_a = to_params(*values_a).replace(seed=int(seed_value) if seed_value is not None else None)
            params_b = to_params(*values_b).replace(seed=int(seed_value) if seed_value is not None else None)
        except (ValueError, OverflowError) as exc:
            yield verdict_only(f"⚠️ Sampling settings: {exc}")
            return
        params_a, capped_a = chatflow.cap_params(params_a, ctx.limits.max_new_tokens)
        params_b, capped_b = chatflow.cap_params(params_b, ctx.limits.max_new_tokens)
        notice = " ".join(dict.fromkeys(n for n in (turn.notice, capped_a, capped_b) if n))
        lm_a, error_a = load_or_message(ctx, name_a, progress)
        lm_b, error_b = load_or_message(ctx, name_b, progress) if lm_a is not None else (None, "")
        if lm_a is None or lm_b is None:
            yield verdict_only(error_a or error_b)
            return
        first = next_run_id(runs)
        run_a = RunRecord(run_id=first, model=name_a, settings=params_a.to_dict(), label="A")
        run_b = RunRecord(run_id=first + 1, model=name_b, settings=params_b.to_dict(), label="B")
        event = flag.arm()
        shown_at = 0.0
        try:
            with ctx.generation(name_a) as (lm_a, lock_a), ctx.generation(name_b) as (lm_b, lock_b):
                for run_a, run_b in compareflow.run_pair(lm_a, lm_b, turn.messages, params_a, params_b, run_a,
                                                         run_b, event, step_locks=(lock_a, lock_b)):
                    if time.perf_counter() - shown_at < UI_INTERVAL_S:
                        continue
                    shown_at = time.perf_counter()
                    yield [chatflow.answer_text(run_a), chatflow.answer_text(run_b), chatflow.metrics_line(run_a),
                           chatflow.metrics_line(run_b), notice or "streaming…", *[gr.skip()] * 3]
        except (QdemoError, ValueError) as exc:
            yield verdict_only(f"⚠️ {exc}")
            return
        report = compareflow.divergence_report(lm_a, lm_b, run_a, run_b, params_a, params_b)
        yield [chatflow.answer_text(run_a), chatflow.answer_text(run_b), chatflow.metrics_line(run_a),
               chatflow.metrics_line(run_b), compareflow.describe(report), side_by_side_frame(run_a, run_b),
               tps_overlay_figure([run_a, run_b]), runs + [run_a, run_b]]

    run_both = on_gpu(run_both)
    inputs: list[Any] = [prompt, seed, model_a, model_b, *controls_a.components(), *controls_b.components(), stop,
                         session.runs]
    run_btn.click(run_both, inputs, outputs, api_visibility="private", **ctx.queue_kwargs())
    prompt.submit(run_both, inputs, outputs, api_visibility="private", **ctx.queue_kwargs())
    stop_btn.click(lambda flag: flag.set(), stop, None, queue=False, api_visibility="private")
