"""Views turn synthetic engine events and arrays into figures and frames with the numbers they were given."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from qdemo.core.events import (
    DoneEvent,
    GenerationStats,
    MemorySample,
    PrefillEvent,
    StageTopN,
    TokenEvent,
)
from qdemo.core.runs import RunRecord
from qdemo.views.attention import attention_grid, attention_heatmap
from qdemo.views.card import card_frame
from qdemo.views.compare import (
    Divergence,
    empty_side_by_side,
    first_divergence,
    side_by_side_frame,
    tps_pair_figure,
)
from qdemo.views.lab import histogram_figure
from qdemo.views.labels import STAGE_WORDS, token_label
from qdemo.views.perf import (
    REASON_WORDS,
    RUN_PALETTE,
    TABLE_COLUMNS,
    latency_figure,
    memory_figure,
    reason_words,
    rolling_tps_figure,
    run_colour,
    runs_table,
    settings_text,
)
from qdemo.views.rope import alibi_figure, angle_heatmap, decay_figure, frequency_figure
from qdemo.views.stages import stage_figure, stage_notes, stage_table, stage_title
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


SETTINGS = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.0,
            "repetition_penalty": 1.0, "max_new_tokens": 64, "seed": 1, "num_beams": 1}


def test_stage_figure_columns_in_chain_order_sharing_one_token_axis():
    fig = stage_figure(STAGES, LABELS, chosen=7)
    assert fig.layout.title.text and fig.layout.template == pio.templates["plotly_white"]
    assert [a.replace("<br>", " ") for a in annotations(fig)] == ["raw (model)", "temperature", "top-k", "top-p"]
    # Columns side by side: four x axes next to each other, every y axis the first one's.
    domains = [fig.layout[f"xaxis{i if i > 1 else ''}"].domain for i in range(1, 5)]
    assert all(a[1] <= b[0] for a, b in zip(domains, domains[1:]))
    assert all(fig.layout[f"yaxis{i}"].matches == "y" for i in range(2, 5))
    # id 2 only ever had p = 0, so it is padding, not a token worth a row; rows read top-down in union order.
    assert list(fig.layout.yaxis.categoryarray) == ["Hello", "␣world", "你好"]
    assert fig.layout.yaxis.autorange == "reversed"
    # One comparable scale: every column 0..1.
    assert all(tuple(fig.layout[f"xaxis{i if i > 1 else ''}"].range) == (0, 1) for i in range(1, 5))
    kept = traces(fig, "kept")
    assert kept["raw"].orientation == "h"
    assert list(kept["raw"].y) == ["Hello", "你好"] and list(kept["raw"].x) == [0.5, 0.2]
    assert list(kept["raw"].text) == ["50%", "20%"]
    assert list(kept["temperature"].x) == [0.55, 0.15] and list(kept["temperature"].text) == ["55%", "15%"]
    assert fig.layout.height == 3 * 30 + fig.layout.margin.t + fig.layout.margin.b


def test_stage_figure_titles_carry_settings_in_words():
    fig = stage_figure(STAGES, LABELS, chosen=7, settings=SETTINGS)
    assert [a.replace("<br>", " ") for a in annotations(fig)] == ["raw (model)", "temperature 0.7", "top-k 20",
                                                                  "top-p 0.8"]
    beam = stage_figure((StageTopN("beam", (4,), (0.9,), 0.9),), {4: "好"}, chosen=4, settings={"num_beams": 4})
    assert [a.replace("<br>", " ") for a in annotations(beam)] == ["beam transition"]
    assert traces(beam, "chosen")["beam"].x == (0.9,) and traces(beam, "chosen")["beam"].text == ("90%",)


def test_stage_figure_says_no_change_when_a_column_equals_the_previous():
    stages = (StageTopN("raw", (5, 7), (0.6, 0.4), 0.4),
              StageTopN("repetition_penalty", (5, 7), (0.6 + 4e-7, 0.4 - 4e-7), 0.4 - 4e-7),
              StageTopN("temperature", (5, 7), (0.7, 0.3), 0.3))
    fig = stage_figure(stages, LABELS, chosen=7, settings={**SETTINGS, "repetition_penalty": 1.05})
    titles = [a.replace("<br>", " ") for a in annotations(fig)]
    assert titles == ["raw (model)", "repetition penalty 1.05 <i>no change</i>", "temperature 0.7"]


def test_stage_figure_marks_removed_tokens_from_their_cut_onwards():
    fig = stage_figure(STAGES, LABELS, chosen=5)
    removed = traces(fig, "removed")
    assert set(removed) == {"top_k", "top_p"}
    assert list(removed["top_k"].y) == ["你好"]
    assert list(removed["top_p"].y) == ["␣world", "你好"]
    assert "removed by top-k" in removed["top_p"].hovertext[1]
    assert "removed by top-p" in removed["top_p"].hovertext[0]
    assert removed["top_k"].x == (0.15,)  # drawn at the height it had just before the cut
    assert removed["top_k"].marker.pattern.shape == "/"
    assert removed["top_k"].marker.color == "#BBBBBB"


def test_stage_figure_highlights_chosen_in_every_column():
    fig = stage_figure(STAGES, LABELS, chosen=5)
    chosen = traces(fig, "chosen")
    assert set(chosen) == {"raw", "temperature", "top_k", "top_p"}
    assert [chosen[s].x[0] for s in ("raw", "temperature", "top_k", "top_p")] == [0.5, 0.55, 0.6, 1.0]
    assert [chosen[s].text[0] for s in ("raw", "temperature", "top_k", "top_p")] == ["50%", "55%", "60%", "100%"]
    assert all(chosen[s].marker.color == "#F58518" for s in chosen)
    assert all("Hello" not in traces(fig, "kept")[s].y for s in traces(fig, "kept"))


def test_stage_figure_adds_chosen_token_outside_top_n_from_chosen_prob():
    stages = (StageTopN("raw", (5, 7), (0.6, 0.3), chosen_prob=0.01),)
    fig = stage_figure(stages, {}, chosen=42)
    assert list(fig.layout.yaxis.categoryarray) == ["#5", "#7", "#42"]
    assert traces(fig, "chosen")["raw"].x == (0.01,)


def test_stage_figure_shows_at_most_max_tokens_and_always_the_chosen():
    ids = tuple(range(100, 120))
    probs = tuple(0.2 * 0.8 ** k for k in range(20))
    stages = (StageTopN("raw", ids, probs, probs[19]),)
    fig = stage_figure(stages, {}, chosen=119, max_tokens=5)
    # The four most likely, then the chosen one in place of the fifth.
    assert list(fig.layout.yaxis.categoryarray) == ["#100", "#101", "#102", "#103", "#119"]
    assert fig.layout.height == 5 * 30 + fig.layout.margin.t + fig.layout.margin.b
    default = stage_figure(stages, {}, chosen=101)
    assert len(default.layout.yaxis.categoryarray) == 12 and "#101" in default.layout.yaxis.categoryarray
    assert 12 * 30 + 60 < default.layout.height < 12 * 30 + 260


def test_stage_figure_unknown_tokens_are_not_removed_and_duplicate_labels_stay_apart():
    # No zero listed at repetition_penalty: 9 was only outranked by 11, so its p is unknown, not 0.
    stages = (StageTopN("raw", (5, 9), (0.6, 0.3), 0.6), StageTopN("repetition_penalty", (5, 11), (0.6, 0.35), 0.6))
    fig = stage_figure(stages, {5: "�", 9: "�", 11: "1"}, chosen=5)
    assert not traces(fig, "removed")
    assert list(fig.layout.yaxis.categoryarray) == ["� #5", "� #9", "1"]
    assert fig.layout.yaxis.type == "category"


def test_stage_figure_escapes_markup_in_token_labels():
    # plotly reads "<b>" in a label as markup and would draw nothing; the entity shows the characters.
    fig = stage_figure((StageTopN("raw", (1, 2), (0.7, 0.3), 0.7),), {1: "<b>", 2: "a&b"}, chosen=1)
    assert list(fig.layout.yaxis.categoryarray) == ["&lt;b&gt;", "a&amp;b"]
    assert traces(fig, "chosen")["raw"].hovertext[0].startswith("&lt;b&gt;<br>")


def test_stage_figure_empty():
    fig = stage_figure((), {})
    assert annotations(fig) == ["no stages recorded"]


def test_stage_notes_name_every_stage_that_did_nothing():
    # T 0.7, top-k 20, top-p 0.8 recorded and changing things; the penalty and min-p are switched off.
    assert stage_notes(STAGES, SETTINGS) == ["repetition penalty 1.0: no change (off)", "min-p 0.0: off"]
    plain = {**SETTINGS, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.05, "repetition_penalty": 1.05}
    same = (StageTopN("raw", (5, 7), (0.6, 0.4), 0.4), StageTopN("repetition_penalty", (5, 7), (0.6, 0.4), 0.4),
            StageTopN("min_p", (5, 7), (0.6, 0.4), 0.4))
    assert stage_notes(same, plain) == ["repetition penalty 1.05: no change for this token's top-N",
                                        "temperature 1.0: no change (off)", "top-k 0: off", "top-p 1.0: off",
                                        "min-p 0.05: no change for this token's top-N"]
    assert stage_notes(same) == ["repetition penalty: no change for this token's top-N",
                                 "min-p: no change for this token's top-N"]


def test_stage_notes_for_greedy_and_beam_runs():
    greedy = {**SETTINGS, "do_sample": False}
    assert stage_notes((StageTopN("raw", (5,), (0.9,), 0.9),), greedy) == [
        "repetition penalty 1.0: no change (off)",
        "greedy: the sampling stages are skipped; the token is the argmax after the repetition penalty"]
    assert stage_notes((StageTopN("raw", (5,), (0.9,), 0.9),), {**SETTINGS, "temperature": 0.0})[-1].startswith(
        "greedy:")
    assert stage_notes((StageTopN("beam", (5,), (0.9,), 0.9),), {**greedy, "num_beams": 4}) == [
        "beam search: the sampling stages do not apply; each token shows its beam transition probability"]
    assert stage_notes((), {}) == [] and stage_notes(()) == []


def test_stage_words_and_titles():
    assert STAGE_WORDS["raw"] == "raw (model)" and STAGE_WORDS["beam"] == "beam transition"
    assert [stage_title(name, {**SETTINGS, "repetition_penalty": 1.05, "min_p": 0.05}) for name in
            ("raw", "repetition_penalty", "temperature", "top_k", "top_p", "min_p", "beam")] == [
        "raw (model)", "repetition penalty 1.05", "temperature 0.7", "top-k 20", "top-p 0.8", "min-p 0.05",
        "beam transition"]
    assert stage_title("top_p") == "top-p"


def test_stage_table():
    table = stage_table(STAGES, LABELS)
    assert list(table.columns) == ["token", "raw", "temperature", "top_k", "top_p"]
    assert list(table.index) == [5, 7, 9] and list(table["token"]) == ["Hello", "␣world", "你好"]
    assert table.loc[9, "top_k"] == 0.0 and table.loc[7, "raw"] == 0.3
    partial = stage_table((StageTopN("raw", (5, 9), (0.6, 0.3), 0.6), StageTopN("top_k", (5,), (1.0,), 1.0)), {})
    assert math.isnan(partial.loc[9, "top_k"])


# --- perf ---------------------------------------------------------------------------------------------------

SECONDS = [0.1, 0.05, 0.02, 0.04, 0.08]


def test_latency_figure_splits_first_token_from_decode():
    fig = latency_figure([run(1, SECONDS), run(2, [0.2, 0.1], label="", model="other")])
    assert fig.layout.title.text
    lines = [t for t in fig.data if isinstance(t, go.Scatter)]
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    # Decode latency from step 1: step 0 holds the prefill.
    assert [t.name for t in lines] == ["#1 A tiny", "#2 other"]
    assert list(lines[0].x) == [1, 2, 3, 4]
    assert list(lines[0].y) == [50.0, 20.0, 40.0, 80.0]
    assert list(lines[1].x) == [1] and list(lines[1].y) == [100.0]
    # One TTFT bar per run, in seconds, on its own axis.
    assert [b.x[0] for b in bars] == [0.25, 0.25] and [b.y[0] for b in bars] == ["#1 A", "#2"]
    assert bars[0].xaxis == "x" and lines[0].xaxis == "x2"
    assert fig.layout.xaxis.ticksuffix == " s" and fig.layout.yaxis2.title.text == "ms per token"
    assert annotations(fig) == ["time to first token (s)", "decode latency per token (ms, from step 1)"]
    # A running run has no stats yet: its first step's time stands in.
    running = latency_figure([run(3, [0.3, 0.1], done=False)])
    assert [t.x[0] for t in running.data if isinstance(t, go.Bar)] == [0.3]


def test_rolling_tps_figure_matches_hand_computation_from_step_1():
    fig = rolling_tps_figure([run(1, SECONDS)], window=2)
    assert_chrome(fig)
    # SECONDS[0] (0.1 s) is the first token's wait, not decoding.
    assert list(fig.data[0].x) == [1, 2, 3, 4]
    expected = [1 / 0.05, 2 / 0.07, 2 / 0.06, 2 / 0.12]
    assert np.allclose(fig.data[0].y, expected)
    three = rolling_tps_figure([run(1, SECONDS)], window=3).data[0].y
    assert np.allclose(three, [20.0, 2 / 0.07, 3 / 0.11, 3 / 0.14])
    single = rolling_tps_figure([run(2, [0.4])])
    assert [t.name for t in single.data] == ["#2 A tiny"] and len(single.data[0].x) == 0
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
    assert fig.layout.yaxis2.title.text == "KV cache (MiB)"


def test_memory_axis_says_what_it_measures():
    assert memory_figure([run(1, SECONDS[:2])]).layout.yaxis.title.text == "process RSS (MiB)"
    assert memory_figure([run(1, SECONDS[:2], memory=cuda)]).layout.yaxis.title.text == \
        "CUDA allocated / reserved / peak (MiB)"


def test_one_colour_per_run_in_every_chart():
    runs = [run(3, SECONDS), run(14, SECONDS, label="B", memory=cuda)]
    assert run_colour(runs[0]) == RUN_PALETTE[3] and run_colour(runs[1]) == RUN_PALETTE[4]
    assert run_colour(runs[0]) != run_colour(runs[1]) and run_colour(run(3, [0.1])) == run_colour(runs[0])
    colours: dict[str, set[str]] = {"#3 A tiny": set(), "#14 B tiny": set()}
    figures = [latency_figure(runs), rolling_tps_figure(runs), memory_figure(runs), tps_pair_figure(runs)]
    for fig in figures:
        for t in fig.data:
            group = t.legendgroup
            colours[group].add(t.marker.color if isinstance(t, go.Bar) else t.line.color)
    assert colours == {"#3 A tiny": {RUN_PALETTE[3]}, "#14 B tiny": {RUN_PALETTE[4]}}


@pytest.mark.parametrize("make", [latency_figure, rolling_tps_figure, memory_figure])
def test_run_legends_sit_under_the_plot(make):
    """Issue 19, item 12: on a phone the speed and memory charts' legends stood beside the plot and squeezed it to a
    sliver of the 380 px chart; under the plot they leave it the chart's width."""
    legend = make([run(1, SECONDS), run(2, SECONDS, label="B")]).layout.legend
    assert legend.orientation == "h" and legend.y < 0 and legend.yanchor == "top"


