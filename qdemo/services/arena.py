"""The blind arena: two contenders drawn at random answer one prompt as "Model A" and "Model B"; the person who
started the battle votes once, and only then learns who was who and where the answers first parted. Votes feed a
Bradley–Terry leaderboard (qdemo.views.ratings). No Gradio here.

A battle is a Compare run (qdemo.services.compare): the same admission (rate limit, limits, lease), one prefill
and two rows when both contenders run one model, turns when they run two. Contenders come from models.yaml's
`arena:` section, else from the default model's presets. Names stay out of everything a battle shows before its
vote: the streamed answers, the notices, the refusals and the load progress are masked.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qdemo.core.runs import RunRecord, run_to_json
from qdemo.models.arena_entries import Contender
from qdemo.models.sources import ProgressFn
from qdemo.services import compare
from qdemo.services.admission import Refused, Services, echo
from qdemo.services.arguments import Arguments, kind
from qdemo.services.battle_book import OPEN_BATTLES, BattleBook, BookVote, MemoryBook
from qdemo.services.chat import answer_text
from qdemo.services.history import STORE_ERRORS, client_owner
from qdemo.services.settings import summary
from qdemo.serving.limits import Client, clean_text, cut_text
from qdemo.views.answer import end_note
from qdemo.views.ratings import Rating, Vote, leaderboard, win_rates

__all__ = ["Arena", "BattleBook", "BattleUpdate", "Contender", "MemoryBook", "Reveal", "Standings", "arena_of",
           "battle", "default_contenders", "standings", "vote"]

log = logging.getLogger("qdemo")
OUTCOMES = ("a", "b", "tie", "both_bad")
# FastChat's arena counts "both are bad" as a tie: neither answer was better than the other. views.ratings does too.
RATING_OUTCOMES = {"a": "a", "b": "b", "tie": "tie", "both_bad": "both bad"}
OUTCOME_WORDS = {"a": "A is better", "b": "B is better", "tie": "a tie", "both_bad": "both are bad"}
HIDDEN = ("Model A", "Model B")
KEEP_S = 24 * 3600  # an unvoted battle can be voted on for a day
MAX_BATTLE_ID = 64  # secrets.token_urlsafe(16) is 22 characters
UNVOTABLE = {"stopped": "The battle was stopped before both answers ended: start a new one to vote.",
             "error": "An answer broke off: start a new battle to vote."}
PRESETS = (("greedy", {"do_sample": False}), ("default", {}),
           ("t=1.0 top-p 0.95", {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 0, "min_p": 0.0}))
READY = "Both answers are in. Which is better? Vote to see who they were."
NOT_KEPT = "This battle could not be kept for a vote (the server's store failed): start a new one."


@dataclass
class Battle:
    """What the arena keeps of a finished battle until its vote: who may vote, and what the vote reveals."""

    battle_id: str
    session: str
    a: Contender
    b: Contender
    seed: int
    forwards: tuple[str, str]  # how each side ran ("torch fp32", "llama.cpp Q4_K_M")
    divergence: str  # compare.describe of the two answers
    report: dict
    started: float


@dataclass(frozen=True)
class BattleUpdate:
    """What the page and the API show of a running battle: no contender names."""

    battle_id: str
    answer_a: str
    answer_b: str
    status: str
    done: bool = False
    votable: bool = False
    ended: tuple[str | None, str | None] = (None, None)  # each side's done reason

    def to_dict(self) -> dict[str, Any]:
        return {"battle_id": self.battle_id, "votable": self.votable, "notice": self.status,
                "a": {"label": HIDDEN[0], "text": self.answer_a, "reason": self.ended[0]},
                "b": {"label": HIDDEN[1], "text": self.answer_b, "reason": self.ended[1]}}


@dataclass(frozen=True)
class Reveal:
    """A stored vote's answer: who A and B were, where their answers first parted, and the votes so far."""

    battle_id: str
    outcome: str
    a: Contender
    b: Contender
    forwards: tuple[str, str]
    decoding: tuple[str, str]  # each side's sampling in words (its preset over its model's defaults)
    seed: int
    divergence: str
    report: dict
    votes: dict[str, int] | None  # total, and each contender's battles voted on (None: the store cannot say now)

    def line(self) -> str:
        sides = [f"**{label}** was **{c.name}** ({c.model}, {forward}; {decoding})"
                 for label, c, forward, decoding in zip(HIDDEN, (self.a, self.b), self.forwards, self.decoding)]
        return (f"You voted {OUTCOME_WORDS[self.outcome]}. {sides[0]} · {sides[1]} · seed {self.seed}.\n\n"
                f"{self.divergence}")

    def to_dict(self) -> dict[str, Any]:
        return {"battle_id": self.battle_id, "outcome": self.outcome, "seed": self.seed,
                "a": {**self.a.to_dict(), "ran_as": self.forwards[0], "decoding": self.decoding[0]},
                "b": {**self.b.to_dict(), "ran_as": self.forwards[1], "decoding": self.decoding[1]},
                "divergence": self.divergence, "divergence_report": self.report, "votes": self.votes}


