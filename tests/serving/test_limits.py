"""Input hygiene and serving limits: what reaches the model, and readable refusals for the rest."""

from __future__ import annotations

import pytest

from qdemo.sampling import SamplingParams
from qdemo.services import chat
from qdemo.services.admission import Services
from qdemo.serving.limits import Limits, RateLimiter, clean_text


def test_clean_text_keeps_what_people_type():
    family = "👨‍👩‍👧 families keep their zero-width joiners; 中文、English\tand tabs\nstay"
    assert clean_text(family) == family


def test_clean_text_drops_controls_and_mends_invalid_utf8():
    assert clean_text("a\x00b\x07c\x1bd\x7fe\x85f") == "abcdef"
    assert clean_text("line1\r\nline2\rline3") == "line1\nline2\nline3"
    # A lone surrogate is what invalid UTF-8 becomes through a JSON "\ud800" escape; it cannot be encoded.
    cleaned = clean_text("bad \ud800 half \udfff pair")
    assert cleaned == "bad \ufffd half \ufffd pair"
    cleaned.encode("utf-8")


def test_megabyte_paste_is_cut_with_a_notice():
    text = ("粘贴" * 300_000) + "\x00"
    turn = chat.prepare_turn(text, [], None, Limits(max_input_chars=16_000))
    assert len(turn.messages[-1]["content"]) == 16_000 and "600,000" in turn.notice and "16,000" in turn.notice


def test_whitespace_and_control_only_messages_are_empty():
    for text in ("", "   ", "\n\t\n", "\x00\x01\x02", None, 42, ["list"]):
        assert chat.prepare_turn(text, [], None) is None


def test_history_beyond_max_turns_is_left_out_with_a_notice():
    history = []
    for i in range(5):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    turn = chat.prepare_turn("now", history, "sys", Limits(max_turns=2))
    assert [m["content"] for m in turn.messages] == ["sys", "q3", "a3", "q4", "a4", "now"]
    assert "last 2 turns" in turn.notice and "6 older" in turn.notice
    assert chat.prepare_turn("now", history, None, Limits(max_turns=10)).notice == ""


def test_history_is_cleaned_too():
    history = [{"role": "user", "content": "hi\x00\ud800"}, {"role": "assistant", "content": "ok\x1b"}]
    turn = chat.prepare_turn("next", history, "sys\x07")
    assert turn.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi\ufffd"},
                             {"role": "assistant", "content": "ok"}, {"role": "user", "content": "next"}]


def test_max_new_tokens_is_capped_with_a_notice(tiny_registry_path):
    from qdemo.models.registry import load_registry
    from qdemo.serving.pool import ModelPool

    registry = load_registry(tiny_registry_path)
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(max_new_tokens=2048))
    params, note = services.params(registry.default, SamplingParams(max_new_tokens=5000))
    assert params.max_new_tokens == 2048 and "5000" in note and "2048" in note
    params, note = services.params(registry.default, SamplingParams(max_new_tokens=100))
    assert params.max_new_tokens == 100 and note == ""


def test_limits_from_environment_and_flags():
    limits = Limits.from_env({"QDEMO_MAX_TURNS": "7", "QDEMO_CONCURRENCY": " "}, requests_per_minute=5)
    assert (limits.max_turns, limits.requests_per_minute, limits.concurrency) == (7, 5, Limits().concurrency)
    with pytest.raises(ValueError, match="QDEMO_MAX_NEW_TOKENS must be a whole number, got 'lots'"):
        Limits.from_env({"QDEMO_MAX_NEW_TOKENS": "lots"})
    with pytest.raises(ValueError, match=r"concurrency \(QDEMO_CONCURRENCY\) must be a whole number >= 1, got 0"):
        Limits(concurrency=0)


def test_rate_limiter_is_per_session_and_slides():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.check("alice") is None and limiter.check("alice") is None
    refusal = limiter.check("alice")
    assert refusal and "2 per minute" in refusal and "60 s" in refusal
    assert limiter.check("bob") is None  # nobody else is affected
    now[0] = 30.0
    assert "30 s" in limiter.check("alice")
    now[0] = 61.0
    assert limiter.check("alice") is None
    now[0] = 200.0
    limiter.check("carol")
    assert set(limiter._seen) == {("session", "carol")}  # quiet sessions are forgotten


def test_cut_text_says_what_was_cut():
    from qdemo.serving.limits import cut_text

    assert cut_text("短文本", 10) == ("短文本", "")
    text, notice = cut_text("上下文" * 5, 4, "context")
    assert text == "上下文上" and notice == "Your context had 15 characters; only the first 4 were sent."
