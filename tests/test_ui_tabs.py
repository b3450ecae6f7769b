"""Sampling lab, Internals and Performance tabs: the app builds with them, and their handler logic (module-level
functions the Gradio handlers call) agrees with the core functions it wraps."""

from __future__ import annotations

import contextlib

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch

from qdemo.engine import generate
from qdemo.introspect import attention_map, mean_over_heads, next_token_logits
from qdemo.lab import stage_distributions
from qdemo.registry import load_registry
from qdemo.runs import RunRecord
from qdemo.sampling import SamplingParams
from qdemo.ui import internals_tab, lab_tab, perf_tab
from qdemo.ui.app import build_app
from qdemo.views.perf import run_name, runs_table

ELEM_IDS = {
    "lab-model", "lab-context", "lab-mode", "lab-compute", "lab-stages", "lab-table", "lab-sample", "lab-histogram",
    "lab-token", "lab-append", "lab-context-view", "lab-temperature", "lab-top-k", "lab-top-p", "lab-min-p",
    "lab-repetition-penalty", "lab-decoding", "lab-n",
    "internals-model", "internals-refresh", "attn-run", "attn-plot", "attn-layer", "attn-head", "rope-freq",
    "rope-angles", "rope-decay", "rope-info", "model-card",
    "perf-refresh", "perf-clear", "perf-latency", "perf-tps", "perf-memory", "perf-table", "perf-csv",
}


@contextlib.contextmanager
def count_forwards(lm):
    calls = []
    handle = lm.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def demo(tiny_registry_path):
    return build_app(load_registry(tiny_registry_path))


def test_app_builds_with_the_three_tabs(demo):
    elem_ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert ELEM_IDS <= elem_ids, ELEM_IDS - elem_ids
    tabs = {block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)}
    assert {"Sampling lab", "Internals", "Performance"} <= tabs
    internals = next(b for b in demo.blocks.values() if isinstance(b, gr.Tab) and b.label == "Internals")
    assert any((internals._id, "select") in fn.targets for fn in demo.fns.values())  # loads when opened
    # Every listener of these tabs stays out of the public API.
    private = [fn for fn in demo.fns.values() if fn.api_visibility == "private"]
    assert len(private) >= 15


# --- sampling lab -------------------------------------------------------------------------------------------

def test_lab_view_stages_equal_stage_distributions(tiny_lm):
    context = lab_tab.compute_context(tiny_lm, "The quick brown fox", "raw text")
    params = lab_tab.lab_params("sample", 0.7, 20, 0.9, 0.0, 1.2)
    view = lab_tab.lab_view(tiny_lm, context, params, top_n=15)
    ids = tiny_lm.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    assert list(context.ids) == ids
    assert view.stages == stage_distributions(next_token_logits(tiny_lm, ids), ids, params, top_n=15)
    assert [s.name for s in view.stages] == ["raw", "repetition_penalty", "temperature", "top_k", "top_p"]
    assert list(view.table.columns) == ["token_id", "token", *[s.name for s in view.stages]]
    final = view.stages[-1]
    assert [i for _, i in view.choices] == [i for i, p in zip(final.token_ids, final.probs) if p > 0]
    assert view.figure.layout.title.text.startswith("tiny-qwen2")


def test_sliders_reuse_the_logits_without_a_forward(tiny_lm):
    with count_forwards(tiny_lm) as calls:
        context = lab_tab.compute_context(tiny_lm, "你好，世界！", "chat")
        assert len(calls) == 1
        for values in [("sample", 0.5, 0, 1.0, 0.0, 1.0), ("sample", 1.5, 5, 0.5, 0.1, 1.3),
                       ("greedy", 1.0, 40, 0.9, 0.0, 1.1), ("sample", 0.0, 40, 0.9, 0.0, 1.0)]:
            params = lab_tab.lab_params(*values)
            lab_tab.lab_view(tiny_lm, context, params, top_n=10)
            lab_tab.sample_view(tiny_lm, context, params, 50, seed=3)
        assert len(calls) == 1


