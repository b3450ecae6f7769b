"""The web app streams a chat answer through the generation core, reachable from gradio_client."""

from __future__ import annotations

import pytest
from gradio_client import Client

from qdemo.engine import collect, generate
from qdemo.registry import load_registry
from qdemo.ui.app import build_app


@pytest.fixture(scope="module")
def served(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    demo = build_app(registry)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield registry, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_chat_endpoint_streams_the_engine_answer(served, tiny_lm):
    registry, client = served
    answer, status = client.predict("hello there", api_name="/chat")
    params = registry.get(registry.default).sampling
    expected = collect(generate(tiny_lm, messages=[{"role": "user", "content": "hello there"}], params=params,
                                top_n=0))["done"]
    assert answer == expected.text and status.startswith(expected.reason)
    assert "tokens" in status and "tok/s" in status


def test_empty_message_is_ignored(served):
    _, client = served
    answer, status = client.predict("   ", api_name="/chat")
    assert answer == "" and "ignored" in status
