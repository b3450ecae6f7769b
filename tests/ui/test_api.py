"""The app's named endpoints through gradio_client, against the app launched on loopback with the tiny model."""

from __future__ import annotations

import pytest
import torch
from gradio_client import Client

from qdemo.core.engine import collect, generate
from qdemo.forwards.gate import StepGate
from qdemo.models.registry import load_registry
from qdemo.probes.introspect import next_token_logits
from qdemo.probes.stages import stage_distributions
from qdemo.sampling import SamplingParams
from qdemo.services.chat import message_text
from qdemo.services.lab import context_ids
from qdemo.serving.limits import Limits
from qdemo.serving.local import LocalBackend
from qdemo.ui.app import build_app, launch_settings, queue_settings
from qdemo.views.answer import END_MARK
from tests.conftest import serve, write_registry

pytestmark = pytest.mark.slow  # launches the app on loopback


@pytest.fixture(scope="module")
def served(tiny_dir, cycle_dir, tmp_path_factory):
    registry = load_registry(write_registry(tmp_path_factory.mktemp("api") / "models.yaml", tiny_dir,
                                            cycle_dir=cycle_dir))
    yield from serve(registry)


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
def test_bad_chat_requests_are_explained(served, args, match, tiny_lm):
    registry, client = served
    with pytest.raises(Exception, match=match):
        client.predict(*args, api_name="/chat")
    settings = {"do_sample": False, "max_new_tokens": 2}
    params = registry.get(registry.default).sampling.replace(**settings)
    expected = collect(generate(tiny_lm, messages=[{"role": "user", "content": "still serving?"}], params=params,
                                top_n=0))["done"].text
    assert client.predict("still serving?", [], "", settings, None, api_name="/chat") == expected  # still serving


def test_compare_reports_divergence_and_each_sides_probability_of_the_other(served, tiny_lm, cycle_dir):
    """A: the scripted cycle model (it writes "The quick brown fox"); B: the tiny random model. Same tokenizer,
    different answers from the first token, so the cross-probabilities are always there to check."""
    from qdemo.models.loader import load_model

    registry, client = served
    result = client.predict("Write a haiku.", "cycle", "tiny-qwen2", {"max_new_tokens": 6},
                            {"do_sample": False, "max_new_tokens": 6}, 5, api_name="/compare")
    a, b, d = result["a"], result["b"], result["divergence"]
    assert a["reason"] == "max_tokens" and a["error"] is None and b["error"] is None
    assert d["level"] == "token" and d["step"] == 0
    assert (d["a_token"], d["b_token"]) == (a["tokens"][0], b["tokens"][0]) and d["a_token"] != d["b_token"]
    cycle_lm = load_model(registry.get("cycle"), device="cpu")
    prompt = collect(generate(cycle_lm, messages=[{"role": "user", "content": "Write a haiku."}],
                              params=SamplingParams(max_new_tokens=1)))["prefill"].prompt_ids
    assert prompt == collect(generate(tiny_lm, messages=[{"role": "user", "content": "Write a haiku."}],
                                      params=SamplingParams(max_new_tokens=1)))["prefill"].prompt_ids
    a_probs = torch.softmax(next_token_logits(cycle_lm, list(prompt)), -1)
    b_probs = torch.softmax(next_token_logits(tiny_lm, list(prompt)), -1)
    assert d["a_prob_of_b"] == pytest.approx(float(a_probs[d["b_token"]]), abs=1e-6)
    assert d["b_prob_of_a"] == pytest.approx(float(b_probs[d["a_token"]]), rel=1e-5)
    assert d["b_prob_of_a"] > 0


def test_next_token_endpoint_equals_the_lab(served, tiny_lm):
    registry, client = served
    settings = {"do_sample": True, "temperature": 0.5, "top_k": 5, "top_p": 0.9}
    result = client.predict("数一数: one two", "", settings, "raw text", 5, api_name="/next_token")
    ids = context_ids(LocalBackend(tiny_lm, StepGate()), "数一数: one two", "raw text")
    params = registry.get(registry.default).sampling.replace(**settings)
    stages = stage_distributions(next_token_logits(tiny_lm, ids), ids, params, top_n=5)
    assert [s["stage"] for s in result["stages"]] == [s.name for s in stages]
    for got, want in zip(result["stages"], stages):
        assert [t["id"] for t in got["tokens"]] == list(want.token_ids)
        assert [t["p"] for t in got["tokens"]] == pytest.approx(list(want.probs), abs=1e-6)
    assert result["context_tokens"] == len(ids)
    # the same client again: its kept state holds the context, so only the last token is fed; the same numbers
    again = client.predict("数一数: one two", "", settings, "raw text", 5, api_name="/next_token")
    assert again["reused_tokens"] == len(ids) - 1 and again["stages"][0]["tokens"][0]["id"] == stages[0].token_ids[0]
    for got, want in zip(again["stages"], stages):
        assert [t["p"] for t in got["tokens"]] == pytest.approx(list(want.probs), abs=1e-6)
    with pytest.raises(Exception, match="context is empty"):
        client.predict("   ", "", None, "chat", 5, api_name="/next_token")


