"""The Inspect services on a real chat answer of the tiny model: each view reads the chat's prompt and answer
through admission and the pooled model's gate, and agrees with the core it wraps on the same ids."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time

import pytest
import torch

from qdemo.sampling import SamplingParams
from qdemo.services import chat, internals
from qdemo.services import probing as inspect
from qdemo.services.admission import Refused
from qdemo.serving.limits import Client
from qdemo.views.bundle import bundle_html, read_bundle
from tests.conftest import tiny_services


@pytest.fixture(scope="module")
def services(tiny_dir, tmp_path_factory):
    return tiny_services(tiny_dir, tmp_path_factory.mktemp("inspect"))


@pytest.fixture(scope="module")
def session(services):
    s = chat.ChatSession()
    begun = chat.begin_turn(s, "hello 你好, name a prime", [], services.limits)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.8, seed=3)
    final = list(chat.answer(services, s, "c", begun.chat, services.default_model, "", params, 1))[-1]
    assert final.done and s.view is final.view and len(final.view.run.tokens) > 0
    return s


def gate_steps(services) -> int:
    return services.pool.gate(services.default_model).steps


def test_lens_reads_the_answer_through_the_gate(services, session):
    subject = inspect.chat_subject(session.view)
    before = gate_steps(services)
    result = inspect.lens_view(services, "c", subject)
    assert gate_steps(services) > before
    answer = [t.token_id for t in session.view.run.tokens]
    assert list(result.grid.targets) == answer  # one column per answer token, predicting it
    lm = services.pool.get(services.default_model)
    with torch.inference_mode(), services.pool.gate(services.default_model).step():
        logits = lm.model(input_ids=torch.tensor([list(subject.ids)])).logits[0]
    raw = [t.stages[0] for t in session.view.run.tokens]  # the engine's own raw distribution at each token
    for c, p in enumerate(result.grid.positions):
        assert int(result.grid.top1[-1, c]) == int(logits[p].argmax()) == raw[c].token_ids[0]
        assert result.grid.target_probs[-1, c] == pytest.approx(raw[c].chosen_prob, abs=1e-4)


def test_attribution_per_turn_and_per_token(services, session):
    subject = inspect.chat_subject(session.view)
    grad = inspect.attribution_view(services, "c", subject, 3, "gradient×input")
    labels = [u.label for u, _ in grad.per_turn]
    assert "user 1" in labels and "template" in labels and "answer so far" in labels
    assert sum(s for _, s in grad.per_turn) == pytest.approx(sum(grad.attribution.scores), rel=1e-5)
    occl = inspect.attribution_view(services, "c", subject, 3, "occlusion")
    assert [u.label for u, _ in occl.per_turn] == labels
    assert all(s is None or math.isfinite(s) for _, s in occl.per_turn)
    per_token = inspect.attribution_view(services, "c", subject, 1, "occlusion", per_token=True)
    assert len(per_token.attribution.units) == len(per_token.attribution.context)
    with pytest.raises(Refused, match="answer position in 0..9"):
        inspect.attribution_view(services, "c", subject, 10, "occlusion")
    with pytest.raises(Refused, match="method must be one of"):
        inspect.attribution_view(services, "c", subject, 0, "saliency")


def test_scoring_the_answer_in_the_template_equals_the_engine(services, session):
    view = session.view
    result = inspect.score_view(services, "c", services.default_model, "", subject=inspect.chat_subject(view))
    score = result.score
    # the same tokens the engine chose, with the raw probability the engine recorded for each
    assert list(score.token_ids) == [t.token_id for t in view.run.tokens]
    for p, t in zip(score.probs, view.run.tokens):
        assert p == pytest.approx(t.stages[0].chosen_prob, abs=1e-4)
    pasted = inspect.score_view(services, "c", services.default_model, "七 is seven", "name a prime", True)
    with services.admit("c", inspect.ModelRequest(services.default_model, sampling=False)) as admitted:
        prompt = admitted.backend.chat_prompt([{"role": "user", "content": "name a prime"}], 1).ids
        tail = admitted.backend.raw_text_ids("七 is seven")
    assert list(pasted.score.ids) == list(prompt) + tail and pasted.score.first == len(prompt)
    raw = inspect.score_view(services, "c", services.default_model, "plain text 纯文本")
    assert raw.score.first == 1 and raw.score.count == len(raw.score.ids) - 1
    with pytest.raises(Refused, match="empty"):
        inspect.score_view(services, "c", services.default_model, "   ")


def test_divergence_of_a_model_with_itself_is_zero(services):
    result = inspect.divergence_view(services, "c", services.default_model, services.default_model,
                                     "the same text twice 同一段")
    d = result.divergence
    assert d.mean_kl_ab == pytest.approx(0.0, abs=1e-6) and d.agreement == 1.0


def test_long_inputs_are_cut_with_a_notice(services):
    text = "word " * 1500
    result = inspect.score_view(services, "c", services.default_model, text)
    assert len(result.score.ids) == inspect.MAX_TOKENS and "were left out" in result.notice


def test_bundle_round_trip_with_a_fingerprint(services, session):
    fingerprint = inspect.weights_fingerprint(services, services.default_model)
    assert fingerprint.startswith("local checkpoint ") and "/" not in fingerprint
    page = bundle_html(session.view.run, fingerprint, session.view.labels)
    assert read_bundle(page).to_dict() == session.view.run.to_dict()
    assert "Which stage decided" in inspect.run_summary(session.view.run)


def test_no_answer_is_a_clear_refusal():
    with pytest.raises(Refused, match="send a message in Chat first"):
        inspect.chat_subject(None)


def test_attribution_csv_names_each_position_s_own_token(services, session):
    subject = inspect.chat_subject(session.view)
    result = inspect.attribution_view(services, "c", subject, 2, "gradient×input")
    frame = result.attribution.to_frame(dict(enumerate(result.pieces)))
    assert list(frame["token"]) == list(result.pieces) and list(frame["id"]) == list(result.attribution.context)


def test_a_user_message_that_is_also_in_the_system_prompt_is_found_in_its_turn(services):
    """The chat sends no system message when the box is empty, but the prompt carries the model's default
    ("You are a tiny test model."): the user's "You" must be found in the user turn, not inside it."""
    s = chat.ChatSession()
    begun = chat.begin_turn(s, "You", [], services.limits)
    list(chat.answer(services, s, "c", begun.chat, services.default_model, "", SamplingParams(max_new_tokens=4), 1))
    assert all(m["role"] != "system" for m in s.view.messages)
    result = inspect.attribution_view(services, "c", inspect.chat_subject(s.view), 1, "gradient×input")
    units = {u.label: u for u, _ in result.per_turn}
    system_text = "".join(result.pieces[i] for i in units["system"].indices)
    user_text = "".join(result.pieces[i] for i in units["user 1"].indices)
    assert "tiny test model" in system_text and user_text.strip() == "You"
    assert min(units["user 1"].indices) > max(units["system"].indices)


