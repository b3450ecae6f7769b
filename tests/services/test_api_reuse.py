"""Issue 20: an API client's next turn reuses the decode state its last turn left on that model (the longest
common prefix of the prompts), never another client's; the answers equal a fresh client's."""

from __future__ import annotations

import pytest

from qdemo.models.registry import load_registry
from qdemo.services import chat
from qdemo.services.admission import Services
from qdemo.serving.limits import Client, Limits
from qdemo.serving.pool import ModelPool
from tests.conftest import write_registry

GREEDY = {"do_sample": False, "max_new_tokens": 6}


@pytest.fixture()
def services(tiny_dir, tmp_path):
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=8192))
    return Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                    limits=Limits(requests_per_minute=10_000))


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_clients_second_turn_prefills_only_what_is_new(services):
    alice = Client(session="alice-session", address="10.0.0.1")
    first = chat.api_answer(services, alice, "hello 你好", [], "", GREEDY, None)
    assert first.prefill.reused_tokens == 0
    history = [{"role": "user", "content": "hello 你好"}, {"role": "assistant", "content": first.done.text}]
    second = chat.api_answer(services, alice, "and then?", history, "", GREEDY, None)
    kept = list(first.prefill.prompt_ids) + list(first.done.token_ids)
    expected = _common(kept, list(second.prefill.prompt_ids))
    assert expected >= len(first.prefill.prompt_ids)  # the whole first prompt at least is the same
    assert second.prefill.reused_tokens == min(expected, len(second.prefill.prompt_ids) - 1)
    fresh = chat.api_answer(services, Client(session="bob-session", address="10.0.0.2"), "and then?", history, "",
                            GREEDY, None)
    assert fresh.prefill.reused_tokens == 0  # never another client's state
    assert fresh.done.token_ids == second.done.token_ids


def test_the_address_names_a_client_without_a_session(services):
    first = chat.api_answer(services, Client(session=None, address="10.0.0.3"), "hello", [], "", GREEDY, None)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.done.text}]
    again = chat.api_answer(services, Client(session=None, address="10.0.0.3"), "more", history, "", GREEDY, None)
    other = chat.api_answer(services, Client(session=None, address="10.0.0.4"), "more", history, "", GREEDY, None)
    assert again.prefill.reused_tokens > 0 and other.prefill.reused_tokens == 0


def test_a_clients_batch_reuses_what_its_last_turn_left_and_keeps_the_shared_prefix(services):
    from qdemo.services import batch

    carol = Client(session="carol-session", address="10.0.0.5")
    first = chat.api_answer(services, carol, "写一首诗", [], "", GREEDY, None)
    prompts = ["写一首诗", "写一首关于海的诗"]
    mine = batch.batch(services, carol, prompts, None, GREEDY)
    theirs = batch.batch(services, Client(session="dave-session", address="10.0.0.6"), prompts, None, GREEDY)
    prompt = list(first.prefill.prompt_ids)
    assert mine[0]["prompt_tokens"] == len(prompt)  # the same chat prompt as the turn's
    assert 0 < mine[0]["reused_tokens"] == mine[1]["reused_tokens"] < len(prompt)  # up to the prefix both share
    assert theirs[0]["reused_tokens"] == 0
    assert [r["tokens"] for r in mine] == [r["tokens"] for r in theirs]
    again = batch.batch(services, carol, prompts, None, GREEDY)  # the prefix this client's batch kept
    assert again[0]["reused_tokens"] == mine[0]["reused_tokens"]