@pytest.mark.parametrize("settings, text", [
    ({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.05,
      "seed": 7, "num_beams": 1}, "T=0.7 top_k=20 top_p=0.8 min_p=0.05 rp=1.05 seed=7"),
    ({"do_sample": False, "temperature": 0.7, "seed": 3, "repetition_penalty": 1.1, "num_beams": 1}, "greedy rp=1.1"),
    ({"do_sample": True, "temperature": 0.0, "seed": 3, "num_beams": 1}, "greedy"),
    ({"do_sample": False, "temperature": 1.0, "repetition_penalty": 1.05, "seed": 3, "num_beams": 4},
     "beam×4 rp=1.05"),
    ({}, ""),
])
def test_settings_text(settings, text):
    assert settings_text(settings) == text


@pytest.mark.parametrize("reason, words", [("eos", "finished"), ("stop_token", "finished (stop token)"),
                                           ("max_tokens", "length limit"), ("stopped", "stopped"),
                                           ("error", "error"), ("new", "new")])
def test_reason_words(reason, words):
    assert reason_words(reason) == words
    assert REASON_WORDS.get(reason, reason) == words


@pytest.mark.parametrize("make", [latency_figure, rolling_tps_figure, memory_figure, tps_pair_figure])
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
    assert (first["run"], first["reason"], first["prompt_tokens"], first["new_tokens"]) == (1, "finished", 4, 5)
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