def test_the_lens_keeps_the_start_of_the_prompt_when_it_cuts(services, session, monkeypatch):
    """Only the columns' context is read: with a token limit just under the whole chat, nothing needs cutting,
    and the lens's last row is still the engine's own distribution."""
    subject = inspect.chat_subject(session.view)
    monkeypatch.setattr(inspect, "MAX_LENS_COLUMNS", 4)
    monkeypatch.setattr(inspect, "MAX_TOKENS", len(subject.ids) - 3)
    result = inspect.lens_view(services, "c", subject)
    assert "left out" not in result.notice and "first 4 of 10 answer tokens" in result.notice
    raw = [t.stages[0].token_ids[0] for t in session.view.run.tokens[:4]]
    assert result.grid.top1[-1].tolist() == raw


# --- issue 19, item 5: every view runs under the chat's time limit and Stop, and says so when cut -----------------

class StopAfter(threading.Event):
    """A stop event that reads as set once the model's gate has run `steps` more forwards (the user pressing Stop
    while the view runs, at a known point)."""

    def __init__(self, gate, steps: int) -> None:
        super().__init__()
        self.gate, self.at = gate, gate.steps + steps

    def is_set(self) -> bool:
        return super().is_set() or self.gate.steps >= self.at


def _pressed() -> threading.Event:
    stop = threading.Event()
    stop.set()
    return stop


