"""Issue 21: a sweep cell's measures equal a hand computation on fixed samples."""

from __future__ import annotations

import math

import pytest

from qdemo.views.sweep_measures import Sample, cell_measures, distinct, repeat_rate


def test_the_measures_of_a_cell_equal_the_hand_count():
    # "the cat the cat sat" as ids, and "a dog" — written out by hand below
    first = Sample(tokens=(1, 2, 1, 2, 3), raw_logprobs=(-1.0, -2.0, -0.5, -0.5, -1.0), ended=True, stage_changed=2)
    second = Sample(tokens=(4, 5), raw_logprobs=(-3.0, -1.0), ended=False, stage_changed=0)
    m = cell_measures([first, second])
    # unigrams: 1 2 1 2 3 4 5 → 5 distinct of 7; bigrams: (1,2) (2,1) (1,2) (2,3) (4,5) → 4 distinct of 5
    assert m.distinct_1 == pytest.approx(5 / 7) and m.distinct_2 == pytest.approx(4 / 5)
    # log-probabilities: (-5.0 + -4.0) over 7 tokens
    assert m.mean_logprob == pytest.approx(-9.0 / 7)
    assert m.mean_length == pytest.approx(3.5) and m.ended_share == pytest.approx(0.5)
    # trigrams of the first: (1,2,1) (2,1,2) (1,2,3): none repeats; the second has none → 0
    assert m.repeat_rate == 0.0
    assert m.stage_changed_share == pytest.approx(2 / 7) and m.samples == 2


def test_a_sample_that_loops_repeats_itself():
    loop = (7, 8, 9) * 4  # trigrams: 10, of which the first 3 are new and the next 7 are repeats
    assert repeat_rate(loop) == pytest.approx(7 / 10)
    assert distinct([loop, loop], 1) == pytest.approx(3 / 24)
    assert distinct([(1,)], 2) == 0.0


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="at least one sample"):
        cell_measures([])
    with pytest.raises(ValueError, match="sample 0 has 2 tokens but 1 log-probabilities"):
        cell_measures([Sample((1, 2), (-1.0,), True)])
    empty = cell_measures([Sample((), (), True)])
    assert math.isnan(empty.mean_logprob) and empty.mean_length == 0


def test_the_scatters_outermost_labels_grow_inwards_and_fit_the_plot():
    """Seen in the tour: the leftmost and rightmost cells' labels ran off the plot's edges ("erature 1.3 · top-p 1").
    Each label now grows away from its nearer edge, is not clipped, and the axes leave room around the points."""
    from qdemo.views.sweep_view import SweepCell, scatter_figure

    def cell(temperature: float, logprob: float, variety: float) -> SweepCell:
        measures = cell_measures([Sample((1, 2, 3), (logprob,) * 3, True, 0)])
        measures = type(measures)(**{**measures.__dict__, "distinct_2": variety})
        return SweepCell({"temperature": temperature}, [0], ["x"], measures)

    fig = scatter_figure([cell(1.3, -1.5, 0.8), cell(0.9, -1.0, 0.7), cell(0.5, -0.5, 0.5)])
    trace = fig.data[0]
    assert list(trace.textposition) == ["top right", "top left", "top left"] and trace.cliponaxis is False
    low, high = fig.layout.xaxis.range
    assert low < -1.5 and high > -0.5
    low, high = fig.layout.yaxis.range
    assert low < 0.5 and high > 0.8
