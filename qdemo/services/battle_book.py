"""Where the blind arena's finished battles and their votes are kept: a `BattleBook`. `MemoryBook` holds them in this
process (bounded, gone at a restart); the run store (qdemo.store.Store) has the same three methods and takes its
place when the app has one. Contenders are kept by name: the leaderboard rates names, whatever models they ran.
No Gradio."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol, Sequence

OPEN_BATTLES = 1_000  # battles kept for a vote; the oldest go first
KEPT_VOTES = 100_000  # votes the leaderboard is fitted on; the oldest go first



class BookVote(Protocol):
    """A stored vote as a book returns it (the store's StoredVote has these and more)."""

    contender_a: str
    contender_b: str
    outcome: str  # a | b | tie | both_bad


@dataclass(frozen=True)
class MemoryVote:
    battle_id: str
    session: str
    outcome: str
    contender_a: str
    contender_b: str


class BattleBook(Protocol):
    """The record of battles and votes. `session` is who started the battle, or who voted (the arena lets only
    the first vote); answers are JSON text (qdemo.core.runs.run_to_json)."""

    def save_battle(self, battle_id: str, *, session: str, contender_a: str, contender_b: str, prompt: str,
                    answer_a: str, answer_b: str) -> None:
        ...

    def save_vote(self, battle_id: str, *, session: str, outcome: str) -> bool:
        """True when the vote is stored; False when the battle has its vote already. An unknown battle raises
        ValueError."""
        ...

    def votes(self) -> Sequence[BookVote]:
        """Every vote kept, oldest first."""
        ...


@dataclass
class _Saved:
    contender_a: str
    contender_b: str
    voted: bool = False


class MemoryBook:
    """A BattleBook in memory, safe across threads: the newest `battles` battles (their prompts and answers are
    not kept: only whom they pitted) and the newest `kept_votes` votes."""

    def __init__(self, battles: int = OPEN_BATTLES, kept_votes: int = KEPT_VOTES) -> None:
        self._limit = battles
        self._battles: OrderedDict[str, _Saved] = OrderedDict()
        self._votes: deque[MemoryVote] = deque(maxlen=kept_votes)
        self._lock = threading.Lock()

    def save_battle(self, battle_id: str, *, session: str, contender_a: str, contender_b: str, prompt: str,
                    answer_a: str, answer_b: str) -> None:
        with self._lock:
            if battle_id in self._battles:
                raise ValueError(f"battle_id {battle_id!r} is already stored")
            self._battles[battle_id] = _Saved(contender_a, contender_b)
            while len(self._battles) > self._limit:
                self._battles.popitem(last=False)

    def save_vote(self, battle_id: str, *, session: str, outcome: str) -> bool:
        with self._lock:
            saved = self._battles.get(battle_id)
            if saved is None:
                raise ValueError(f"no battle {battle_id!r}")
            if saved.voted:
                return False
            saved.voted = True
            self._votes.append(MemoryVote(battle_id, session, outcome, saved.contender_a, saved.contender_b))
            return True

    def votes(self) -> list[MemoryVote]:
        with self._lock:
            return list(self._votes)
