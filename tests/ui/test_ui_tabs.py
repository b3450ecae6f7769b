"""Sampling lab, Internals and Performance: the app builds with their components, and the services their handlers
call agree with the core functions they wrap (no Gradio in these services)."""

from __future__ import annotations

import threading

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch

from qdemo.core.engine import generate
from qdemo.core.runs import RunRecord
from qdemo.forwards.gate import StepGate
from qdemo.models.registry import load_registry
from qdemo.probes.introspect import attention_map, mean_over_heads, next_token_logits
from qdemo.probes.stages import stage_distributions
from qdemo.sampling import SamplingParams
from qdemo.services import chat, internals, lab, perf, settings
from qdemo.services.admission import Refused, Services
from qdemo.serving.limits import Limits
from qdemo.serving.local import LocalBackend
from qdemo.serving.pool import ModelPool
from qdemo.ui import chat_handlers, chat_parts
from qdemo.ui.app import build_app
from qdemo.ui.context import SessionComponents, UIContext
from qdemo.views.perf import run_name, runs_table

ELEM_IDS = {
    "lab-model", "lab-context", "lab-mode", "lab-compute", "lab-stages", "lab-table", "lab-sample", "lab-histogram",
    "lab-token", "lab-append", "lab-context-view", "lab-temperature", "lab-top-k", "lab-top-p", "lab-min-p",
    "lab-repetition-penalty", "lab-mode", "lab-n",
    "internals-model", "internals-refresh", "attn-run", "attn-plot", "attn-layer", "attn-head", "attn-scale",
    "rope-freq", "rope-angles", "rope-decay", "rope-info", "model-card", "attn-hide-special", "sink-summary",
    "lens-run", "lens-grid", "lens-cell", "lens-csv", "lens-json", "attr-pick", "attr-run", "attr-text", "attr-turns",
    "score-model", "score-model-b", "score-text", "score-run", "div-run", "score-reuse", "bundle-make", "bundle-open",
    "decided-filter", "decided-summary", "branch-run", "branch-tree",
    "perf-refresh", "perf-clear", "perf-latency", "perf-tps", "perf-memory", "perf-table", "perf-csv",
    "chat-notice", "token-view", "token-measure", "token-legend", "stage-notes", "prompt-view", "pin-seed",
}


@pytest.fixture(scope="module")
def services(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    return Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                    limits=Limits(requests_per_minute=10_000))


@pytest.fixture(scope="module")
def backend(tiny_lm):
    return LocalBackend(tiny_lm, StepGate())


def count_forwards(lm):
    calls = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_app_builds_with_every_tab(tiny_registry_path):
    demo = build_app(load_registry(tiny_registry_path))
    elem_ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert ELEM_IDS <= elem_ids, ELEM_IDS - elem_ids
    tabs = {block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)}
    assert {"Chat", "Compare", "Sampling lab", "Internals", "Inspect", "Performance"} <= tabs
    internals_tab = next(b for b in demo.blocks.values() if isinstance(b, gr.Tab) and b.label == "Internals")
    assert any((internals_tab._id, "select") in fn.targets for fn in demo.fns.values())  # loads when opened
    # Only the named endpoints are public; every page event stays out of the API.
    public = sorted(fn.api_name for fn in demo.fns.values() if fn.api_visibility != "private")
    assert public == ["arena_battle", "arena_leaderboard", "arena_vote", "attribution", "batch", "branch", "bundle",
                      "chat", "compare", "decisions", "divergence", "lens", "next_token", "score", "sinks", "sweep"]
    # Every event passes the one guard, page events and named endpoints alike. The exception is Gradio's own: the
    # examples' loaders (they copy an example into a box).
    unguarded = [fn for fn in demo.fns.values() if not getattr(fn.fn, "qdemo_guarded", False)]
    assert {fn.name for fn in unguarded} == {"load_example"}