def test_lab_params_explain_bad_values():
    assert lab_tab.lab_params("sample", 0.0, 40, 0.9, 0.0, 1.0).greedy  # T=0 is greedy, not an error
    assert lab_tab.lab_params("greedy", 0.7, 40, 0.9, 0.0, 1.0).greedy
    with pytest.raises(ValueError, match="decoding"):
        lab_tab.lab_params("beam search", 0.7, 40, 0.9, 0.0, 1.0)
    with pytest.raises(ValueError, match="whole number"):
        lab_tab.lab_params("sample", 0.7, 2.5, 0.9, 0.0, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        lab_tab.lab_params("sample", 0.7, 40, 0.0, 0.0, 1.0)


def test_sample_view_counts_and_histogram(tiny_lm):
    context = lab_tab.compute_context(tiny_lm, "Hello world", "raw text")
    params = lab_tab.lab_params("sample", 1.0, 10, 1.0, 0.0, 1.0)
    counts, figure = lab_tab.sample_view(tiny_lm, context, params, 500, seed=1)
    assert sum(counts.values()) == 500 and len(counts) <= 10
    assert sum(figure.data[0].y) == 500
    greedy, _ = lab_tab.sample_view(tiny_lm, context, params.replace(do_sample=False), 20)
    assert greedy == {int(torch.argmax(context.logits)): 20}
    with pytest.raises(ValueError, match="whole number"):
        lab_tab.sample_view(tiny_lm, context, params, 2.5)
    with pytest.raises(ValueError, match="10000"):
        lab_tab.sample_view(tiny_lm, context, params, 20_000)


def test_append_grows_the_context_by_one_forward(tiny_lm):
    context = lab_tab.compute_context(tiny_lm, "The quick brown", "raw text")
    view = lab_tab.lab_view(tiny_lm, context, SamplingParams(do_sample=True, temperature=0.8), top_n=5)
    token = view.choices[0][1]
    with count_forwards(tiny_lm) as calls:
        longer = lab_tab.append_token(tiny_lm, context, token)
    assert len(calls) == 1
    assert list(longer.ids) == [*context.ids, token]
    torch.testing.assert_close(longer.logits, next_token_logits(tiny_lm, [*context.ids, token]))
    assert lab_tab.context_text(tiny_lm, longer) == tiny_lm.tokenizer.decode([*context.ids, token])
    with pytest.raises(ValueError, match="pick a token"):
        lab_tab.append_token(tiny_lm, context, None)
    full = lab_tab.LabContext(context.model, tuple([5] * (tiny_lm.spec.max_context - 1)), context.logits)
    with pytest.raises(ValueError, match="takes"):
        lab_tab.append_token(tiny_lm, full, token)


def test_lab_context_errors_are_readable(tiny_lm):
    with pytest.raises(ValueError, match="empty"):
        lab_tab.compute_context(tiny_lm, "   ", "raw text")


# --- internals ----------------------------------------------------------------------------------------------

HISTORY = [{"role": "user", "content": "你好，今天天气怎么样？"},
           {"role": "assistant", "content": [{"type": "text", "text": "Hello! It is sunny."}]}]


def test_attention_view_is_one_layers_head_mean(tiny_lm):
    view = internals_tab.attention_view(tiny_lm, HISTORY, 1, "mean")
    messages = [{"role": "system", "content": tiny_lm.spec.system_prompt},
                {"role": "user", "content": HISTORY[0]["content"]},
                {"role": "assistant", "content": "Hello! It is sunny."}]
    expected_ids = tiny_lm.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                                         return_dict=False)
    assert view.ids == list(expected_ids)[-internals_tab.MAX_ATTENTION_TOKENS:]
    expected = mean_over_heads(attention_map(tiny_lm, view.ids, 1))
    np.testing.assert_allclose(np.asarray(view.figure.data[0].z, dtype=np.float32), expected)
    head = internals_tab.attention_view(tiny_lm, HISTORY, 0, "2")
    np.testing.assert_allclose(head.weights, attention_map(tiny_lm, head.ids, 0)[2])
    with pytest.raises(ValueError, match="layer"):
        internals_tab.attention_view(tiny_lm, HISTORY, 5, "mean")
    with pytest.raises(ValueError, match="head"):
        internals_tab.attention_view(tiny_lm, HISTORY, 0, "9")


