"""The Inspect views' named endpoints through gradio_client against the app on loopback (tiny model): each
answers JSON with a CSV of the same table, agrees with the core it wraps, and refuses bad input by name."""

from __future__ import annotations

import io
import json
import urllib.request

import pandas as pd
import pytest

from qdemo.core.runs import run_from_json
from qdemo.models.registry import load_registry
from qdemo.probes.lens import logit_lens
from qdemo.views.bundle import read_bundle
from tests.conftest import serve, write_registry

pytestmark = pytest.mark.slow  # launches the app on loopback

HISTORY = [{"role": "user", "content": "name a prime 请"}, {"role": "assistant", "content": "seven 七"}]


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    registry = load_registry(write_registry(tmp_path_factory.mktemp("api-inspect") / "models.yaml", tiny_dir,
                                            max_context=8192))
    yield from serve(registry)


def subject_ids(lm, history):
    """The prompt the chat would send for the question (the model's default system prompt first) and the answer
    as plain text."""
    from qdemo.forwards.gate import StepGate
    from qdemo.serving.local import LocalBackend

    backend = LocalBackend(lm, StepGate())
    return list(backend.chat_prompt([history[0]], 1).ids), backend.raw_text_ids(history[1]["content"])


def test_lens_endpoint_equals_the_core(served, tiny_lm):
    _, client = served
    out = client.predict(HISTORY, "", None, False, api_name="/lens")
    prompt, answer = subject_ids(tiny_lm, HISTORY)
    grid = logit_lens(tiny_lm, prompt + answer, range(len(prompt) - 1, len(prompt) + len(answer) - 1))
    assert out["targets"] == answer
    # top-1 everywhere, and the top-10 probabilities (their order can swap among near-equal tail values)
    assert [[cell[0] for cell in row] for row in out["top_ids"]] == grid.top1.tolist()
    import numpy as np

    np.testing.assert_allclose(np.array(out["top_probs"]), grid.top_probs, atol=1e-5)
    frame = pd.read_csv(io.StringIO(out["csv"]))
    assert len(frame) == len(out["rows"]) * len(answer)


def test_attribution_score_divergence_sinks(served):
    _, client = served
    att = client.predict(HISTORY, 1, "occlusion", False, "", None, api_name="/attribution")
    assert {p["unit"] for p in att["per_turn"]} >= {"user 1", "answer so far", "template"}
    assert "logprob_drop" in att["csv"]
    score = client.predict("plain text 纯文本 here", "", "", False, api_name="/score")
    assert score["summary"]["tokens_scored"] == len(score["ids"]) - 1 and "surprisal_bits" in score["csv"]
    div = client.predict("plain text 纯文本 here", "tiny-qwen2", "tiny-qwen2", "", False, api_name="/divergence")
    assert div["summary"]["agreement"] == 1.0
    sinks = client.predict(HISTORY, "", None, api_name="/sinks")
    assert len(sinks["heads"]) == 2 * 4 and "first_token" in sinks["csv"]


def test_decisions_branch_and_bundle(served):
    _, client = served
    out = client.predict("hello", [], "", {"seed": 5, "max_new_tokens": 6, "top_p": 0.5}, None,
                         api_name="/decisions")
    run = run_from_json(out["run"])
    assert len(out["tokens"]) == len(run.tokens) and "Which stage decided" in out["summary"]
    page = client.predict(out["run"], api_name="/bundle")
    assert read_bundle(page).to_dict() == run.to_dict() and "local checkpoint" in page
    branched = client.predict(HISTORY, 0, 5, "", {"do_sample": False, "max_new_tokens": 4}, None, api_name="/branch")
    assert branched["token_ids"][0] == 5 and "token_id" in branched["csv"]


@pytest.mark.parametrize("endpoint,args,match", [
    ("/lens", ([{"role": "user", "content": "hi"}], "", None, False), "must end with the assistant answer"),
    ("/attribution", (HISTORY, 99, "occlusion", False, "", None), "answer position in 0..")
    , ("/attribution", (HISTORY, 0, "saliency", False, "", None), "method must be one of"),
    ("/score", ("   ", "", "", False), "empty"),
    ("/bundle", ("not json",), "expected a qdemo evidence bundle"),
])
def test_refusals_name_the_field(served, endpoint, args, match):
    _, client = served
    with pytest.raises(Exception, match=match):
        client.predict(*args, api_name=endpoint)