def test_tps_pair_and_side_by_side():
    fig = tps_pair_figure([run(1, SECONDS), run(2, SECONDS[:2], label="B")])
    assert_chrome(fig)
    assert [t.name for t in fig.data] == ["#1 A tiny", "#2 B tiny"]
    assert list(fig.data[1].x) == [1] and np.allclose(fig.data[1].y, [1 / 0.05])  # step 0 left out
    frame = side_by_side_frame(run(1, SECONDS), run(2, SECONDS[:2], label="B", done=False))
    assert list(frame.columns) == ["metric", "A", "B"]
    assert list(frame["metric"]) == ["TTFT (s)", "prefill tok/s", "decode tok/s", "tokens", "peak memory MiB"]
    assert list(frame["A"]) == [0.25, 20.0, 12.5, 5.0, 942.3]
    assert frame["B"].iloc[3] == 2 and frame["B"].drop(index=3).isna().all()


def test_compare_speed_gives_each_side_a_row_of_its_own_on_one_scale():
    """Issue 19, item 13: A and B decode in one batch, step for step, so their speed lines coincide; overlaid,
    A's lay hidden under B's. Each side gets its own row (A on top), both on the same tokens/s scale."""
    fig = tps_pair_figure([run(1, SECONDS), run(2, SECONDS, label="B")])
    assert_chrome(fig)
    a, b = fig.data
    assert list(a.y) == list(b.y)  # the same steps: overlaid, one line would cover the other
    layout = fig.layout.to_plotly_json()
    rows = [layout["yaxis" + trace.yaxis[1:]]["domain"] for trace in (a, b)]
    assert rows[0][0] >= rows[1][1]  # A's row lies wholly above B's
    assert layout["yaxis" + b.yaxis[1:]].get("matches") == "y" or layout["yaxis"].get("matches") == b.yaxis


