"""The blind arena on the tiny models: names hidden until the vote, one vote per battle by its own session, strict
outcomes, the draw, masked refusals, the rate limit, and the leaderboard the votes make."""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
from pathlib import Path

import numpy as np
import pytest

from qdemo.core.engine import collect, generate
from qdemo.models.arena_entries import Contender
from qdemo.models.registry import load_registry
from qdemo.sampling import SamplingParams
from qdemo.services import arena as arena_service
from qdemo.services import history
from qdemo.services.admission import Refused, Services
from qdemo.services.arena import Arena, MemoryBook
from qdemo.serving.limits import Client, Limits
from qdemo.serving.pool import ModelPool
from qdemo.store import StoreSettings, open_store
from qdemo.ui.app import build_app
from tests.conftest import CYCLE_LINE, write_registry

ARENA = """\
arena:
  - {name: alpha greedy, model: tiny-qwen2, settings: {do_sample: false, max_new_tokens: 8}}
  - {name: beta warm, model: tiny-qwen2, settings: {do_sample: true, temperature: 1.0, max_new_tokens: 10}}
"""
TWO_MODELS = """\
arena:
  - {name: alpha greedy, model: tiny-qwen2, settings: {do_sample: false, max_new_tokens: 8}}
  - {name: gamma scripted, model: cycle, settings: {max_new_tokens: 9}}
"""
ME = Client(session="session-1", address="10.0.0.1")
OTHER = Client(session="session-2", address="10.0.0.1")
PROMPT = "Write a haiku about the sea."


def services_with(tmp_path: Path, tiny_dir: Path, arena: str = ARENA, cycle_dir: Path | None = None,
                  limits: Limits | None = None) -> Services:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024, cycle_dir=cycle_dir)
    path.write_text(path.read_text(encoding="utf-8") + arena, encoding="utf-8")
    registry = load_registry(path)
    return Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                    limits=limits or Limits(requests_per_minute=10_000))


def play(services: Services, arena: Arena, client=ME, prompt: str = PROMPT, **kw) -> list:
    return list(arena_service.battle(services, arena, client, prompt, **kw))


@pytest.fixture
def services(tmp_path, tiny_dir) -> Services:
    return services_with(tmp_path, tiny_dir)


def test_names_stay_hidden_until_the_vote_which_reveals_them(services, tiny_lm):
    arena = arena_service.arena_of(services)
    assert [c.name for c in arena.contenders] == ["alpha greedy", "beta warm"]  # models.yaml's arena section
    updates = play(services, arena)
    final = updates[-1]
    assert final.done and final.votable and len(updates) >= 2
    for update in updates:  # everything shown before the vote: no contender or model name
        shown = json.dumps(update.to_dict())
        assert not any(word in shown for word in ("alpha", "beta", "tiny-qwen2", "Tiny")), shown
    assert arena.book.votes() == []
    reveal = arena_service.vote(services, arena, ME, final.battle_id, "a")
    assert {reveal.a.name, reveal.b.name} == {"alpha greedy", "beta warm"}
    revealed = json.dumps(reveal.to_dict())
    assert "alpha greedy" in revealed and "beta warm" in revealed and "tiny-qwen2" in revealed
    assert reveal.divergence == arena_service.compare.describe(reveal.report)
    assert ("diverge at token" in reveal.divergence) or ("identical" in reveal.divergence)
    assert reveal.votes == {"total": 1, "a": 1, "b": 1}
    assert rows(arena.book) == [(reveal.a.name, reveal.b.name, "a")]
    # The greedy side's answer is the model's own greedy answer to the prompt: the battle really answered it.
    greedy_side = "a" if reveal.a.name == "alpha greedy" else "b"
    params = services.registry.get("tiny-qwen2").sampling.replace(do_sample=False, max_new_tokens=8)
    solo = collect(generate(tiny_lm, messages=[{"role": "user", "content": PROMPT}], params=params, top_n=0))
    answer = final.answer_a if greedy_side == "a" else final.answer_b
    assert answer.startswith(solo["done"].text)
    assert reveal.line().startswith("You voted A is better.") and "alpha greedy" in reveal.line()