def _event(demo, name: str):
    """The first page event whose handler is `name`."""
    matches = [fn for fn in demo.fns.values() if fn.name == name and fn.api_visibility == "private"]
    assert matches, f"no page event runs {name}"
    return matches[0]


def _targets(demo, fn) -> set[tuple[str | None, str]]:
    return {(getattr(demo.blocks.get(block_id), "elem_id", None), event) for block_id, event in fn.targets}


def test_send_arms_a_turn_in_order_then_one_queued_answer(tiny_registry_path):
    """Enter and the Send button are one event: it shows the message and arms the turn; the answer follows it in
    the generation group, with its progress on the chat. Clear and the chatbot's trash icon are one event too, and
    it interrupts the answers (the session's own stop, not Gradio's cancel). Issue 19 items 1 and 2: everything that changes the chat (Send, Regenerate, Clear, Undo,
    Import, and Stop's second half) runs through the queue one at a time, so it happens in the order the page sent
    it and its update reaches the page after the answer's last one (an unqueued reply could overtake it); Stop's
    first half is unqueued and never waits."""
    demo = build_app(load_registry(tiny_registry_path))
    begin, answer = _event(demo, "begin"), _event(demo, "answer")
    assert _targets(demo, begin) == {("chat-input", "submit"), ("send", "click")}
    assert answer.trigger_after == begin._id and answer.queue and answer.concurrency_id == "generation"
    assert answer.tracks_progress and [c.elem_id for c in answer.show_progress_on] == ["chatbot"]
    assert {c.elem_id for c in answer.outputs} >= {"chatbot", "chat-notice", "metrics", "token-view", "export",
                                                   "branch-tree", "branch-hint"}
    clear = _event(demo, "clear_chat")
    assert _targets(demo, clear) == {("clear", "click"), ("chatbot", "clear")}
    # Clear ends the answer through the session's interrupt, never Gradio's cancel: its early "complete" let the
    # answer's late progress or update stay over the reset (CI)
    assert not [fn for fn in demo.fns.values() if fn.fn is None and fn.targets == clear.targets]
    edits = [_event(demo, name) for name in ("begin", "begin_regenerate", "clear_chat", "undo_turn", "import_chat")]
    stops = [fn for fn in demo.fns.values() if fn.name == "stop" and _targets(demo, fn) == {("stop", "click")}]
    assert sorted(fn.queue for fn in stops) == [False, True]
    ordered = edits + [fn for fn in stops if fn.queue]
    assert {(fn.queue, fn.concurrency_id, fn.concurrency_limit) for fn in ordered} == {(True, "chat-edits", 1)}
    for fn in edits + stops:  # each carries the page's number for the action (two requests can still cross)
        assert fn.js and "chat-action" in {c.elem_id for c in fn.inputs}, fn.name
    for fn in edits[2:]:  # Clear, Undo, Import reset the which-stage-decided line with the other panels
        assert "decided-summary" in {c.elem_id for c in fn.outputs}, fn.name
    describe = _event(demo, "describe_settings")
    assert {elem for elem, _ in _targets(demo, describe)} == {
        "chat-mode", "chat-num-beams", "chat-seed", "chat-temperature", "chat-top-k", "chat-top-p", "chat-min-p",
        "chat-repetition-penalty", "chat-max-new-tokens"}
    model_events = [fn for fn in demo.fns.values() if fn.tracks_progress]
    assert model_events and all(fn.concurrency_id == "generation" for fn in model_events)


def _chat_parts(services: Services) -> tuple[UIContext, chat_parts.ChatParts]:
    """The Chat tab's components, laid out as the app lays them out, for calling its handlers directly."""
    ui = UIContext(services)
    with gr.Blocks():
        session = SessionComponents(runs=gr.State([]), saved_runs=gr.BrowserState([]),
                                    conversation=gr.BrowserState({}))
        parts = chat_parts.layout(ui, session)
    return ui, parts