def test_empty_side_by_side_has_the_metric_rows():
    frame = empty_side_by_side()
    assert list(frame.columns) == ["metric", "A", "B"]
    assert list(frame["metric"]) == ["TTFT (s)", "prefill tok/s", "decode tok/s", "tokens", "peak memory MiB"]
    assert set(frame["A"]) == {"–"} and set(frame["B"]) == {"–"}


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


def test_attention_heatmap_log_scale_keeps_real_weights_in_ticks_and_hover():
    weights = np.array([[1.0, 0.0], [0.01, 0.99]])
    fig = attention_heatmap(weights, ["<a>", "b"], "log", scale="log")
    heat = fig.data[0]
    # log10, with the exact zero clipped at 1e-6.
    assert np.allclose(np.asarray(heat.z), [[0.0, -6.0], [-2.0, math.log10(0.99)]])
    assert (heat.zmin, heat.zmax) == (-6.0, 0.0)
    assert list(heat.colorbar.tickvals) == [-6, -5, -4, -3, -2, -1, 0]
    assert list(heat.colorbar.ticktext) == ["1e-6", "1e-5", "1e-4", "0.001", "0.01", "0.1", "1"]
    assert np.array_equal(np.asarray(heat.customdata), weights) and "customdata" in heat.hovertemplate
    assert list(fig.layout.xaxis.ticktext) == ["&lt;a&gt;", "b"]
    with pytest.raises(ValueError, match="scale"):
        attention_heatmap(weights, ["a", "b"], "bad", scale="sqrt")


