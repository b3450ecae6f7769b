"""Views turn synthetic engine events and arrays into figures and frames with the numbers they were given."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from qdemo.events import DoneEvent, GenerationStats, MemorySample, PrefillEvent, StageTopN, TokenEvent
from qdemo.runs import RunRecord
from qdemo.views.attention import attention_heatmap
from qdemo.views.card import card_frame
from qdemo.views.compare import Divergence, first_divergence, side_by_side_frame, tps_overlay_figure
from qdemo.views.labels import token_label
from qdemo.views.lab import histogram_figure
from qdemo.views.perf import TABLE_COLUMNS, latency_figure, memory_figure, rolling_tps_figure, runs_table
from qdemo.views.rope import alibi_figure, angle_heatmap, decay_figure, frequency_figure
from qdemo.views.stages import stage_figure, stage_table
from qdemo.views.tokens import probability_legend, token_highlights

MIB = 1024 * 1024
CPU = MemorySample(device="cpu", rss_bytes=300 * MIB)


def cuda(step: int) -> MemorySample:
    return MemorySample(device="cuda", cuda_allocated=(100 + step) * MIB, cuda_reserved=200 * MIB,
                        cuda_peak=(150 + step) * MIB)


def token(step: int, seconds: float, token_id: int = 1, stages: tuple[StageTopN, ...] = (),
          memory: MemorySample = CPU) -> TokenEvent:
    return TokenEvent(step=step, token_id=token_id, text=f"t{step}", stages=stages, step_seconds=seconds,
                      kv_cache_bytes=(step + 1) * MIB, memory=memory)


def run(run_id: int, seconds: list[float], label: str = "A", model: str = "tiny", done: bool = True,
        memory=lambda step: CPU, settings: dict | None = None) -> RunRecord:
    record = RunRecord(run_id=run_id, model=model, label=label,
                       settings=settings if settings is not None else {"do_sample": True, "temperature": 0.7,
                                                                        "top_k": 20, "top_p": 0.8, "min_p": 0.0,
                                                                        "repetition_penalty": 1.05, "seed": 1})
    record.add(PrefillEvent(prompt_ids=(1, 2, 3, 4), prefill_seconds=0.2, dropped_turns=(), seed=1,
                            kv_cache_bytes=MIB, memory=memory(0)))
    for step, s in enumerate(seconds):
        record.add(token(step, s, memory=memory(step)))
    if done:
        stats = GenerationStats(prompt_tokens=4, new_tokens=len(seconds), ttft_seconds=0.25, prefill_seconds=0.2,
                                prefill_tokens_per_s=20.0, decode_tokens_per_s=12.5, total_seconds=0.5,
                                peak_memory_bytes=int(942.3 * MIB))
        record.add(DoneEvent(reason="eos", stats=stats, text="", token_ids=tuple(range(len(seconds)))))
    return record


def assert_chrome(fig: go.Figure) -> None:
    assert fig.layout.title.text
    assert fig.layout.template == pio.templates["plotly_white"]
    xs = [v for k, v in fig.layout.to_plotly_json().items() if k.startswith("xaxis")]
    ys = [v for k, v in fig.layout.to_plotly_json().items() if k.startswith("yaxis")]
    assert any(x.get("title", {}).get("text") for x in xs)
    assert ys and all(y.get("title", {}).get("text") for y in ys)


def annotations(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


# --- labels -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("\n", "\\n"), (" foo", "␣foo"), ("", "∅"), ("你好", "你好"), ("a\tb\r", "a\\tb\\r"), ("\x00", "\\x00"),
    ("x" * 24, "x" * 24), ("x" * 25, "x" * 23 + "…"), ("你" * 30, "你" * 23 + "…"),
])
def test_token_label(text, shown):
    assert token_label(text) == shown
    assert len(token_label(text)) <= 24


def test_token_label_never_splits_an_escape():
    label = token_label("x" * 22 + "\n" + "y")
    assert label == "x" * 22 + "…"


# --- tokens -------------------------------------------------------------------------------------------------

def test_token_highlights_use_last_stage_and_none_without_stages():
    stages = (StageTopN("raw", (5,), (0.5,), 0.5), StageTopN("top_k", (5,), (0.9,), 0.9))
    pairs = token_highlights([token(0, 0.1, 5, stages), token(1, 0.1, 6)], [" 你", "\n"])
    assert pairs == [("␣你", 0.9), ("\\n", None)]
    assert "probability" in probability_legend()
    with pytest.raises(ValueError, match="one text per token"):
        token_highlights([token(0, 0.1)], [])


# --- stages -------------------------------------------------------------------------------------------------

STAGES = (  # given out of order on purpose: the figure sorts them into chain order
    StageTopN("top_k", (5, 7, 9, 2), (0.6, 0.4, 0.0, 0.0), chosen_prob=0.4),
    StageTopN("raw", (5, 7, 9), (0.5, 0.3, 0.2), chosen_prob=0.3),
    StageTopN("temperature", (5, 7, 9), (0.55, 0.3, 0.15), chosen_prob=0.3),
    StageTopN("top_p", (5, 7, 9), (1.0, 0.0, 0.0), chosen_prob=0.0),
)
LABELS = {5: "Hello", 7: " world", 9: "你好"}


def traces(fig: go.Figure, kind: str) -> dict[str, go.Bar]:
    return {t.meta["stage"]: t for t in fig.data if t.meta and t.meta["kind"] == kind}


def test_stage_figure_rows_in_chain_order_with_union_positions():
    fig = stage_figure(STAGES, LABELS, chosen=7)
    assert_chrome(fig)
    assert annotations(fig)[:4] == ["raw", "temperature", "top_k", "top_p"]
    # id 2 only ever had p = 0, so it is padding, not a token worth a column.
    assert list(fig.layout.xaxis.categoryarray) == ["Hello", "␣world", "你好"]
    assert all(fig.layout[f"xaxis{i}"].categoryarray == fig.layout.xaxis.categoryarray for i in range(2, 5))
    kept = traces(fig, "kept")
    assert list(kept["raw"].x) == ["Hello", "你好"] and list(kept["raw"].y) == [0.5, 0.2]
    assert list(kept["temperature"].y) == [0.55, 0.15]


def test_stage_figure_marks_removed_tokens_from_their_cut_onwards():
    fig = stage_figure(STAGES, LABELS, chosen=5)
    removed = traces(fig, "removed")
    assert set(removed) == {"top_k", "top_p"}
    assert list(removed["top_k"].x) == ["你好"]
    assert list(removed["top_p"].x) == ["␣world", "你好"]
    assert "removed by top_k" in removed["top_p"].hovertext[1]
    assert "removed by top_p" in removed["top_p"].hovertext[0]
    assert removed["top_k"].y == (0.15,)  # drawn at the height it had just before the cut
    assert removed["top_k"].marker.pattern.shape == "/"


def test_stage_figure_highlights_chosen_in_every_row():
    fig = stage_figure(STAGES, LABELS, chosen=5)
    chosen = traces(fig, "chosen")
    assert set(chosen) == {"raw", "temperature", "top_k", "top_p"}
    assert [chosen[s].y[0] for s in ("raw", "temperature", "top_k", "top_p")] == [0.5, 0.55, 0.6, 1.0]
    assert all("Hello" not in traces(fig, "kept")[s].x for s in traces(fig, "kept"))


def test_stage_figure_adds_chosen_token_outside_top_n_from_chosen_prob():
    stages = (StageTopN("raw", (5, 7), (0.6, 0.3), chosen_prob=0.01),)
    fig = stage_figure(stages, {}, chosen=42)
    assert list(fig.layout.xaxis.categoryarray) == ["#5", "#7", "#42"]
    assert traces(fig, "chosen")["raw"].y == (0.01,)


def test_stage_figure_unknown_tokens_are_not_removed_and_duplicate_labels_stay_apart():
    # No zero listed at top_k: 9 was only outranked by 11, so its p is unknown, not 0.
    stages = (StageTopN("raw", (5, 9), (0.6, 0.3), 0.6), StageTopN("repetition_penalty", (5, 11), (0.6, 0.35), 0.6))
    fig = stage_figure(stages, {5: "�", 9: "�", 11: "1"}, chosen=5)
    assert not traces(fig, "removed")
    assert list(fig.layout.xaxis.categoryarray) == ["� #5", "� #9", "1"]
    assert fig.layout.xaxis.type == "category"


def test_stage_figure_empty():
    fig = stage_figure((), {})
    assert annotations(fig) == ["no stages recorded"]


def test_stage_table():
    table = stage_table(STAGES, LABELS)
    assert list(table.columns) == ["token", "raw", "temperature", "top_k", "top_p"]
    assert list(table.index) == [5, 7, 9] and list(table["token"]) == ["Hello", "␣world", "你好"]
    assert table.loc[9, "top_k"] == 0.0 and table.loc[7, "raw"] == 0.3
    partial = stage_table((StageTopN("raw", (5, 9), (0.6, 0.3), 0.6), StageTopN("top_k", (5,), (1.0,), 1.0)), {})
    assert math.isnan(partial.loc[9, "top_k"])


# --- perf ---------------------------------------------------------------------------------------------------

SECONDS = [0.1, 0.05, 0.02, 0.04, 0.08]


def test_latency_figure_is_ms_per_step_per_run():
    fig = latency_figure([run(1, SECONDS), run(2, [0.2, 0.1], label="", model="other")])
    assert_chrome(fig)
    assert [t.name for t in fig.data] == ["#1 A tiny", "#2 other"]
    assert list(fig.data[0].x) == [0, 1, 2, 3, 4]
    assert list(fig.data[0].y) == [s * 1000 for s in SECONDS]


def test_rolling_tps_figure_matches_hand_computation():
    fig = rolling_tps_figure([run(1, SECONDS)], window=2)
    assert_chrome(fig)
    expected = [1 / 0.1, 2 / 0.15, 2 / 0.07, 2 / 0.06, 2 / 0.12]
    assert np.allclose(fig.data[0].y, expected)
    three = rolling_tps_figure([run(1, SECONDS)], window=3).data[0].y
    assert np.allclose(three, [10.0, 2 / 0.15, 3 / 0.17, 3 / 0.11, 3 / 0.14])
    with pytest.raises(ValueError, match="window"):
        rolling_tps_figure([run(1, SECONDS)], window=0)


def test_memory_figure_cuda_and_cpu_traces_in_mib():
    fig = memory_figure([run(1, SECONDS[:3], memory=cuda), run(2, SECONDS[:2], label="B")])
    assert_chrome(fig)
    names = [t.name for t in fig.data]
    assert names == ["#1 A tiny allocated", "#1 A tiny reserved", "#1 A tiny peak", "#1 A tiny KV cache",
                     "#2 B tiny RSS", "#2 B tiny KV cache"]
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["#1 A tiny allocated"].y) == [100, 101, 102]
    assert list(by_name["#1 A tiny peak"].y) == [150, 151, 152]
    assert list(by_name["#2 B tiny RSS"].y) == [300, 300]
    assert list(by_name["#1 A tiny KV cache"].y) == [1, 2, 3]
    assert by_name["#1 A tiny KV cache"].yaxis == "y2" and by_name["#2 B tiny RSS"].yaxis == "y"


@pytest.mark.parametrize("make", [latency_figure, rolling_tps_figure, memory_figure, tps_overlay_figure])
def test_perf_figures_without_runs_say_so(make):
    fig = make([])
    assert_chrome(fig)
    assert annotations(fig) == ["no runs yet"]
    assert not fig.data


def test_runs_table_rows_and_running_run():
    table = runs_table([run(1, SECONDS), run(2, SECONDS[:2], label="B", done=False,
                                                settings={"do_sample": False, "temperature": 0.7, "seed": 3,
                                                          "repetition_penalty": 1.1})])
    assert tuple(table.columns) == TABLE_COLUMNS
    first, second = table.iloc[0], table.iloc[1]
    assert (first["run"], first["reason"], first["prompt_tokens"], first["new_tokens"]) == (1, "eos", 4, 5)
    assert (first["ttft_s"], first["prefill_tok_s"], first["decode_tok_s"], first["peak_mib"]) == (0.25, 20.0, 12.5, 942.3)
    assert first["settings"] == "T=0.7 top_k=20 top_p=0.8 rp=1.05 seed=1"
    assert (second["reason"], second["prompt_tokens"], second["new_tokens"]) == ("running", 4, 2)
    assert math.isnan(second["decode_tok_s"])
    assert second["settings"] == "greedy rp=1.1"
    empty = runs_table([])
    assert empty.empty and tuple(empty.columns) == TABLE_COLUMNS


# --- compare ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [1, 2, 3], Divergence(None, None, None)),
    ([], [], Divergence(None, None, None)),
    ([1, 2], [1, 2, 3], Divergence(2, None, 3)),
    ([1, 2, 3, 4], [1, 2], Divergence(2, 3, None)),
    ([], [7], Divergence(0, None, 7)),
    ([4, 2], [5, 2], Divergence(0, 4, 5)),
    ([1, 2, 3, 4], [1, 2, 9, 4], Divergence(2, 3, 9)),
])
def test_first_divergence(a, b, expected):
    assert first_divergence(a, b) == expected


def test_tps_overlay_and_side_by_side():
    fig = tps_overlay_figure([run(1, SECONDS), run(2, SECONDS[:2], label="B")])
    assert_chrome(fig)
    assert [t.name for t in fig.data] == ["#1 A tiny", "#2 B tiny"]
    assert np.allclose(fig.data[1].y, [10.0, 2 / 0.15])
    frame = side_by_side_frame(run(1, SECONDS), run(2, SECONDS[:2], label="B", done=False))
    assert list(frame.columns) == ["metric", "A", "B"]
    assert list(frame["metric"]) == ["TTFT (s)", "prefill tok/s", "decode tok/s", "tokens", "peak memory MiB"]
    assert list(frame["A"]) == [0.25, 20.0, 12.5, 5.0, 942.3]
    assert frame["B"].iloc[3] == 2 and frame["B"].drop(index=3).isna().all()


# --- attention ----------------------------------------------------------------------------------------------

def test_attention_heatmap():
    weights = np.array([[1.0, 0.0, 0.0], [0.4, 0.6, 0.0], [0.2, 0.3, 0.5]])
    fig = attention_heatmap(weights, ["你", " a", "你"], "Layer 0")
    assert_chrome(fig)
    heat = fig.data[0]
    assert np.array_equal(np.asarray(heat.z), weights)
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert list(fig.layout.xaxis.ticktext) == ["你", "␣a", "你"]  # a repeated token keeps its own column
    assert list(fig.layout.yaxis.ticktext) == ["你", "␣a", "你"] and fig.layout.yaxis.autorange == "reversed"
    assert heat.text[2][1] == "你 → ␣a"


def test_attention_heatmap_last_queries_only():
    fig = attention_heatmap(np.array([[0.3, 0.7]]), ["a", "b"], "last query")
    assert list(fig.layout.yaxis.ticktext) == ["b"] and fig.data[0].zmax == 0.7


@pytest.mark.parametrize("weights, labels, match", [
    (np.zeros((2, 2, 2)), ["a", "b"], r"\(2, 2, 2\)"),
    (np.zeros((2, 2)), ["a"], r"\(2, 2\)"),
    (np.zeros((3, 2)), ["a", "b"], r"\(3, 2\)"),
])
def test_attention_heatmap_rejects_bad_shapes(weights, labels, match):
    with pytest.raises(ValueError, match=match):
        attention_heatmap(weights, labels, "bad")


# --- rope / alibi -------------------------------------------------------------------------------------------

def test_frequency_figure():
    inv_freq = 1.0 / (10000 ** (np.arange(0, 8, 2) / 8))
    fig = frequency_figure(inv_freq)
    assert_chrome(fig)
    assert np.allclose(fig.data[0].y, inv_freq) and np.allclose(fig.data[1].y, 2 * np.pi / inv_freq)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    with pytest.raises(ValueError, match="positive"):
        frequency_figure(np.array([1.0, 0.0]))


def test_angle_heatmap_wraps_angles():
    angles = np.outer(np.arange(4), np.array([1.0, 0.1, 0.01]))
    fig = angle_heatmap(angles)
    assert_chrome(fig)
    assert np.allclose(fig.data[0].z, np.mod(angles, 2 * np.pi))
    assert np.asarray(fig.data[0].z).shape == (4, 3)
    with pytest.raises(ValueError, match="2-D"):
        angle_heatmap(np.zeros(3))


def test_decay_figure():
    distances, scores = np.arange(5.0), np.array([4.0, 3.0, 2.5, 2.0, 1.8])
    fig = decay_figure(distances, scores)
    assert_chrome(fig)
    assert np.array_equal(fig.data[0].x, distances) and np.array_equal(fig.data[0].y, scores)
    with pytest.raises(ValueError, match="same shape"):
        decay_figure(distances, scores[:3])


def test_alibi_figure():
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    positions = np.arange(3)
    bias = -slopes[0] * np.maximum(positions[:, None] - positions[None, :], 0)
    fig = alibi_figure(slopes, bias)
    assert_chrome(fig)
    assert np.array_equal(fig.data[0].y, slopes) and np.array_equal(np.asarray(fig.data[1].z), bias)


# --- lab / card ---------------------------------------------------------------------------------------------

def test_histogram_sorted_by_count_with_fractions():
    fig = histogram_figure({3: 1, 8: 6, 4: 3, 9: 6}, {8: "好", 9: " the", 4: "\n"}, "Samples")
    assert_chrome(fig)
    bar = fig.data[0]
    assert list(bar.x) == ["好", "␣the", "\\n", "#3"] and list(bar.y) == [6, 6, 3, 1]
    assert [round(c[0], 3) for c in bar.customdata] == [0.375, 0.375, 0.188, 0.062]
    assert "customdata[0]" in bar.hovertemplate
    assert annotations(histogram_figure({}, {}, "Samples")) == ["no samples yet"]


def test_card_frame_units():
    frame = card_frame({"name": "Qwen2.5-0.5B", "params": 494032768, "weights_bytes": int(942.3 * MIB) + 1,
                        "kv_bytes": 512, "context": 32768, "gguf": None, "dtype": "bfloat16"})
    assert list(frame.columns) == ["property", "value"]
    values = dict(zip(frame["property"], frame["value"]))
    assert values == {"name": "Qwen2.5-0.5B", "params": "494,032,768", "weights_bytes": "942.3 MiB",
                      "kv_bytes": "512 B", "context": "32768", "gguf": "—", "dtype": "bfloat16"}
    assert isinstance(card_frame({}), pd.DataFrame) and list(card_frame({}).columns) == ["property", "value"]