def _chat_data(parts: chat_parts.ChatParts, services: Services, chatbot: list, more: dict | None = None) -> dict:
    """What the page sends a Chat handler: the model's default settings in the sampling controls."""
    values = settings.defaults(services.registry.get(services.default_model))
    return {parts.state: chat.ChatSession(), parts.model: services.default_model, parts.system: "",
            parts.chatbot: chatbot, **{c: values[name] for name, c in parts.controls.by_field.items()}, **(more or {})}


def test_undo_clear_and_import_forget_the_which_stage_decided_line(services, tmp_path):
    """Issue 19 item 8: "Which stage decided: …" stayed on screen after Undo, Clear and Import, while the token
    view, the metrics and the prompt inspector were reset."""
    import json

    ui, parts = _chat_parts(services)
    talk = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({"qdemo_conversation": 1, "messages": talk}), encoding="utf-8")
    outputs = {"Clear": chat_handlers.clear_chat(parts, ui, _chat_data(parts, services, talk)),
               "Undo": chat_handlers.undo_turn(parts, _chat_data(parts, services, talk)),
               "Import": chat_handlers.import_chat(parts, ui, _chat_data(parts, services, [],
                                                                         {parts.import_btn: str(saved)}))}
    for name, out in outputs.items():
        assert out.get(parts.decided_md) == "", f"{name} left the which-stage-decided line as it was"
        assert out[parts.tokens_view] == chat_handlers.TOKENS_HINT and out[parts.prompt_view] == ""


# --- sampling lab -------------------------------------------------------------------------------------------

def test_lab_view_stages_equal_stage_distributions(services, tiny_lm):
    session = lab.LabSession()
    context, _ = lab.compute(services, session, "c", services.default_model, "The quick brown fox", "raw text")
    params = lab.lab_params("sample", 0.7, 20, 0.9, 0.0, 1.2)
    view = lab.view(context, params, top_n=15)
    ids = tiny_lm.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    assert list(context.ids) == ids and session.context is context
    assert view.stages == stage_distributions(next_token_logits(tiny_lm, ids), ids, params, top_n=15)
    assert [s.name for s in view.stages] == ["raw", "repetition_penalty", "temperature", "top_k", "top_p"]
    assert list(view.table.columns) == ["token_id", "token", *[s.name for s in view.stages]]
    final = view.stages[-1]
    assert [i for _, i in view.choices] == [i for i, p in zip(final.token_ids, final.probs) if p > 0]
    assert context.text == tiny_lm.tokenizer.decode(ids)


def test_sliders_reuse_the_logits_without_a_forward(services):
    session = lab.LabSession()
    context, _ = lab.compute(services, session, "c", services.default_model, "你好，世界！", "chat")
    lm = services.pool.get(services.default_model)
    calls, handle = count_forwards(lm)
    try:
        for values in [("sample", 0.5, 0, 1.0, 0.0, 1.0), ("sample", 1.5, 5, 0.5, 0.1, 1.3),
                       ("greedy", 1.0, 40, 0.9, 0.0, 1.1), ("sample", 0.0, 40, 0.9, 0.0, 1.0)]:
            params = lab.lab_params(*values)
            lab.view(context, params, top_n=10)
            lab.sample(session, params, 50, seed=3)
    finally:
        handle.remove()
    assert calls == []


