"""Issue 21: the arena's Bradley–Terry leaderboard recovers the strengths of contenders simulated from known
scores, counts a tie as half a win to each, and its win-rate matrix is the hand count."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qdemo.views.ratings import Vote, leaderboard, win_rates


def test_two_contenders_rate_as_their_odds_say():
    votes = [Vote("A", "B", "a")] * 30 + [Vote("A", "B", "b")] * 10
    board = {r.name: r for r in leaderboard(votes, bootstrap=0)}
    # 30 wins to 10: odds 3 to 1, a 400·log10(3) = 190.8-point gap (the prior's 0.05 games each way: 190.6)
    assert board["A"].rating - board["B"].rating == pytest.approx(400 * math.log10(30.05 / 10.05), abs=0.01)
    assert (board["A"].rating + board["B"].rating) / 2 == pytest.approx(1000)
    assert board["A"].votes == board["B"].votes == 40


def test_ties_and_both_bad_count_half_a_win_to_each():
    votes = [Vote("A", "B", "tie")] * 5 + [Vote("B", "A", "both bad")] * 5
    board = {r.name: r.rating for r in leaderboard(votes, bootstrap=0)}
    assert board["A"] == pytest.approx(board["B"])
    names, rates = win_rates(votes + [Vote("A", "C", "a"), Vote("C", "A", "a")])
    assert names == ["A", "B", "C"]
    assert rates[0, 1] == pytest.approx(0.5) and rates[0, 2] == pytest.approx(0.5) and math.isnan(rates[1, 2])


def test_the_fit_recovers_simulated_bradley_terry_strengths():
    truth = {"greedy": 880.0, "t1.0": 960.0, "default": 1000.0, "1.5B": 1060.0, "7B": 1100.0}
    names = list(truth)
    rng = np.random.default_rng(42)
    votes = []
    for _ in range(6000):
        a, b = rng.choice(len(names), 2, replace=False)
        p_a = 1 / (1 + 10 ** ((truth[names[b]] - truth[names[a]]) / 400))
        votes.append(Vote(names[a], names[b], "a" if rng.random() < p_a else "b"))
    board = {r.name: r for r in leaderboard(votes, bootstrap=100, seed=1)}
    assert [r.name for r in leaderboard(votes, bootstrap=0)] == sorted(names, key=lambda n: -truth[n])
    centre = np.mean(list(truth.values()))
    for name, rating in truth.items():
        fitted = board[name]
        assert abs(fitted.rating - (rating - centre + 1000)) < 20, (name, fitted)
        assert fitted.low < fitted.rating < fitted.high and fitted.high - fitted.low < 60
    covered = sum(board[n].low <= truth[n] - centre + 1000 <= board[n].high for n in names)
    assert covered >= 4  # a 95 % interval misses now and then, not often


def test_a_contender_that_won_every_game_stays_finite():
    board = {r.name: r.rating for r in leaderboard([Vote("A", "B", "a")] * 4, bootstrap=20)}
    assert math.isfinite(board["A"]) and board["A"] > board["B"]


def test_bad_votes_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="outcome"):
        leaderboard([Vote("A", "B", "draw")])
    with pytest.raises(ValueError, match="two contenders"):
        leaderboard([Vote("A", "A", "a")])
    assert leaderboard([]) == []