def test_one_vote_per_battle_and_only_from_the_session_that_started_it(services):
    arena = arena_service.arena_of(services)
    battle_id = play(services, arena)[-1].battle_id
    with pytest.raises(Refused, match="only the session that started this battle"):
        arena_service.vote(services, arena, OTHER, battle_id, "b")
    assert arena.book.votes() == []  # the refused vote stored nothing and revealed nothing
    arena_service.vote(services, arena, ME, battle_id, "tie")
    with pytest.raises(Refused, match="this battle has its vote already: one vote per battle"):
        arena_service.vote(services, arena, ME, battle_id, "b")
    assert len(rows(arena.book)) == 1


def rows(book) -> list[tuple[str, str, str]]:
    return [(v.contender_a, v.contender_b, v.outcome) for v in book.votes()]


def memory_book(tmp_path) -> MemoryBook:
    return MemoryBook()


def store_book(tmp_path):
    return open_store(StoreSettings(data_dir=tmp_path / "store"))


@pytest.mark.parametrize("make", [memory_book, store_book], ids=["memory", "store"])
def test_the_book_keeps_the_first_vote_of_a_battle_and_refuses_an_unknown_one(tmp_path, make):
    """The in-memory book and the run store answer the arena's three calls alike."""
    book = make(tmp_path)
    book.save_battle("x", session="session:s", contender_a="p", contender_b="q", prompt="hi", answer_a="{}",
                     answer_b="{}")
    with pytest.raises(ValueError):
        book.save_battle("x", session="session:s", contender_a="p", contender_b="q", prompt="hi", answer_a="{}",
                         answer_b="{}")
    assert book.save_vote("x", session="session:s", outcome="a") is True
    assert book.save_vote("x", session="session:s", outcome="b") is False
    with pytest.raises(ValueError):
        book.save_vote("nope", session="session:s", outcome="b")
    assert rows(book) == [("p", "q", "a")]


def test_with_a_run_store_the_votes_outlast_the_arena(tmp_path, tiny_dir):
    """The app's store holds the battles and votes: a new arena over it (the server restarted) rates them."""
    services = services_with(tmp_path, tiny_dir)
    services.store = store_book(tmp_path)
    arena = arena_service.arena_of(services)
    battle_id = play(services, arena)[-1].battle_id
    assert services.store.battle(battle_id) is not None
    reveal = arena_service.vote(services, arena, ME, battle_id, "both_bad")
    again = Arena(services.registry.arena, book=services.store)
    assert [r.name for r in again.standings().ratings] == sorted([reveal.a.name, reveal.b.name])
    assert rows(services.store) == [(reveal.a.name, reveal.b.name, "both_bad")]


@pytest.mark.parametrize("outcome", ["A", "both bad", "", None, 1, True, ["a"], "x" * 100_000])
def test_the_outcome_is_read_strictly(services, outcome):
    arena = arena_service.arena_of(services)
    battle_id = play(services, arena)[-1].battle_id
    with pytest.raises(Refused, match="outcome must be one of a, b, tie, both_bad") as refused:
        arena_service.vote(services, arena, ME, battle_id, outcome)
    assert len(str(refused.value)) < 200  # a huge value is not echoed back whole
    assert arena.book.votes() == []
    assert arena_service.vote(services, arena, ME, battle_id, "both_bad").outcome == "both_bad"  # still open


@pytest.mark.parametrize("battle_id, says", [("no-such-battle", "unknown battle_id"), ("b" * 100_000, "unknown"),
                                             (5, "battle_id must be the text"), (None, "battle_id must be the text"),
                                             ("", "battle_id must be the text")])
def test_an_unknown_or_malformed_battle_id_is_refused_by_name(services, battle_id, says):
    arena = arena_service.arena_of(services)
    with pytest.raises(Refused, match=says) as refused:
        arena_service.vote(services, arena, ME, battle_id, "a")
    assert len(str(refused.value)) < 300