def test_lab_params_explain_bad_values():
    assert lab.lab_params("sample", 0.0, 40, 0.9, 0.0, 1.0).greedy  # T=0 is greedy, not an error
    assert lab.lab_params("greedy", 0.7, 40, 0.9, 0.0, 1.0).greedy
    with pytest.raises(ValueError, match="decoding"):
        lab.lab_params("beam search", 0.7, 40, 0.9, 0.0, 1.0)
    with pytest.raises(ValueError, match="whole number"):
        lab.lab_params("sample", 0.7, 2.5, 0.9, 0.0, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        lab.lab_params("sample", 0.7, 40, 0.0, 0.0, 1.0)


def test_sample_draws_probability_bars_with_the_expected_overlay(services):
    session = lab.LabSession()
    context, _ = lab.compute(services, session, "c", services.default_model, "Hello world", "raw text")
    params = lab.lab_params("sample", 1.0, 10, 1.0, 0.0, 1.0)
    counts, figure = lab.sample(session, params, 500, seed=1, top_n=10)
    assert sum(counts.values()) == 500 and len(counts) <= 10
    bars = next(t for t in figure.data if t.type == "bar")
    assert sum(bars.y) == pytest.approx(1.0)  # shares of the draws, not counts
    expected = next(t for t in figure.data if t.name == "expected p")
    final = stage_distributions(context.logits, context.ids, params, top_n=10)[-1]
    assert sorted(expected.y, reverse=True)[0] == pytest.approx(final.probs[0])
    greedy, _ = lab.sample(session, params.replace(do_sample=False), 20)
    assert greedy == {int(torch.argmax(context.logits)): 20}
    with pytest.raises(ValueError, match="whole number"):
        lab.sample(session, params, 2.5)
    with pytest.raises(ValueError, match="10,000"):
        lab.sample(session, params, 20_000)


def test_sample_pressed_while_compute_runs_waits_and_draws_from_the_new_logits(services):
    """Bug: Sample N pressed while Compute was running left the histogram blank (it raced the Compute)."""
    session = lab.LabSession()
    old, _ = lab.compute(services, session, "c", services.default_model, "one two", "raw text")
    session.expect_change()  # Compute clicked: it waits in the queue…
    waiting = threading.Event()
    settled_context = session.settled_context

    def announced_wait(timeout=None):
        waiting.set()
        return settled_context(timeout)

    session.settled_context = announced_wait
    result = {}

    def press_sample():
        result["counts"], _ = lab.sample(session, lab.lab_params("greedy", 1, 0, 1, 0, 1), 5)

    sampler = threading.Thread(target=press_sample)
    sampler.start()
    assert waiting.wait(10), "Sample N never asked for the logits"
    assert "counts" not in result  # …and Sample N waits for it instead of drawing from the old logits
    new, _ = lab.compute(services, session, "c", services.default_model, "你好，世界！今天", "raw text")
    sampler.join(10)
    assert not sampler.is_alive(), "Sample N still waits after Compute settled"
    assert result["counts"] == {int(torch.argmax(new.logits)): 5}
    assert int(torch.argmax(new.logits)) != int(torch.argmax(old.logits))  # so the draw shows which logits it used


def test_append_grows_the_context_by_one_forward(services, tiny_lm):
    session = lab.LabSession()
    context, _ = lab.compute(services, session, "c", services.default_model, "The quick brown", "raw text")
    view = lab.view(context, SamplingParams(do_sample=True, temperature=0.8), top_n=5)
    token = view.choices[0][1]
    calls, handle = count_forwards(services.pool.get(services.default_model))
    try:
        longer = lab.append(services, session, "c", token)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert list(longer.ids) == [*context.ids, token]
    torch.testing.assert_close(longer.logits, next_token_logits(tiny_lm, [*context.ids, token]))
    with pytest.raises(Refused, match="Pick a token"):
        lab.append(services, session, "c", None)
    session.context = lab.LabContext(context.model, tuple([5] * (tiny_lm.max_context - 1)), context.logits, "",
                                     context.decode)
    with pytest.raises(Refused, match="takes"):
        lab.append(services, session, "c", token)


def test_lab_context_errors_are_readable(services):
    with pytest.raises(Refused, match="empty"):
        lab.compute(services, lab.LabSession(), "c", services.default_model, "   ", "raw text")
    with pytest.raises(Refused, match="Compute the next-token logits first"):
        lab.sample(lab.LabSession(), SamplingParams(), 5)


# --- internals ----------------------------------------------------------------------------------------------

HISTORY = [{"role": "user", "content": "你好，今天天气怎么样？"},
           {"role": "assistant", "content": [{"type": "text", "text": "Hello! It is sunny."}]}]


def test_attention_is_one_forward_for_every_layer_then_redraws_from_the_cache(services, tiny_lm):
    session = internals.InternalsSession()
    lm = services.pool.get(services.default_model)
    calls, handle = count_forwards(lm)
    try:
        cache = internals.compute_attention(services, session, "c", services.default_model, HISTORY, None)
        assert len(calls) == 1
        views = [internals.attention_view(cache, layer, head, scale)
                 for layer in (0, 1) for head in ("mean", "all", "2") for scale in ("linear", "log")]
        assert len(calls) == 1  # layer, head and scale changes need no forward
    finally:
        handle.remove()
    messages = [{"role": "system", "content": tiny_lm.spec.system_prompt},
                {"role": "user", "content": HISTORY[0]["content"]},
                {"role": "assistant", "content": "Hello! It is sunny."}]
    expected_ids = tiny_lm.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                                         return_dict=False)
    assert cache.ids == list(expected_ids)[-internals.MAX_ATTENTION_TOKENS:]
    for layer in (0, 1):
        exact = attention_map(tiny_lm, cache.ids, layer)
        np.testing.assert_allclose(cache.maps[layer].astype(np.float32), exact, atol=1e-3)
    mean = internals.attention_view(cache, 1, "mean")
    np.testing.assert_allclose(mean.weights, mean_over_heads(attention_map(tiny_lm, cache.ids, 1)), atol=1e-3)
    grid = internals.attention_view(cache, 0, "all")
    assert grid.weights.shape == (4, len(cache.ids), len(cache.ids)) and len(views) == 12
    with pytest.raises(ValueError, match="layer"):
        internals.attention_view(cache, 5, "mean")
    with pytest.raises(ValueError, match="head"):
        internals.attention_view(cache, 0, "9")