def test_every_view_with_stop_pressed_runs_no_forward_and_says_stopped(services, session):
    subject = inspect.chat_subject(session.view)
    name = services.default_model
    views = {
        "lens": lambda stop: inspect.lens_view(services, "c", subject, stop=stop),
        "gradient": lambda stop: inspect.attribution_view(services, "c", subject, 2, "gradient×input", stop=stop),
        "occlusion": lambda stop: inspect.attribution_view(services, "c", subject, 2, "occlusion", stop=stop),
        "score": lambda stop: inspect.score_view(services, "c", name, "plain text 纯文本", stop=stop),
        "divergence": lambda stop: inspect.divergence_view(services, "c", name, name, "some text", stop=stop),
        "attention": lambda stop: internals.compute_attention(services, internals.InternalsSession(), "c", name,
                                                              [], None, stop=stop),
        "sinks": lambda stop: internals.conversation_sinks(services, "c", name, [], None, stop=stop),
    }
    for what, run in views.items():
        before = gate_steps(services)
        with pytest.raises(Refused, match="stopped by you") as caught:
            run(_pressed())
        assert gate_steps(services) == before, what
        assert "time limit" not in str(caught.value), what


def test_per_token_occlusion_stopped_half_way_keeps_the_units_it_scored(services, session):
    subject = inspect.chat_subject(session.view)
    full = inspect.attribution_view(services, "c", subject, 4, "occlusion", per_token=True)
    stop = StopAfter(services.pool.gate(services.default_model), 4)  # the whole context, then three units
    cut = inspect.attribution_view(services, "c", subject, 4, "occlusion", per_token=True, stop=stop)
    units = len(full.attribution.units)
    assert f"stopped by you after 3 of {units} units" in cut.notice
    scored = [i for i, s in enumerate(cut.attribution.scores) if s is not None]
    assert len(scored) == 3 and all(full.attribution.scores[i] == pytest.approx(cut.attribution.scores[i])
                                    for i in scored)
    assert cut.attribution.cut.done == 3 and full.attribution.cut is None and "stopped" not in full.notice


def test_the_time_limit_cuts_a_view_and_says_so(tiny_dir, tmp_path, monkeypatch):
    """A 1-second limit and forwards slowed to 0.3 s each: per-token occlusion over the context (dozens of
    forwards) ends after a few, with the limit named; gradient × input, one forward, ends inside it."""
    services = tiny_services(tiny_dir, tmp_path)
    services.limits = dataclasses.replace(services.limits, max_generation_seconds=1)
    gate = services.pool.gate(services.default_model)
    step = gate.step

    @contextlib.contextmanager
    def slow():
        with step():
            time.sleep(0.3)
            yield

    s = chat.ChatSession()
    begun = chat.begin_turn(s, "hello 你好, name a prime and say why", [], services.limits)
    list(chat.answer(services, s, "c", begun.chat, services.default_model, "",
                     SamplingParams(max_new_tokens=12, do_sample=False), 1))
    subject = inspect.chat_subject(s.view)
    monkeypatch.setattr(gate, "step", slow)
    before = gate.steps
    cut = inspect.attribution_view(services, "c", subject, 8, "occlusion", per_token=True)
    units = len(cut.attribution.units)
    assert units > 20 and gate.steps - before < units / 2  # not one forward per unit: it stopped early
    assert "cut at this server's time limit (1 s) after" in cut.notice and f"of {units} units" in cut.notice
    assert cut.attribution.cut.reason == "time_limit"

    @contextlib.contextmanager
    def slower():
        with step():
            time.sleep(1.2)
            yield

    monkeypatch.setattr(gate, "step", slower)
    before = gate.steps
    with pytest.raises(Refused, match=r"time limit \(1 s\) after 0 of 2 layers"):  # one forward: all or nothing
        inspect.attribution_view(services, "c", subject, 8, "gradient×input")
    assert gate.steps - before == 1


# --- issue 19, item 13: a character split across tokens shows once, at the token that completes it -------------