def test_an_open_battle_expires_and_the_oldest_go_first(services):
    now = [0.0]
    arena = Arena(services.registry.arena, rng=random.Random(1), open_limit=2, keep_s=60, clock=lambda: now[0])
    first, second, third = (play(services, arena)[-1].battle_id for _ in range(3))
    with pytest.raises(Refused, match="unknown battle_id"):  # pushed out by the newer two
        arena_service.vote(services, arena, ME, first, "a")
    now[0] = 61.0
    with pytest.raises(Refused, match="unknown battle_id"):
        arena_service.vote(services, arena, ME, second, "a")
    assert arena.battle(third) is None and arena.book.votes() == []


def test_battles_draw_two_distinct_contenders_in_either_order(services):
    fake = [Contender(n, "tiny-qwen2", None, {}) for n in ("p", "q", "r")]
    arena = Arena(fake, rng=random.Random(3))
    pairs = [arena.draw(services) for _ in range(200)]
    assert all(a.name != b.name for a, b in pairs)
    assert {(a.name, b.name) for a, b in pairs} == {(x, y) for x in "pqr" for y in "pqr" if x != y}


def test_a_user_or_the_operator_picks_the_contenders_drawn_from(services, tmp_path, tiny_dir):
    """The user names contenders (the page's checkboxes, /arena_battle's `contenders`); the operator (--arena) too:
    draws come only from those, and a bad choice is refused by the field's name."""
    fake = [Contender(n, "tiny-qwen2", None, {}) for n in ("p", "q", "r", "s")]
    arena = Arena(fake, rng=random.Random(5))
    pairs = {frozenset((a.name, b.name)) for a, b in (arena.draw(services, ["q", "r", "s"]) for _ in range(80))}
    assert pairs == {frozenset("qr"), frozenset("qs"), frozenset("rs")}
    # a user who names two knows the pair: with three or more contenders here, the vote stays blind only from three
    for among, says in ((["q", "s"], "pick 3 or more"), (["q", "q", "r"], "pick 3 or more"),
                        (["q", "r", "zeta"], "'zeta'"), ("q,r,s", "must be a list"), ([1, 2, 3], "must be a list")):
        with pytest.raises(Refused, match=f"contenders.*{re.escape(says)}"):
            arena.draw(services, among)
    chosen = play(services, arena_service.arena_of(services), among=["alpha greedy", "beta warm"])
    assert chosen[-1].done  # an arena of two: the choice is all of them
    with pytest.raises(ValueError, match="--arena: 'nobody' is not a contender here"):
        build_app(services.registry, pool=services.pool, arena=["alpha greedy", "nobody"])
    demo = build_app(services.registry, pool=services.pool, arena=["beta warm", "alpha greedy"])
    among = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "arena-among")
    assert [c[0] for c in among.choices] == ["beta warm", "alpha greedy"]  # the page offers the operator's two


def test_contenders_that_cannot_run_here_are_never_drawn(tmp_path, tiny_dir):
    hub = ("  - name: hub-model\n    family: qwen2\n    source: {hub: {repo_id: qdemo-test/not-cached}}\n"
           "    max_context: 4096\n")
    path = write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024)
    text = path.read_text(encoding="utf-8")
    path.write_text(text + hub + "arena:\n  - {name: p, model: tiny-qwen2}\n  - {name: q, model: tiny-qwen2}\n"
                    "  - {name: far, model: hub-model}\n", encoding="utf-8")
    registry = load_registry(path)
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default)
    arena = Arena(registry.arena, rng=random.Random(0))
    assert all("far" not in (a.name, b.name) for a, b in (arena.draw(services) for _ in range(50)))
    lonely = Arena([Contender("p", "tiny-qwen2"), Contender("far", "hub-model")])
    with pytest.raises(Refused, match="needs two contenders that can run on this server; 1 of 2"):
        lonely.draw(services)


def test_two_models_battle_each_through_admission_and_their_refusals_name_neither(tmp_path, tiny_dir, cycle_dir):
    services = services_with(tmp_path, tiny_dir, TWO_MODELS, cycle_dir)
    arena = arena_service.arena_of(services)
    final = play(services, arena)[-1]
    reveal = arena_service.vote(services, arena, ME, final.battle_id, "b")
    scripted = final.answer_a if reveal.a.name == "gamma scripted" else final.answer_b
    assert CYCLE_LINE in scripted  # the scripted model answered its side
    assert sorted(services.pool.loaded()) == ["cycle", "tiny-qwen2"]
    # A prompt too long for the server's limit: admission's message names the model; the battle's names no one.
    tight = services_with(tmp_path / "tight", tiny_dir, TWO_MODELS, cycle_dir,
                          Limits(requests_per_minute=10_000, max_prompt_tokens=16))
    with pytest.raises(Refused) as refused:
        play(tight, arena_service.arena_of(tight), prompt="word " * 200)
    message = str(refused.value)
    assert "prompt tokens" in message
    assert not any(word in message for word in ("tiny-qwen2", "cycle", "alpha", "gamma")), message


