"""The Inspect views' named endpoints through gradio_client against the app on loopback (tiny model): each
answers JSON with a CSV of the same table, agrees with the core it wraps, and refuses bad input by name."""

from __future__ import annotations

import io

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
    registry = load_registry(write_registry(tmp_path_factory.mktemp("api-inspect") / "models.yaml", tiny_dir))
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