@dataclass(frozen=True)
class Standings:
    """The leaderboard: ratings best first, and the win-rate matrix (rates[i, j]: i's share of its battles against
    j, ties half; NaN where they never met)."""

    ratings: list[Rating]
    names: list[str]
    rates: np.ndarray
    votes: int

    def to_dict(self) -> dict[str, Any]:
        rows = [{"rank": i + 1, "contender": r.name, "rating": round(r.rating, 1), "low": round(r.low, 1),
                 "high": round(r.high, 1), "votes": r.votes} for i, r in enumerate(self.ratings)]
        matrix = [[None if np.isnan(x) else round(float(x), 4) for x in row] for row in self.rates]
        return {"rows": rows, "win_rates": {"names": self.names, "matrix": matrix}, "votes": self.votes}


class Arena:
    """The contenders, the book of battles and votes, and the battles open for a vote (the newest `open_limit`,
    for `keep_s`), shared by every session. Safe across threads."""

    def __init__(self, contenders: Sequence[Contender], book: BattleBook | None = None,
                 rng: random.Random | None = None, open_limit: int = OPEN_BATTLES, keep_s: float = KEEP_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = [c.name for c in contenders]
        if len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(f"an arena needs two or more contenders with distinct names, got {names}")
        self.contenders = tuple(contenders)
        self.book: BattleBook = book if book is not None else MemoryBook()
        self.open_limit, self.keep_s, self._clock = open_limit, keep_s, clock
        self._rng = rng if rng is not None else random.SystemRandom()
        self._open: OrderedDict[str, Battle] = OrderedDict()
        self._lock = threading.Lock()
        self._board: tuple[str, Standings] | None = None

    def chosen(self, names: Any, field_name: str = "contenders", least: int = 2) -> tuple[Contender, ...]:
        """The contenders `names` lists (a user's or the operator's choice), read strictly: `least` or more distinct
        names of this arena's contenders; None: all of them."""
        if names is None:
            return self.contenders
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise Refused(f"{field_name} must be a list of contender names, got {kind(names)}")
        known = {c.name: c for c in self.contenders}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise Refused(f"{field_name}: {echo(unknown[0])} is not a contender here; the contenders are "
                          f"{', '.join(known)}")
        if len(set(names)) < least:
            raise Refused(f"{field_name}: pick {least} or more contenders, got {len(set(names))}")
        return tuple(known[n] for n in dict.fromkeys(names))

    def draw(self, services: Services, among: Any = None) -> tuple[Contender, Contender]:
        """Two distinct contenders that can run here, in random order; `among`: only from those names, three or
        more where the arena has them (a user who names only two knows the pair, and the vote would not be
        blind)."""
        pool = self.chosen(among, least=min(3, len(self.contenders)))
        playable = [c for c in pool if _playable(services, c)]
        if len(playable) < 2:
            raise Refused(f"The arena needs two contenders that can run on this server; {len(playable)} of "
                          f"{len(pool)} can.")
        with self._lock:
            a, b = self._rng.sample(playable, 2)
        return a, b

    def remember(self, record: Battle) -> None:
        with self._lock:
            self._open[record.battle_id] = record
            while len(self._open) > self.open_limit:
                self._open.popitem(last=False)

    def battle(self, battle_id: str) -> Battle | None:
        """The battle `battle_id` while it is kept (None: unknown or expired). Whether it has its vote is the book's
        to say."""
        with self._lock:
            record = self._open.get(battle_id)
            if record is not None and self.now() - record.started > self.keep_s:
                del self._open[battle_id]
                return None
            return record

    def now(self) -> float:
        return self._clock()

    def board(self) -> Standings:
        """standings(), or a refusal saying the store failed (logged): never a crash."""
        try:
            return self.standings()
        except STORE_ERRORS as exc:
            log.warning("the run store could not read the votes: %s", exc)
            raise Refused("the leaderboard cannot be read now (the server's store failed); try again") from None

    def standings(self) -> Standings:
        """The leaderboard over the book's votes, fitted again only when they changed (the bootstrap is the cost)."""
        votes = [(v.contender_a, v.contender_b, v.outcome) for v in self.book.votes()]
        key = hashlib.sha256(repr(votes).encode("utf-8")).hexdigest()
        with self._lock:
            if self._board is not None and self._board[0] == key:
                return self._board[1]
        rated = [Vote(a, b, RATING_OUTCOMES[o]) for a, b, o in votes]
        names, rates = win_rates(rated)
        board = Standings(ratings=leaderboard(rated), names=names, rates=rates, votes=len(votes))
        with self._lock:
            self._board = (key, board)
        return board


_MADE = threading.Lock()


def arena_of(services: Services) -> Arena:
    """The app's arena, made on first use: models.yaml's contenders, else the default model's presets; its battles
    and votes in the app's run store when it has one (they outlast the server), else in memory."""
    with _MADE:
        if services.arena is None:
            services.arena = Arena(services.registry.arena or default_contenders(services), book=services.store)
        return services.arena


def default_contenders(services: Services) -> tuple[Contender, ...]:
    """The default model against itself: greedy, its own defaults, t=1.0 with top-p 0.95; its defaults once per
    forward where it has two here (llama.cpp and torch)."""
    name = services.default_model
    forwards = [f for f in services.forward_choices(name) if f != "auto"]
    out = [Contender(f"{name} {label}", name, None, settings) for label, settings in PRESETS
           if not (forwards and label == "default")]
    out += [Contender(f"{name} default ({forward})", name, forward) for forward in forwards]
    return tuple(out)


def _playable(services: Services, contender: Contender) -> bool:
    try:
        services.model_ref(contender.ref)
    except Refused:  # not ready here, or its forward is not installed
        return False
    return True


# --- a battle -----------------------------------------------------------------------------------------------------

@dataclass
class _Mask:
    """Hides the contenders in text a battle shows before its vote: their names become "Model A"/"Model B", their
    models' names "a contender's model" (both sides may run one model)."""

    swaps: list[tuple[re.Pattern, str]] = field(default_factory=list)

    @classmethod
    def of(cls, services: Services, a: Contender, b: Contender) -> "_Mask":
        words = {a.name: HIDDEN[0], b.name: HIDDEN[1]}
        for c in (a, b):
            spec = services.registry.get(c.model)
            words.setdefault(spec.display_name, "a contender's model")
            words.setdefault(c.model, "a contender's model")
        ordered = sorted(words.items(), key=lambda item: -len(item[0]))  # the longest first: names inside names
        return cls([(re.compile(re.escape(word), re.IGNORECASE), shown) for word, shown in ordered])

    def text(self, text: str) -> str:
        for pattern, shown in self.swaps:
            text = pattern.sub(shown, text)
        return text

    def progress(self, progress: ProgressFn | None) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda phase, done, total: progress(self.text(phase), done, total)


def battle(services: Services, arena: Arena, client: Client | str | None, prompt: Any,
           stop: threading.Event | None = None, progress: ProgressFn | None = None, among: Any = None
           ) -> Iterator[BattleUpdate]:
    """A battle on `prompt`: both answers streaming under hidden names, then (when both ended by themselves or at a
    limit) the battle kept for its vote. `stop`: a threading.Event set when the caller goes. `among`: the
    contenders the caller chose to draw from (None: all)."""
    if not isinstance(prompt, str):
        raise Refused(f"prompt must be text, got {kind(prompt)}: {echo(prompt)}")
    a, b = arena.draw(services, among)
    battle_id, seed = secrets.token_urlsafe(16), secrets.randbits(31)
    mask = _Mask.of(services, a, b)
    final = None
    # Compare keeps its runs in the store as their owner's; a battle's go under the battle, out of the caller's
    # history, which would name the models before the vote.
    updates = compare.compare(services, compare.CompareSession(stop), client, prompt, a.ref, b.ref, dict(a.settings),
                              dict(b.settings), seed, 1, mask.progress(progress), top_n=0, owner=f"arena:{battle_id}")
    try:
        for final in updates:
            if not final.done:
                yield BattleUpdate(battle_id, _pane(final.a), _pane(final.b), mask.text(final.status))
    except (Refused, ValueError) as exc:  # the guard shows a ValueError word for word: masked like a refusal
        raise Refused(mask.text(str(exc))) from None
    finally:  # a caller that leaves closes this generator: the runs and their leases end now, not at collection
        updates.close()
    if final is None or not final.done:
        return
    # compare's verdict is the divergence (revealed with the vote), then a blank line and its notices
    notice = mask.text(final.status.partition("\n\n")[2])
    why = next((UNVOTABLE[r.done.reason] for r in (final.a, final.b) if r.done and r.done.reason in UNVOTABLE), "")
    if not why and not _keep(arena, Battle(battle_id, client_owner(client), a, b, seed,
                                           (final.a.forward, final.b.forward), compare.describe(final.report),
                                           final.report, arena.now()), services, prompt, final.a, final.b):
        why = NOT_KEPT
    yield BattleUpdate(battle_id, _pane(final.a), _pane(final.b), " ".join(w for w in (why or READY, notice) if w),
                       done=True, votable=not why, ended=(_reason(final.a), _reason(final.b)))


def _keep(arena: Arena, record: Battle, services: Services, prompt: str, run_a: RunRecord, run_b: RunRecord) -> bool:
    """The battle in the book and open for its vote; False when the book (a failing store) could not keep it."""
    text, _ = cut_text(clean_text(prompt), services.limits.max_input_chars)
    try:
        arena.book.save_battle(record.battle_id, session=record.session, contender_a=record.a.name,
                               contender_b=record.b.name, prompt=text, answer_a=run_to_json(run_a),
                               answer_b=run_to_json(run_b))
    except STORE_ERRORS as exc:
        log.warning("the run store did not keep battle %s: %s", record.battle_id, exc)
        return False
    arena.remember(record)
    return True


def _pane(run: RunRecord) -> str:
    return answer_text(run) + end_note(run)


def _reason(run: RunRecord) -> str | None:
    return run.done.reason if run.done else None


# --- a vote, the leaderboard --------------------------------------------------------------------------------------

def vote(services: Services, arena: Arena, client: Client | str | None, battle_id: Any, outcome: Any) -> Reveal:
    """One vote on a battle its caller started: a, b, tie or both_bad. Refused: a second vote, another session's
    vote, an unknown or expired battle. Counted by the rate limit like every request."""
    services.check_rate(client)
    outcome = Arguments(services.limits).choice(outcome, "outcome", OUTCOMES)
    battle_id = _battle_id(battle_id)
    record = arena.battle(battle_id)
    unknown = (f"unknown battle_id {echo(battle_id)}: no battle of this server that is still open for a vote "
               f"(it keeps the newest {arena.open_limit:,} for {arena.keep_s / 3600:g} h)")
    if record is None:
        raise Refused(unknown)
    if record.session != client_owner(client):
        raise Refused("only the session that started this battle may vote on it")
    try:
        stored = arena.book.save_vote(battle_id, session=record.session, outcome=outcome)
    except ValueError:  # the book no longer holds it (a store pruned by its retention)
        raise Refused(unknown) from None
    except STORE_ERRORS as exc:
        log.warning("the run store did not keep the vote on battle %s: %s", battle_id, exc)
        raise Refused("your vote could not be stored (the server's store failed): press it again") from None
    if not stored:
        raise Refused("this battle has its vote already: one vote per battle")
    return Reveal(battle_id, outcome, record.a, record.b, record.forwards,
                  (_decoding(services, record.a), _decoding(services, record.b)), record.seed, record.divergence,
                  record.report, _counts(arena, record.a.name, record.b.name))


def _battle_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Refused(f"battle_id must be the text a battle answered, got {kind(value)}: {echo(value)}")
    if len(value) > MAX_BATTLE_ID:
        raise Refused(f"unknown battle_id {echo(value)}: battle ids are at most {MAX_BATTLE_ID} characters")
    return value.strip()


def _decoding(services: Services, contender: Contender) -> str:
    params = services.registry.get(contender.model).sampling.replace(**contender.settings)
    return summary(params) + ("" if contender.settings else " (the model's defaults)")


def _counts(arena: Arena, a: str, b: str) -> dict[str, int] | None:
    """The votes so far (None when the store cannot be read now: the vote is stored, and its reveal must show)."""
    try:
        votes: Sequence[BookVote] = arena.book.votes()
    except STORE_ERRORS as exc:
        log.warning("the run store could not count the votes: %s", exc)
        return None
    return {"total": len(votes), "a": sum(a in (v.contender_a, v.contender_b) for v in votes),
            "b": sum(b in (v.contender_a, v.contender_b) for v in votes)}


def standings(services: Services, arena: Arena, client: Client | str | None) -> Standings:
    """The leaderboard for a named endpoint: counted by the rate limit like every request."""
    services.check_rate(client)
    return arena.board()
