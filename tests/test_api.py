"""The app's named endpoints through gradio_client, against the app launched on loopback with the tiny model."""

from __future__ import annotations


import pytest
from gradio_client import Client

from qdemo.engine import collect, generate
from qdemo.introspect import next_token_logits
from qdemo.lab import stage_distributions
from qdemo.registry import load_registry
from qdemo.ui.app import build_app
from qdemo.ui.labflow import context_ids


@pytest.fixture(scope="module")
def served(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    demo = build_app(registry)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield registry, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_chat_streams_the_engine_answer(served, tiny_lm):
    registry, client = served
    settings = {"seed": 11, "max_new_tokens": 12}
    job = client.submit("你好, hello", [], "", settings, None, api_name="/chat")
    final = job.result()
    partials = job.outputs()
    params = registry.get(registry.default).sampling.replace(**settings)
    expected = collect(generate(tiny_lm, messages=[{"role": "user", "content": "你好, hello"}], params=params,
                                top_n=0))["done"]
    assert final == expected.text
    assert len(partials) >= 2 and all(final.startswith(p) for p in partials)


def test_chat_with_history_and_system(served, tiny_lm):
    registry, client = served
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
    settings = {"do_sample": False, "max_new_tokens": 8}
    final = client.predict("and now?", history, "", settings, "Be brief.", api_name="/chat")
    messages = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "and now?"}]
    params = registry.get(registry.default).sampling.replace(**settings)
    assert final == collect(generate(tiny_lm, messages=messages, params=params, top_n=0))["done"].text


@pytest.mark.parametrize("args,match", [
    (("", [], "", None, None), "empty"),
    (("hi", [], "no-such-model", None, None), "no-such-model"),
    (("hi", [], "", {"temperature": -1}, None), "temperature"),
    (("hi", [], "", {"bogus": 1}, None), "bogus"),
])
def test_bad_chat_requests_are_explained(served, args, match):
    _, client = served
    with pytest.raises(Exception, match=match):
        client.predict(*args, api_name="/chat")
    assert client.predict("still serving?", [], "", {"max_new_tokens": 2}, None, api_name="/chat") is not None


def test_compare_reports_divergence(served, tiny_lm):
    _, client = served
    result = client.predict("Write a haiku.", "", "", {"do_sample": False, "max_new_tokens": 10},
                            {"do_sample": True, "max_new_tokens": 10}, 5, api_name="/compare")
    a, b, d = result["a"], result["b"], result["divergence"]
    assert a["reason"] in ("eos", "max_tokens", "stop_token") and a["error"] is None
    assert d["level"] == "token"
    if d["step"] is not None:
        step = d["step"]
        assert a["tokens"][:step] == b["tokens"][:step] and a["tokens"][step] != b["tokens"][step]
        assert d["a_prob_of_b"] is not None and 0 <= d["a_prob_of_b"] <= 1
    else:
        assert a["tokens"] == b["tokens"]


def test_next_token_endpoint_equals_the_lab(served, tiny_lm):
    registry, client = served
    settings = {"do_sample": True, "temperature": 0.5, "top_k": 5, "top_p": 0.9}
    result = client.predict("数一数: one two", "", settings, "raw text", 5, api_name="/next_token")
    ids = context_ids(tiny_lm, "数一数: one two", "raw text")
    params = registry.get(registry.default).sampling.replace(**settings)
    stages = stage_distributions(next_token_logits(tiny_lm, ids), ids, params, top_n=5)
    assert [s["stage"] for s in result["stages"]] == [s.name for s in stages]
    for got, want in zip(result["stages"], stages):
        assert [t["id"] for t in got["tokens"]] == list(want.token_ids)
        assert [t["p"] for t in got["tokens"]] == pytest.approx(list(want.probs), abs=1e-9)
    assert result["context_tokens"] == len(ids)
    with pytest.raises(Exception, match="context is empty"):
        client.predict("   ", "", None, "chat", 5, api_name="/next_token")