def test_every_view_is_a_named_endpoint(served):
    _, client = served
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/lens", "/attribution", "/decisions", "/branch", "/score", "/divergence", "/sinks", "/bundle"} <= named


# --- issue 19 items 14 and 16: one strict reader for every endpoint's inputs ---------------------------------------

TOOL = {"role": "tool", "content": "x"}


@pytest.mark.parametrize("endpoint,args,match", [
    ("/lens", ([TOOL, *HISTORY], "", None, False), "history message 0 has role 'tool'; expected user or assistant"),
    ("/attribution", ([HISTORY[0], TOOL, HISTORY[1]], 0, "occlusion", False, "", None),
     "history message 1 has role 'tool'"),
    ("/sinks", ([TOOL, *HISTORY], "", None), "history message 0 has role 'tool'"),
    ("/branch", ([TOOL, *HISTORY], 0, 5, "", None, None), "history message 0 has role 'tool'"),
    ("/sinks", ("abc", "", None), r"history must be a list of \{role, content\} messages, got text: 'abc'"),
    ("/sinks", (7, "", None), r"history must be a list of \{role, content\} messages, got a number: 7"),
    ("/lens", (HISTORY, "", None, "false"), "sublayers must be true or false .*got text: 'false'"),
    ("/score", ("plain text", "", "", "false"), "template must be true or false .*got text: 'false'"),
    ("/divergence", ("plain text", "tiny-qwen2", "tiny-qwen2", "", 0), "template must be true or false .*got a number"),
    ("/attribution", (HISTORY, 0, "occlusion", "no", "", None), "per_token must be true or false .*got text: 'no'"),
    ("/score", (12345, "", "", False), "text must be text, got a number: 12345"),
    ("/decisions", ("hi", [], "", None, ["x"]), r"system must be text, got a list: \['x'\]"),
    ("/lens", (HISTORY, "", {"x": 1}, False), "system must be text, got an object"),
    ("/branch", (HISTORY, "0", 5, "", None, None), "at must be a whole number from 0 .*got text: '0'"),
])
def test_every_endpoint_reads_its_arguments_strictly(served, endpoint, args, match):
    _, client = served
    with pytest.raises(Exception, match=match):
        client.predict(*args, api_name=endpoint)


@pytest.mark.parametrize("endpoint,args", [
    ("/attribution", (HISTORY, "7" * 100_000, "occlusion", False, "", None)),
    ("/attribution", (HISTORY, 0, "m" * 100_000, False, "", None)),
    ("/next_token", ("hello", "", None, "chat", "9" * 100_000)),
    ("/next_token", ("hello", "", None, "p" * 100_000, 5)),
    ("/batch", (["x"], "", None, "chat", "t" * 100_000)),
    ("/score", ("plain text", "m" * 100_000, "", False)),
])
def test_a_huge_value_is_never_echoed_whole(served, endpoint, args, caplog):
    import logging

    _, client = served
    caplog.set_level(logging.INFO, logger="qdemo")
    with pytest.raises(Exception) as refused:
        client.predict(*args, api_name=endpoint)
    assert 10 < len(str(refused.value)) < 400 and "Something went wrong" not in str(refused.value)
    assert max(len(r.getMessage()) for r in caplog.records if r.name == "qdemo") < 400