def test_attention_caps_long_chats_and_handles_an_empty_one(services, tiny_lm):
    session = internals.InternalsSession()
    long = [{"role": "user", "content": "hello world " * 60}, {"role": "assistant", "content": "ok " * 40}]
    cache = internals.compute_attention(services, session, "c", services.default_model, long, None)
    view = internals.attention_view(cache, 0, "mean")
    assert len(cache.ids) == internals.MAX_ATTENTION_TOKENS < cache.total_tokens
    assert "last 128" in view.caption
    empty = internals.compute_attention(services, session, "c", services.default_model, [], None)
    assert empty.ids == tiny_lm.tokenizer.encode(internals.DEFAULT_TEXT, add_special_tokens=False)[-128:]
    assert "example text" in internals.attention_view(empty, 0).caption


def test_position_view_and_card(services, backend):
    facts = internals.model_facts(services, "c", services.default_model)
    assert "10000" in facts.position.summary and "head_dim **16**" in facts.position.summary
    assert np.asarray(facts.position.angles.data[0].z).shape == (internals.ROPE_POSITIONS, 8)
    assert len(facts.position.decay.data[0].x) == internals.ROPE_DISTANCE + 1
    assert dict(zip(facts.card["property"], facts.card["value"]))["layers"] == "2"
    assert (facts.layers, facts.heads) == (2, 4)


# --- performance --------------------------------------------------------------------------------------------

def _run(lm, run_id: int, label: str, params: SamplingParams) -> RunRecord:
    run = RunRecord(run_id=run_id, model=lm.spec.name, settings=params.to_dict(), label=label)
    return run.extend(generate(lm, messages=[{"role": "user", "content": "你好 hello"}], params=params, top_n=5))


