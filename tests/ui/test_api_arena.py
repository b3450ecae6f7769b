"""The blind arena's named endpoints through gradio_client against the app on loopback (tiny models): a battle hides
its contenders, its own session votes once and learns who was who, the leaderboard counts the vote, bad input is
refused by name, and a flood of votes meets the rate limit."""

from __future__ import annotations

import json

import pytest
from gradio_client import Client

from qdemo.models.registry import load_registry
from tests.conftest import serve, write_registry

pytestmark = pytest.mark.slow  # launches the app on loopback

ARENA = """\
arena:
  - {name: alpha greedy, model: tiny-qwen2, settings: {do_sample: false, max_new_tokens: 6}}
  - {name: beta warm, model: tiny-qwen2, settings: {do_sample: true, temperature: 1.0, max_new_tokens: 6}}
  - {name: gamma scripted, model: cycle, settings: {max_new_tokens: 6}}
"""
NAMES = ("alpha", "beta", "gamma", "tiny-qwen2", "cycle")


@pytest.fixture(scope="module")
def served(tiny_dir, cycle_dir, tmp_path_factory):
    path = write_registry(tmp_path_factory.mktemp("api-arena") / "models.yaml", tiny_dir, cycle_dir=cycle_dir)
    path.write_text(path.read_text(encoding="utf-8") + ARENA, encoding="utf-8")
    yield from serve(load_registry(path))


def fresh(served) -> Client:
    """A client of its own: a session of its own, so its requests count in a rate-limit window of their own."""
    _, client = served
    return Client(client.src, verbose=False)


def test_a_battle_hides_names_and_its_vote_reveals_them_and_counts(served):
    client = fresh(served)
    battle = client.predict("Write a haiku about rain.", api_name="/arena_battle")
    assert battle["votable"] and battle["a"]["label"] == "Model A" and battle["b"]["label"] == "Model B"
    assert battle["a"]["text"] and battle["b"]["text"] and len(battle["battle_id"]) >= 16
    shown = json.dumps(battle)
    assert not any(name in shown for name in NAMES), shown
    before = client.predict(api_name="/arena_leaderboard")["votes"]
    reveal = client.predict(battle["battle_id"], "a", api_name="/arena_vote")
    assert reveal["outcome"] == "a" and reveal["a"]["name"] != reveal["b"]["name"]
    assert {reveal["a"]["model"], reveal["b"]["model"]} <= {"tiny-qwen2", "cycle"}
    assert reveal["divergence"].startswith(("The answers first diverge", "Both answers are identical",
                                            "The models use different tokenizers"))
    assert reveal["votes"]["total"] == before + 1
    board = client.predict(api_name="/arena_leaderboard")
    assert board["votes"] == before + 1
    rows = {row["contender"]: row for row in board["rows"]}
    assert {reveal["a"]["name"], reveal["b"]["name"]} <= set(rows)
    assert all(row["low"] <= row["rating"] <= row["high"] for row in board["rows"])
    names, matrix = board["win_rates"]["names"], board["win_rates"]["matrix"]
    assert len(matrix) == len(names) and all(len(row) == len(names) for row in matrix)
    assert [row["rank"] for row in board["rows"]] == list(range(1, len(rows) + 1))


def test_one_vote_per_battle_only_by_the_session_that_started_it(served):
    client = fresh(served)
    battle_id = client.predict("Name a colour.", api_name="/arena_battle")["battle_id"]
    with pytest.raises(Exception, match="only the session that started this battle may vote on it"):
        fresh(served).predict(battle_id, "b", api_name="/arena_vote")
    client.predict(battle_id, "both_bad", api_name="/arena_vote")
    with pytest.raises(Exception, match="this battle has its vote already: one vote per battle"):
        client.predict(battle_id, "a", api_name="/arena_vote")


@pytest.mark.parametrize("args, says", [
    (("x", "A"), "outcome must be one of a, b, tie, both_bad"),
    (("x", "both bad"), "outcome must be one of a, b, tie, both_bad"),
    (("x", True), "outcome must be one of"),
    ((5, "a"), "battle_id must be the text a battle answered, got a number"),
    (("nope", "a"), "unknown battle_id 'nope'"),
    (("n" * 100_000, "a"), "unknown battle_id"),
])
def test_a_bad_vote_is_refused_naming_the_field(served, args, says):
    with pytest.raises(Exception, match=says) as refused:
        fresh(served).predict(*args, api_name="/arena_vote")
    assert len(str(refused.value)) < 400  # a huge value is not quoted back whole


@pytest.mark.parametrize("prompt, says", [("   ", "prompt is empty"), (7, "prompt must be text, got a number"),
                                          (["hi"], "prompt must be text, got a list")])
def test_a_bad_prompt_is_refused_naming_it(served, prompt, says):
    with pytest.raises(Exception, match=says):
        fresh(served).predict(prompt, api_name="/arena_battle")


def test_a_flood_of_votes_meets_the_rate_limit(served):
    """Votes run no model, yet they count like every request: the 31st in a minute from one session is refused."""
    client = fresh(served)
    said = []
    for _ in range(33):
        try:
            client.predict("no-such-battle", "a", api_name="/arena_vote")
        except Exception as exc:  # noqa: BLE001 - every one is refused; the message says why
            said.append(str(exc))
    assert len(said) == 33 and all("unknown battle_id" in s for s in said[:30])
    assert all("Too many requests" in s for s in said[30:]), said[30:]


def test_a_caller_picks_the_contenders_it_draws_from(served):
    client = fresh(served)
    board = client.predict(api_name="/arena_leaderboard")
    assert board["contenders"] == ["alpha greedy", "beta warm", "gamma scripted"]
    battle = client.predict("Say hi.", ["alpha greedy", "beta warm", "gamma scripted"], api_name="/arena_battle")
    reveal = client.predict(battle["battle_id"], "tie", api_name="/arena_vote")
    assert {reveal["a"]["name"], reveal["b"]["name"]} <= {"alpha greedy", "beta warm", "gamma scripted"}
    with pytest.raises(Exception, match="contenders: 'nobody' is not a contender here"):
        client.predict("hi", ["alpha greedy", "beta warm", "nobody"], api_name="/arena_battle")
    with pytest.raises(Exception, match="contenders: pick 3 or more"):  # two named: the pair would be known
        client.predict("hi", ["alpha greedy", "gamma scripted"], api_name="/arena_battle")