def test_a_damaged_run_and_an_unknown_token_id_are_refused_by_bundle(served):
    _, client = served
    out = client.predict("hello", [], "", {"seed": 5, "max_new_tokens": 4}, None, api_name="/decisions")
    data = json.loads(out["run"])
    with pytest.raises(Exception, match=r"run: the run's model must be a model name \(text\), got 5"):
        client.predict(json.dumps({**data, "model": 5}), api_name="/bundle")
    data["tokens"][0]["token_id"] = 10 ** 9
    with pytest.raises(Exception, match="run: token 0's id is 1000000000, outside the vocabulary of tiny-qwen2"):
        client.predict(json.dumps(data), api_name="/bundle")
    page = client.predict(out["run"], api_name="/bundle")
    start = page.index('"token_id": ', page.index('id="qdemo-run">')) + len('"token_id": ')
    damaged = page[:start] + str((int(page[start]) + 1) % 10) + page[start + 1:]
    with pytest.raises(Exception, match="the bundle's run does not match its digest"):
        client.predict(damaged, api_name="/bundle")


@pytest.mark.parametrize("endpoint,tail", [("/lens", ("", None, False)),
                                           ("/attribution", (0, "gradient×input", False, "", None))])
def test_a_long_message_is_cut_with_a_notice_not_refused(served, endpoint, tail):
    _, client = served
    history = [{"role": "user", "content": "hello " * 40_000}, {"role": "assistant", "content": "seven 七"}]
    out = client.predict(history, *tail, api_name=endpoint)
    assert "history message 0 had 240,000 characters; only the first 16,000 were" in out["notice"]


def test_a_clients_next_turn_reuses_its_own_prefix_and_no_one_elses(served):
    """Issue 20: the same gradio_client Client (one session) sending turn 2 reuses the decode state its turn 1
    left; another Client (another session, the same address) does not, and gets the same answer."""
    from gradio_client import Client

    _, client = served
    greedy = {"do_sample": False, "max_new_tokens": 4}
    first = client.predict("hello 你好", [], "", greedy, None, api_name="/decisions")  # may reuse earlier tests' turns
    history = [{"role": "user", "content": "hello 你好"}, {"role": "assistant", "content": first["text"]}]
    again = client.predict("and then?", history, "", greedy, None, api_name="/decisions")
    prompt = run_from_json(first["run"]).prefill.prompt_ids
    assert again["reused_tokens"] >= len(prompt)  # at least the whole first prompt was not prefilled again
    other = Client(client.src, verbose=False).predict("and then?", history, "", greedy, None, api_name="/decisions")
    assert other["reused_tokens"] == 0 and other["text"] == again["text"]
    # /compare per side: the same client's repeat reuses its prompt
    asked = ("写一首诗", "", "", greedy, {"do_sample": True, "max_new_tokens": 4}, 9)
    first, second = (client.predict(*asked, api_name="/compare") for _ in range(2))
    assert first["a"]["reused_tokens"] < second["a"]["reused_tokens"] == second["a"]["prompt_tokens"] - 1
    assert second["b"]["reused_tokens"] == second["a"]["reused_tokens"]  # one model: one shared prefill
    assert (second["a"]["tokens"], second["b"]["tokens"]) == (first["a"]["tokens"], first["b"]["tokens"])


def _rest(url: str, api: str, data: list, session: str | None = None) -> dict:
    """One REST call (POST /call/NAME, then its event stream) as curl would make it."""
    body = {"data": data} | ({"session_hash": session} if session else {})
    request = urllib.request.Request(f"{url}gradio_api/call/{api}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event}", timeout=60) as r:
        lines = [line.decode().strip() for line in r]
    assert "event: complete" in lines, lines[-4:]
    return json.loads(lines[lines.index("event: complete") + 1][5:])[0]


def test_a_rest_caller_is_its_session_hash_or_else_its_address(served):
    """Gradio names a REST call without a session_hash after its own event, so each would be a new client: such a
    caller is its address instead; one that sends a session_hash is that session."""
    _, client = served
    url = client.src if client.src.endswith("/") else client.src + "/"
    greedy = {"do_sample": False, "max_new_tokens": 3}
    args = ["REST 你好, once more", [], "", greedy, None]
    _rest(url, "decisions", args)
    assert _rest(url, "decisions", args)["reused_tokens"] > 0  # the address's state
    assert _rest(url, "decisions", args, session="rest-session-1")["reused_tokens"] == 0  # a session of its own
    assert _rest(url, "decisions", args, session="rest-session-1")["reused_tokens"] > 0