def test_attention_grid_small_multiples_share_one_colour_range():
    heads = np.stack([np.array([[1.0, 0.0], [0.5, 0.5]]) * (h + 1) / 5 for h in range(5)])  # top weight 1.0
    fig = attention_grid(heads, ["你", "好"], "Layer 1, every head")
    assert fig.layout.title.text == "Layer 1, every head"
    assert len(fig.data) == 5 and annotations(fig) == [f"head {h}" for h in range(5)]
    # 5 heads: 3 columns (ceil √5), 2 rows.
    assert fig.data[2].xaxis == "x3" and fig.data[3].xaxis == "x4"
    assert fig.layout.xaxis4.domain[0] == fig.layout.xaxis.domain[0]
    assert all(t.coloraxis == "coloraxis" for t in fig.data)
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.0, 1.0)
    assert np.allclose(np.asarray(fig.data[4].z), heads[4])
    assert fig.layout.xaxis.showticklabels is False and fig.layout.yaxis.showticklabels is False
    assert fig.data[1].text[1][0] == "好 → 你" and fig.data[1].hovertemplate.startswith("head 1<br>")
    log = attention_grid(heads, ["你", "好"], "log", scale="log")
    assert np.allclose(np.asarray(log.data[0].z), [[math.log10(0.2), -6.0], [-1.0, -1.0]])
    assert (log.layout.coloraxis.cmin, log.layout.coloraxis.cmax) == (-6.0, 0.0)
    assert annotations(attention_grid(np.zeros((0, 0, 0)), [], "none")) == ["no attention weights"]
    with pytest.raises(ValueError, match="3-D"):
        attention_grid(np.zeros((2, 2)), ["a", "b"], "bad")


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