def test_perf_views_and_csv_from_real_runs(tiny_lm, tmp_path):
    runs = [_run(tiny_lm, 1, "A", SamplingParams(max_new_tokens=6)),
            _run(tiny_lm, 2, "B", SamplingParams(do_sample=True, temperature=0.9, max_new_tokens=6, seed=3))]
    views = perf.perf_views(runs)
    names = [run_name(r) for r in runs]
    assert [t.name for t in views.latency.data if t.type == "scatter"] == names
    assert [t.name for t in views.tps.data] == names
    assert {t.legendgroup for t in views.memory.data} == set(names)
    assert list(views.table["run"]) == [1, 2]
    path = perf.write_csv(runs, tmp_path)
    loaded = pd.read_csv(path, keep_default_na=False)
    assert list(loaded.columns) == ["run", "label", "model", "reason", "prompt tokens", "new tokens",
                                    "first token (s)", "prefilled tokens", "reused tokens", "prefill tok/s",
                                    "decode tok/s", "peak memory (MiB)", "settings"]
    ended = {"max_tokens": "length limit", "eos": "finished", "stop_token": "finished (stop token)"}
    expected = [{"run": run.run_id, "label": run.label, "model": "tiny-qwen2", "reason": ended[run.done.reason],
                 "prompt tokens": run.done.stats.prompt_tokens, "new tokens": run.done.stats.new_tokens,
                 "first token (s)": round(run.done.stats.ttft_seconds, 3),
                 "prefilled tokens": run.done.stats.prompt_tokens, "reused tokens": 0,
                 "prefill tok/s": round(run.done.stats.prefill_tokens_per_s, 1),
                 "decode tok/s": round(run.done.stats.decode_tokens_per_s, 1),
                 "peak memory (MiB)": round(run.done.stats.peak_memory_bytes / 2 ** 20, 1), "settings": settings}
                for run, settings in zip(runs, ["greedy", "T=0.9 seed=3"])]
    assert loaded.to_dict(orient="records") == expected
    assert [row["new tokens"] for row in expected] == [len(run.tokens) for run in runs]
    assert "2** run(s)" in perf.summary_line(runs)


def test_runs_survive_a_reload_in_their_compact_form(tiny_lm):
    """The browser keeps the runs without their stage distributions; the Performance tab draws the same. Issue 19
    item 2: the copy is one JSON text, not a tree of per-token objects: Gradio's page copies every output's value
    on each progress message of an answer (about 20 a second), and a tree of some 15 values per token of every
    kept run took the page's main thread for seconds, so a click on Stop waited (once for the whole answer)."""
    import json

    runs = [_run(tiny_lm, i, "chat", SamplingParams(max_new_tokens=5)) for i in (1, 2)]
    saved = json.loads(json.dumps(perf.saved(runs)))  # through the browser's JSON storage
    assert isinstance(saved, str)
    back = perf.restored(saved)
    assert [r.run_id for r in back] == [1, 2] and all(not t.stages for r in back for t in r.tokens)
    pd.testing.assert_frame_equal(runs_table(back), runs_table(runs))
    listed = json.loads(saved)  # what browsers saved before: a list of runs
    assert [r.run_id for r in perf.restored(listed)] == [1, 2]
    assert perf.restored([{"bogus": 1}, "junk", listed[0]])[0].run_id == 1
    assert perf.restored("{not json") == [] and perf.restored(None) == []
    many = [_run(tiny_lm, i, "chat", SamplingParams(max_new_tokens=2)) for i in range(perf.KEPT_RUNS + 5)]
    assert len(perf.restored(perf.saved(many))) == perf.KEPT_RUNS


def test_perf_views_without_runs(tmp_path):
    views = perf.perf_views([])
    assert views.table.empty and views.latency.layout.annotations
    assert perf.write_csv(None, tmp_path).read_text(encoding="utf-8").startswith("run,label,model")


def test_the_browsers_saved_values_read_back_after_a_restart(tiny_registry_path):
    """Review of issue 21: Gradio encrypts a BrowserState with a key drawn per process unless given one, so after a
    restart the page read back nothing — the id that owns the stored history included. Two builds (two processes'
    apps) use one key for each saved value."""
    keys = []
    for _ in range(2):
        demo = build_app(load_registry(tiny_registry_path))
        keys.append({b.storage_key: b.secret for b in demo.blocks.values() if isinstance(b, gr.BrowserState)})
    assert set(keys[0]) == {"qdemo-runs", "qdemo-conversation", "qdemo-owner"} and keys[0] == keys[1]