def test_attention_view_caps_long_chats_and_handles_an_empty_one(tiny_lm):
    long = [{"role": "user", "content": "hello world " * 60}, {"role": "assistant", "content": "ok " * 40}]
    view = internals_tab.attention_view(tiny_lm, long, 0, "mean")
    assert len(view.ids) == internals_tab.MAX_ATTENTION_TOKENS < view.total_tokens
    assert "last 128" in view.caption
    assert np.asarray(view.figure.data[0].z).shape == (128, 128)
    empty = internals_tab.attention_view(tiny_lm, [], 0, "mean")
    assert empty.ids == tiny_lm.tokenizer.encode(internals_tab.DEFAULT_TEXT, add_special_tokens=False)[-128:]
    assert "example text" in empty.caption


def test_rope_and_card_views(tiny_lm, monkeypatch):
    rope = internals_tab.rope_view(tiny_lm)
    assert "10000" in rope.summary and "head_dim **16**" in rope.summary
    assert rope.frequencies is not None and rope.decay is not None
    assert np.asarray(rope.angles.data[0].z).shape == (internals_tab.ROPE_POSITIONS, 8)
    assert len(rope.decay.data[0].x) == internals_tab.ROPE_DISTANCE + 1
    card = internals_tab.card_view(tiny_lm)
    assert dict(zip(card["property"], card["value"]))["layers"] == "2"
    assert internals_tab.model_shape(tiny_lm) == (2, 4)

    def no_rope(lm):
        raise ValueError("model tiny uses no RoPE (no rotary embedding module)")

    monkeypatch.setattr(internals_tab, "rope_info", no_rope)
    alibi = internals_tab.rope_view(tiny_lm)
    assert "no RoPE" in alibi.summary and alibi.frequencies is None


# --- performance --------------------------------------------------------------------------------------------

def _run(lm, run_id: int, label: str, params: SamplingParams) -> RunRecord:
    run = RunRecord(run_id=run_id, model=lm.spec.name, settings=params.to_dict(), label=label)
    return run.extend(generate(lm, messages=[{"role": "user", "content": "你好 hello"}], params=params, top_n=5))


def test_perf_views_and_csv_from_real_runs(tiny_lm, tmp_path):
    runs = [_run(tiny_lm, 1, "A", SamplingParams(max_new_tokens=6)),
            _run(tiny_lm, 2, "B", SamplingParams(do_sample=True, temperature=0.9, max_new_tokens=6, seed=3))]
    views = perf_tab.perf_views(runs)
    names = [run_name(r) for r in runs]
    assert [t.name for t in views.latency.data] == names
    assert [t.name for t in views.tps.data] == names
    assert {t.legendgroup for t in views.memory.data} == set(names)
    assert list(views.table["run"]) == [1, 2]
    path = perf_tab.write_csv(runs, tmp_path)
    loaded = pd.read_csv(path, keep_default_na=False)
    expected = runs_table(runs)
    assert list(loaded.columns) == list(expected.columns)
    assert loaded["run"].tolist() == [1, 2] and loaded["label"].tolist() == ["A", "B"]
    assert loaded["new_tokens"].tolist() == expected["new_tokens"].tolist()
    assert loaded["settings"].tolist() == expected["settings"].tolist()
    assert "2** run(s)" in perf_tab.summary_line(runs)


def test_perf_views_without_runs(tmp_path):
    views = perf_tab.perf_views([])
    assert views.table.empty and views.latency.layout.annotations
    assert perf_tab.write_csv(None, tmp_path).read_text(encoding="utf-8").startswith("run,label,model")