def test_histogram_with_expected_shows_shares_top_n_and_other():
    counts = {1: 50, 2: 30, 3: 12, 4: 5, 5: 3}
    expected = {2: 0.35, 1: 0.45, 3: 0.1, 4: 0.06, 5: 0.04}
    fig = histogram_figure(counts, {1: "你", 2: "<b>", 3: " the"}, "Samples", expected=expected, top_n=3)
    bars, marks = fig.data
    # Top 3 by expected p, then "other" = ids 4 and 5: 8 of 100 samples, expected 1 - 0.9.
    assert list(bars.x) == ["你", "&lt;b&gt;", "␣the", "other"]
    assert np.allclose(bars.y, [0.5, 0.3, 0.12, 0.08])
    assert list(bars.text) == ["50%", "30%", "12%", "8.0%"]
    assert marks.name == "expected p" and list(marks.x) == list(bars.x)
    assert np.allclose(marks.y, [0.45, 0.35, 0.1, 0.1])
    assert fig.layout.yaxis.title.text == "share of samples"
    # Without expected p the old figure is still there: counts, most frequent first.
    old = histogram_figure(counts, {}, "Samples", top_n=2)
    assert list(old.data[0].x) == ["#1", "#2", "other"] and list(old.data[0].y) == [50, 30, 20]
    assert len(old.data) == 1 and old.layout.yaxis.title.text == "count"
    shares = histogram_figure(counts, {}, "Samples", top_n=2, normalise=True)
    assert np.allclose(shares.data[0].y, [0.5, 0.3, 0.2])


def test_histogram_other_bar_only_when_something_is_in_it_and_never_merges_with_a_token():
    fig = histogram_figure({1: 3, 2: 1}, {1: "other"}, "Samples", expected={1: 0.7, 2: 0.3})
    assert list(fig.data[0].x) == ["other #1", "#2"]  # everything shown, expected sums to 1: no other bar
    assert np.allclose(fig.data[1].y, [0.7, 0.3])


def test_card_frame_units():
    frame = card_frame({"name": "Qwen2.5-0.5B", "params": 494032768, "weights_bytes": int(942.3 * MIB) + 1,
                        "kv_bytes": 512, "context": 32768, "gguf": None, "dtype": "bfloat16"})
    assert list(frame.columns) == ["property", "value"]
    values = dict(zip(frame["property"], frame["value"]))
    assert values == {"name": "Qwen2.5-0.5B", "params": "494,032,768", "weights_bytes": "942.3 MiB",
                      "kv_bytes": "512 B", "context": "32768", "gguf": "—", "dtype": "bfloat16"}
    assert isinstance(card_frame({}), pd.DataFrame) and list(card_frame({}).columns) == ["property", "value"]


@pytest.mark.parametrize("reason, words", [
    ("stopped", "Stopped by you after 3 tokens."),
    ("max_tokens", "Cut at the length limit after 3 tokens (raise max new tokens for more)."),
    ("time_limit", "Cut at this server's time limit per answer, after 3 tokens."),
    ("error", "The answer broke off: see the message below the chat."),
    ("eos", ""), ("stop_token", "")])
def test_end_notes_are_plain_words(reason, words):
    """Issue 19 item 11: the note of a stopped or cut answer is plain words in glyphs every font has (no Markdown
    emphasis, no ⏹ ✂ ⏱), the same words in the chat's note bubble and after the API's invisible mark."""
    from types import SimpleNamespace

    from qdemo.views.answer import END_MARK, end_note, end_words, note_message

    run = SimpleNamespace(done=SimpleNamespace(reason=reason), tokens=[1, 2, 3])
    assert end_words(run) == words and words.isascii()
    assert end_note(run) == (f"\n\n{END_MARK}{words}" if words else "")
    assert note_message(run) == ({"role": "assistant", "content": END_MARK + words} if words else None)
