"""The arena's leaderboard from its votes: Bradley–Terry strengths fitted by maximum likelihood, on the Elo scale,
with 95 % intervals from a bootstrap over the votes, and the pairwise win-rate matrix.

A vote is (a, b, outcome): "a" (a won), "b", "tie" or "both bad". A tie and "both bad" count as half a win to each
side (they say neither was better). In the Bradley–Terry model contender i beats j with probability
p_i / (p_i + p_j); the strengths are fitted with Hunter's minorize–maximize iteration, which climbs the likelihood
at every step. A contender that won (or lost) every game has no finite maximum: a weak prior of PRIOR_GAMES
drawn games against every opponent it met keeps its rating finite without moving the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

OUTCOMES = ("a", "b", "tie", "both bad")
ELO_SCALE = 400 / math.log(10)  # a 400-point gap: 10 to 1 odds, as Elo reads it
BASE = 1000.0  # the mean rating
PRIOR_GAMES = 0.1  # drawn pseudo-games per pair that met
BOOTSTRAP = 200


@dataclass(frozen=True)
class Vote:
    a: str
    b: str
    outcome: str  # one of OUTCOMES


@dataclass(frozen=True)
class Rating:
    name: str
    rating: float
    low: float  # 95 % bootstrap interval
    high: float
    votes: int  # battles it was in


def _tally(votes: Sequence[Vote], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(wins[i, j]: i's wins over j, ties counting half; games[i, j]: their battles)."""
    index = {n: k for k, n in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for v in votes:
        i, j = index[v.a], index[v.b]
        if v.outcome == "a":
            wins[i, j] += 1
        elif v.outcome == "b":
            wins[j, i] += 1
        else:
            wins[i, j] += 0.5
            wins[j, i] += 0.5
    return wins, wins + wins.T


def strengths(wins: np.ndarray, iterations: int = 10_000, tolerance: float = 1e-10) -> np.ndarray:
    """Bradley–Terry log-strengths (mean 0) maximizing the likelihood of `wins` (wins[i, j]: i over j)."""
    games = wins + wins.T
    met = games > 0
    wins = wins + PRIOR_GAMES / 2 * met  # the prior: a few drawn games per pair that met
    games = wins + wins.T
    total = wins.sum(axis=1)
    p = np.ones(len(wins))
    for _ in range(iterations):
        pair = games / (p[:, None] + p[None, :])
        np.fill_diagonal(pair, 0.0)
        denominator = pair.sum(axis=1)
        fresh = np.where(denominator > 0, total / np.where(denominator > 0, denominator, 1), p)
        fresh /= math.exp(np.log(fresh).mean())  # geometric mean 1: the scale is only defined up to a factor
        if np.max(np.abs(np.log(fresh) - np.log(p))) < tolerance:
            p = fresh
            break
        p = fresh
    return np.log(p)


def leaderboard(votes: Sequence[Vote], bootstrap: int = BOOTSTRAP, seed: int = 0) -> list[Rating]:
    """Every contender that has a vote, best first, with its rating, 95 % interval and number of votes."""
    for v in votes:
        if v.outcome not in OUTCOMES:
            raise ValueError(f"a vote's outcome must be one of {', '.join(OUTCOMES)}, got {v.outcome!r}")
        if v.a == v.b:
            raise ValueError(f"a battle needs two contenders, got {v.a!r} twice")
    names = sorted({v.a for v in votes} | {v.b for v in votes})
    if not names:
        return []
    wins, games = _tally(votes, names)
    rating = BASE + ELO_SCALE * strengths(wins)
    rng = np.random.default_rng(seed)
    samples = np.empty((bootstrap, len(names)))
    for k in range(bootstrap):
        drawn = [votes[i] for i in rng.integers(0, len(votes), len(votes))]
        samples[k] = BASE + ELO_SCALE * strengths(_tally(drawn, names)[0])
    low, high = np.percentile(samples, [2.5, 97.5], axis=0) if bootstrap else (rating, rating)
    counts = games.sum(axis=1)
    table = [Rating(n, float(rating[i]), float(low[i]), float(high[i]), int(counts[i])) for i, n in enumerate(names)]
    return sorted(table, key=lambda r: -r.rating)


def win_rates(votes: Sequence[Vote]) -> tuple[list[str], np.ndarray]:
    """(names, rates[i, j]: the share of i's battles against j that i won, ties half; NaN where they never met)."""
    names = sorted({v.a for v in votes} | {v.b for v in votes})
    wins, games = _tally(votes, names)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(games > 0, wins / games, np.nan)
    return names, rates
