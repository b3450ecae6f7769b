"""The arena's leaderboard table and win-rate heatmap, drawn from the ratings module's own numbers."""

from __future__ import annotations

import numpy as np

from qdemo.views.arena_view import COLUMNS, empty_leaderboard, leaderboard_frame, win_rate_figure
from qdemo.views.ratings import Vote, leaderboard, win_rates

VOTES = [Vote("strong", "weak", "a")] * 6 + [Vote("weak", "strong", "a")] * 2 + [Vote("meh", "weak", "both bad")] * 2


def test_the_table_is_the_leaderboard_best_first_with_intervals_and_votes():
    ratings = leaderboard(VOTES, bootstrap=50)
    frame = leaderboard_frame(ratings)
    assert list(frame.columns) == COLUMNS
    assert list(frame["rank"]) == [1, 2, 3] and list(frame["contender"]) == [r.name for r in ratings]
    assert frame["contender"][0] == "strong" and list(frame["votes"]) == [r.votes for r in ratings]
    top = ratings[0]
    assert frame["95% interval"][0] == f"{round(top.low)} – {round(top.high)}"
    assert list(empty_leaderboard().columns) == COLUMNS


def test_the_heatmap_shows_each_share_and_leaves_pairs_that_never_met_blank():
    names, rates = win_rates(VOTES)
    heat = win_rate_figure(names, rates).data[0]
    i = {n: k for k, n in enumerate(names)}
    assert heat.z[i["strong"]][i["weak"]] == 0.75 and heat.text[i["strong"]][i["weak"]] == "75%"
    assert heat.z[i["meh"]][i["weak"]] == 0.5  # both bad: half a win each
    assert heat.z[i["meh"]][i["strong"]] is None and heat.text[i["meh"]][i["strong"]] == ""
    assert [label.replace("<br>", " ") for label in heat.x] == names


def test_no_votes_draw_a_note_not_an_error():
    fig = win_rate_figure([], np.zeros((0, 0)))
    assert not fig.data and "no votes yet" in fig.layout.annotations[0].text


def test_a_contender_with_few_votes_shows_no_interval_yet():
    """Seen in the tour: after one battle the table read "1264 – 1264", as if one vote made the rating certain (a
    bootstrap of one vote always draws that vote). Below five votes the column says when an interval comes."""
    ratings = leaderboard([Vote("greedy", "default", "a")], bootstrap=50)
    frame = leaderboard_frame(ratings)
    assert list(frame["votes"]) == [1, 1]
    assert list(frame["95% interval"]) == ["after 5 votes", "after 5 votes"]
    many = leaderboard_frame(leaderboard(VOTES, bootstrap=50))
    assert [cell[0].isdigit() for cell in many["95% interval"]] == [votes >= 5 for votes in many["votes"]]