def test_a_stopped_battle_cannot_be_voted_on(services):
    arena = arena_service.arena_of(services)
    stop = threading.Event()
    stop.set()  # the caller went before the first step
    final = play(services, arena, stop=stop)[-1]
    assert final.done and not final.votable and "stopped" in final.status
    with pytest.raises(Refused, match="unknown battle_id"):
        arena_service.vote(services, arena, ME, final.battle_id, "a")


def test_a_flood_of_votes_is_refused_by_the_rate_limit(tmp_path, tiny_dir):
    services = services_with(tmp_path, tiny_dir, limits=Limits(requests_per_minute=5))
    arena = arena_service.arena_of(services)
    said = []
    for _ in range(8):
        try:
            arena_service.vote(services, arena, ME, "no-such-battle", "a")
        except Refused as exc:
            said.append(str(exc))
    assert all("unknown battle_id" in s for s in said[:5])
    assert all(s.startswith("Too many requests") for s in said[5:])
    with pytest.raises(Refused, match="Too many requests"):  # a battle counts in the same window
        play(services, arena)


def test_without_an_arena_section_the_default_model_plays_its_presets(tmp_path, tiny_dir):
    services = services_with(tmp_path, tiny_dir, arena="")
    arena = arena_service.arena_of(services)
    assert arena is arena_service.arena_of(services)  # one arena per app
    assert [c.name for c in arena.contenders] == ["tiny-qwen2 greedy", "tiny-qwen2 default",
                                                  "tiny-qwen2 t=1.0 top-p 0.95"]
    sampled = arena.contenders[2]
    assert SamplingParams().replace(**sampled.settings).top_p == 0.95
    assert play(services, arena)[-1].votable


def simulated(book: MemoryBook, votes: list[tuple[str, str, str]]) -> None:
    for a, b, outcome in votes:
        battle_id = secrets.token_urlsafe(16)
        book.save_battle(battle_id, session="session:s", contender_a=a, contender_b=b, prompt="p", answer_a="{}",
                         answer_b="{}")
        assert book.save_vote(battle_id, session="session:s", outcome=outcome)


def test_the_leaderboard_rates_the_votes_and_both_bad_counts_as_a_tie(services):
    arena = Arena([Contender("strong", "tiny-qwen2"), Contender("weak", "tiny-qwen2"),
                   Contender("meh", "tiny-qwen2")])
    simulated(arena.book, [("strong", "weak", "a")] * 8 + [("weak", "strong", "a")] * 2
              + [("meh", "weak", "both_bad")] * 4)
    board = arena_service.standings(services, arena, ME)
    assert [r.name for r in board.ratings][0] == "strong"
    assert {r.name: r.votes for r in board.ratings} == {"strong": 10, "weak": 14, "meh": 4}
    assert all(r.low <= r.rating <= r.high for r in board.ratings)
    rates = dict(zip(board.names, board.rates))
    i = {n: k for k, n in enumerate(board.names)}
    assert rates["strong"][i["weak"]] == pytest.approx(0.8)
    assert rates["meh"][i["weak"]] == pytest.approx(0.5)  # "both bad" is half a win to each side
    assert np.isnan(rates["strong"][i["meh"]])  # never met
    data = board.to_dict()
    assert data["votes"] == 14 and data["rows"][0]["rank"] == 1 and data["rows"][0]["contender"] == "strong"
    assert data["win_rates"]["matrix"][i["strong"]][i["meh"]] is None  # JSON has no NaN
    assert arena.standings() is board  # nothing new: the fit is not run again
    simulated(arena.book, [("meh", "strong", "a")])
    assert arena.standings().votes == 15