def test_the_score_view_joins_a_split_character_into_the_token_that_completes_it(services):
    text = "x 龍龍 y"  # 龍 is in no merge of the tiny tokenizer: three byte tokens each
    result = inspect.score_view(services, "c", services.default_model, text)
    with services.admit("c", inspect.ModelRequest(services.default_model, sampling=False)) as admitted:
        singles = [admitted.backend.token_texts([t])[t] for t in result.score.token_ids]
    assert sum("\ufffd" in s for s in singles) >= 4  # decoded one by one, the split bytes read as "�"
    assert len(result.pieces) == result.score.count and not any("\ufffd" in p for p in result.pieces)
    assert "".join(result.pieces).endswith("龍龍 y") and result.pieces.count("龍") == 2
    d = inspect.divergence_view(services, "c", services.default_model, services.default_model, text)
    assert d.pieces == result.pieces


def test_a_clients_lens_and_score_feed_only_what_its_kept_state_lacks(services):
    """Issue 20: after an API client's /chat turn, its lens and score of that answer feed only the answer (its
    kept state holds the prompt); another client feeds everything. The grids and scores are the same."""
    greedy = {"do_sample": False, "max_new_tokens": 8}
    alice, bob = Client(session="alice", address="10.0.0.1"), Client(session="bob", address="10.0.0.2")
    run = chat.api_answer(services, alice, "写一首关于秋天的诗, short", [], "", greedy, None)
    history = [{"role": "user", "content": "写一首关于秋天的诗, short"},
               {"role": "assistant", "content": run.done.text}]
    subject = inspect.history_subject(services.default_model, history)
    prompt = len(run.prefill.prompt_ids)
    lm = services.pool.get(services.default_model)
    fed: list[int] = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, out: fed.append(a[0].shape[1]))
    try:
        results = {}
        for who in (alice, bob):
            fed.clear()
            lens = inspect.lens_view(services, who, subject)
            lens_fed = sum(fed)
            fed.clear()
            score = inspect.score_view(services, who, "", "", subject=subject)
            results[who.session] = (lens, lens_fed, score, sum(fed))
    finally:
        handle.remove()
    ids = len(score.score.ids)
    a_lens, a_lens_fed, a_score, a_score_fed = results["alice"]
    b_lens, b_lens_fed, b_score, b_score_fed = results["bob"]
    first_column = a_lens.grid.positions[0]
    assert first_column == prompt - 1  # the column that predicts the answer's first token
    assert a_lens_fed == a_lens.grid.positions[-1] + 1 - first_column  # the prompt came from the kept state
    assert b_lens_fed == b_lens.grid.positions[-1] + 1  # another client's: the whole sequence
    # bob's score reuses what his lens left; carol, who asks for the score alone, feeds it all but the last token
    assert a_score_fed == b_score_fed == ids - 1 - (prompt - 1)
    fed.clear()
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, out: fed.append(a[0].shape[1]))
    try:
        c_score = inspect.score_view(services, Client(session="carol", address="10.0.0.3"), "", "", subject=subject)
    finally:
        handle.remove()
    assert sum(fed) == ids - 1 and c_score.score.logprobs == pytest.approx(a_score.score.logprobs, abs=1e-5)
    # A state the views grew (under inference mode) serves the client's next turn: a conversation longer than the
    # state's first buffer, inspected by a client with no state yet.
    long = [{"role": "user", "content": "数一数: " + " ".join(str(i) for i in range(150))},
            {"role": "assistant", "content": "一 二 三 " * 30}]
    erin = Client(session="erin", address="10.0.0.4")
    inspect.lens_view(services, erin, inspect.history_subject(services.default_model, long))
    again = chat.api_answer(services, erin, "再写一首", long, "", greedy, None)
    assert again.done.error is None and again.prefill.reused_tokens > 256
    assert a_lens.grid.positions == b_lens.grid.positions and (a_lens.grid.top1 == b_lens.grid.top1).all()
    assert a_lens.grid.target_probs == pytest.approx(b_lens.grid.target_probs, abs=1e-5)
    assert a_score.score.logprobs == pytest.approx(b_score.score.logprobs, abs=1e-5)
