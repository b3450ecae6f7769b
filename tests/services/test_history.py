"""Issue 21: runs outlast the server. A chat answer, an API turn, a Compare and a sweep are written to the run store
as their owner's; the history lists only the owner's runs, across a reopened store (a restarted server); a stored
run opens token for token with the conversation it answered; a failing store never fails the answer."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest

from qdemo.core.runs import run_to_json
from qdemo.sampling import SamplingParams
from qdemo.services import chat, history
from qdemo.services import compare as compare_service
from qdemo.serving.limits import Client
from qdemo.store import StoreSettings, open_store
from tests.conftest import tiny_services

OWNER = history.page_owner("0123456789abcdef0123456789abcdef")


@pytest.fixture
def services(tiny_dir, tmp_path):
    services = tiny_services(tiny_dir, tmp_path)
    services.store = open_store(StoreSettings(data_dir=tmp_path / "data"))
    yield services
    services.store.close()


def _answer(services, text: str = "你好, name a prime") -> chat.ChatUpdate:
    session = chat.ChatSession()
    begun = chat.begin_turn(session, text, [], services.limits)
    final = list(chat.answer(services, session, "c", begun.chat, services.default_model, "be brief",
                             SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=5), 1))[-1]
    assert final.done and final.view is not None
    return final


def test_a_kept_chat_run_opens_token_for_token_after_the_store_reopens(services, tmp_path):
    final = _answer(services)
    run_id = history.keep_run(services.store, OWNER, "chat", final.view.run, final.view.messages)
    assert isinstance(run_id, int)
    services.store.close()
    services.store = open_store(StoreSettings(data_dir=tmp_path / "data"))  # a restarted server: a new store
    listed = history.history(services.store, OWNER)
    assert [r.id for r in listed] == [run_id] and listed[0].kind == "chat"
    assert listed[0].tokens == len(final.view.run.tokens) > 0
    assert listed[0].forward == final.view.run.forward and listed[0].tok_s is not None
    kept = history.open_run(services.store, OWNER, str(run_id))
    assert run_to_json(kept.run) == run_to_json(final.view.run)  # every token and stage summary, the metrics
    assert kept.messages == final.view.messages and kept.messages[0] == {"role": "system", "content": "be brief"}


def test_an_owner_sees_only_its_own_runs_and_a_bad_link_names_run(services):
    final = _answer(services)
    mine = history.keep_run(services.store, OWNER, "chat", final.view.run, final.view.messages)
    other = history.page_owner("ffffffffffffffffffffffffffffffff")
    assert history.history(services.store, other) == []
    with pytest.raises(ValueError, match=f"run {mine}: no such run of yours"):
        history.open_run(services.store, other, str(mine))
    for bad in ("abc", "1" * 30, 7, None, "-1"):
        with pytest.raises(ValueError, match="run"):
            history.open_run(services.store, OWNER, bad)
    assert history.page_owner("short") is None and history.page_owner("x" * 65) is None
    assert history.page_owner("../../etc") is None


def test_api_turns_and_compares_are_kept_as_their_callers(services):
    alice = Client(session="alice-session", address="10.0.0.1")
    run = chat.api_answer(services, alice, "count to three", [], "", {"max_new_tokens": 4}, None)
    api_rows = history.history(services.store, history.client_owner(alice))
    assert [(r.kind, r.tokens) for r in api_rows] == [("api", len(run.tokens))]
    updates = list(compare_service.compare(services, None, alice, "一二三", "", "", {"max_new_tokens": 3},
                                           {"max_new_tokens": 3, "temperature": 1.5, "do_sample": True}, 7, 1))
    assert updates[-1].done
    rows = history.history(services.store, history.client_owner(alice))
    assert [r.kind for r in rows] == ["compare", "compare", "api"]  # newest first
    anonymous = Client(session="evt", address="10.0.0.2", own_session=False)  # REST without a session: its address
    assert history.client_owner(anonymous) == "address:10.0.0.2"


def test_a_failing_store_never_fails_the_answer(services, caplog):
    final = _answer(services)
    broken = SimpleNamespace(save_run=lambda **kw: (_ for _ in ()).throw(OSError("disk full")))
    with caplog.at_level(logging.WARNING, logger="qdemo"):
        assert history.keep_run(broken, OWNER, "chat", final.view.run) is None
    assert "did not keep a chat run" in caplog.text and "disk full" in caplog.text
    assert history.keep_run(None, OWNER, "chat", final.view.run) is None  # the store is off
    with pytest.raises(ValueError, match="store is off"):
        history.open_run(None, OWNER, "1")


def test_the_forward_filter_finds_older_runs_past_the_newest_ones(services, monkeypatch):
    """Review of issue 21: the forward filter ran after the listing's limit, so older llama.cpp runs never showed
    behind newer torch ones. It is part of the query now."""
    run = _answer(services).view.run
    for forward in ("llama.cpp Q4_K_M", "torch fp32", "torch fp32"):  # the llama.cpp run is the oldest
        history.keep_run(services.store, OWNER, "chat", dataclasses.replace(run, forward=forward))
    monkeypatch.setattr(history, "HISTORY_ROWS", 2)
    assert [r.forward for r in history.history(services.store, OWNER, forward="llama.cpp")] == ["llama.cpp Q4_K_M"]
    assert [r.forward for r in history.history(services.store, OWNER, forward="torch")] == ["torch fp32"] * 2
    assert history.history(services.store, OWNER, forward="llama.cpp_%") == []  # a pattern's characters are text