def test_a_vote_updates_the_leaderboard(services):
    arena = arena_service.arena_of(services)
    assert arena.standings().ratings == []
    for outcome in ("a", "b", "a"):
        battle_id = play(services, arena)[-1].battle_id
        arena_service.vote(services, arena, ME, battle_id, outcome)
    board = arena.standings()
    assert board.votes == 3 and sorted(r.name for r in board.ratings) == ["alpha greedy", "beta warm"]
    assert sum(r.votes for r in board.ratings) == 6


LONG = """\
arena:
  - {name: long one, model: cycle, settings: {max_new_tokens: 900}}
  - {name: long two, model: cycle, settings: {max_new_tokens: 899}}
"""


def test_a_caller_who_leaves_mid_battle_stops_both_answers_within_a_step(tmp_path, tiny_dir, cycle_dir):
    services = services_with(tmp_path, tiny_dir, LONG, cycle_dir)
    arena = arena_service.arena_of(services)
    stop = threading.Event()
    updates = arena_service.battle(services, arena, ME, PROMPT, stop=stop)
    for update in updates:
        if CYCLE_LINE in update.answer_a:
            stop.set()  # what the endpoint's wrapper does when its caller goes
            break
    final = list(updates)[-1]
    assert final.done and not final.votable and final.ended == ("stopped", "stopped")
    for answer in (final.answer_a, final.answer_b):
        tokens = int(re.search(r"Stopped by you after (\d+) tokens", answer).group(1))
        assert tokens < 100  # far from the 900 it would have written
    assert arena.book.votes() == [] and all(n == 0 for n in services.pool.active().values())
    # A page that closes its stream closes the generator: the leases go at once, not when it is collected.
    updates = arena_service.battle(services, arena, ME, PROMPT)
    next(u for u in updates if u.answer_a)
    assert any(services.pool.active().values())
    updates.close()
    assert all(n == 0 for n in services.pool.active().values())


def test_a_battles_runs_stay_out_of_the_callers_history_until_and_after_the_vote(tmp_path, tiny_dir):
    """Compare keeps its runs in the store as their caller's; a battle's would name the models there."""
    services = services_with(tmp_path, tiny_dir)
    services.store = store_book(tmp_path)
    arena = arena_service.arena_of(services)
    battle_id = play(services, arena)[-1].battle_id
    assert services.store.runs(session=history.client_owner(ME)) == []
    assert len(services.store.runs(session=f"arena:{battle_id}")) == 2


class _FailingBook(MemoryBook):
    """A book whose store fails at the named call (a database gone away, a full disk)."""

    def __init__(self, fails: str) -> None:
        super().__init__()
        self.fails = fails

    def save_battle(self, *args, **kw):
        if self.fails == "save_battle":
            raise OSError("disk full")
        return super().save_battle(*args, **kw)

    def save_vote(self, *args, **kw):
        if self.fails == "save_vote":
            raise OSError("disk full")
        stored = super().save_vote(*args, **kw)
        self.fails = "votes" if self.fails == "votes after the vote" else self.fails
        return stored

    def votes(self):
        if self.fails == "votes":
            raise OSError("database gone away")
        return super().votes()


def test_a_failing_store_never_crashes_a_battle_and_never_hides_a_stored_votes_reveal(services):
    contenders = arena_service.arena_of(services).contenders
    unkept = Arena(contenders, book=_FailingBook("save_battle"))
    final = play(services, unkept)[-1]
    assert final.done and not final.votable and "could not be kept for a vote" in final.status
    refused = Arena(contenders, book=_FailingBook("save_vote"))
    battle = play(services, refused)[-1]
    with pytest.raises(Refused, match="could not be stored"):
        arena_service.vote(services, refused, ME, battle.battle_id, "a")
    unread = Arena(contenders, book=_FailingBook("votes after the vote"))
    battle = play(services, unread)[-1]
    reveal = arena_service.vote(services, unread, ME, battle.battle_id, "b")
    assert reveal.votes is None and {reveal.a.name, reveal.b.name} == {c.name for c in contenders}
    with pytest.raises(Refused, match="leaderboard cannot be read now"):
        arena_service.standings(services, unread, ME)