def test_sweep_endpoint_answers_each_cell_with_the_solo_runs_of_its_seeds(served, tiny_lm):
    registry, client = served
    result = client.predict("数一数: one two", {"top_p": [0.8, 1.0]}, "", {"max_new_tokens": 3}, "raw text", 2, 40,
                            api_name="/sweep")
    assert result["rows_done"] == result["rows_total"] == 4
    ids = context_ids(LocalBackend(tiny_lm, StepGate()), "数一数: one two", "raw text")
    base = registry.get(registry.default).sampling.replace(max_new_tokens=3)
    for cell in result["cells"]:
        assert cell["seeds"] == sorted(cell["seeds"]) and cell["measures"]["samples"] == 2
        for seed, text in zip(cell["seeds"], cell["texts"]):
            params = base.replace(do_sample=True, seed=seed, **cell["settings"])
            assert text == collect(generate(tiny_lm, input_ids=ids, params=params, top_n=0))["done"].text
    with pytest.raises(Exception, match="not a sweepable field"):
        client.predict("hi", {"num_beams": [1, 2]}, "", None, "chat", 2, 0, api_name="/sweep")
    with pytest.raises(Exception, match="samples must be a whole number"):
        client.predict("hi", {"top_k": [5]}, "", None, "chat", "2", 0, api_name="/sweep")


def test_batch_generates_each_prompt_as_alone_and_scores_teacher_forced(served, tiny_lm):
    registry, client = served
    prompts = ["hi", "写一首关于大海的诗", "the quick brown fox jumps over the lazy dog"]
    settings = {"do_sample": False, "max_new_tokens": 6}
    results = client.predict(prompts, "", settings, "chat", "generate", api_name="/batch")
    params = registry.get(registry.default).sampling.replace(**settings)
    for text, result in zip(prompts, results):
        solo = collect(generate(tiny_lm, messages=[{"role": "user", "content": text}], params=params, top_n=0))
        assert result["tokens"] == list(solo["done"].token_ids) and result["text"] == solo["done"].text
    scored = client.predict(["one two three", "你好世界"], "", None, "raw text", "score", api_name="/batch")
    for text, result in zip(["one two three", "你好世界"], scored):
        ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert [t["logprob"] for t in result["tokens"]] == pytest.approx(expected.tolist(), abs=1e-4)
        assert result["perplexity"] == pytest.approx(float(torch.exp(-expected.mean())), rel=1e-4)
    with pytest.raises(Exception, match="at most 8 prompts"):
        client.predict(["x"] * 9, "", None, "chat", "generate", api_name="/batch")
    with pytest.raises(Exception, match="task must be one of generate, score"):
        client.predict(["x"], "", None, "chat", "summarise", api_name="/batch")


# --- issue 19 item 15: an answer cut at the time limit says so in the API's answer too ---------------------------

@pytest.fixture(scope="module")
def one_second(tiny_dir, cycle_dir, tmp_path_factory):
    """The app with a time limit of one second per answer, serving the scripted model, whose answer never ends."""
    registry = load_registry(write_registry(tmp_path_factory.mktemp("api-limit") / "models.yaml", tiny_dir,
                                            max_context=8192, cycle_dir=cycle_dir))
    limits = Limits(max_generation_seconds=1, max_new_tokens=100_000)
    demo = build_app(registry, limits=limits)
    demo.queue(**queue_settings(limits)).launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                                quiet=True, **launch_settings(limits))
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_an_answer_cut_at_the_time_limit_says_so_as_the_page_does(one_second):
    final = one_second.predict("go on", [], "cycle", {"max_new_tokens": 4000}, None, api_name="/chat")
    answer, _, note = final.partition(END_MARK)
    assert answer.startswith("The quick brown fox") and "time limit" in note
    # Sent back as history, the note (after a blank line) stays out of what the model reads.
    assert message_text({"role": "assistant", "content": final}) == answer.removesuffix("\n\n")
    decided = one_second.predict("go on", [], "cycle", {"max_new_tokens": 4000}, None, api_name="/decisions")
    assert decided["reason"] == "time_limit"
