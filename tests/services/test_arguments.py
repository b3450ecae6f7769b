"""The one reader of every named endpoint's arguments (qdemo.services.arguments): each wrong value refused naming
its field, never echoed whole; booleans strict; texts cleaned and cut with a notice; one conversation validator."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qdemo.core.runs import RunRecord, run_to_json
from qdemo.sampling import SamplingParams
from qdemo.services.admission import ModelRequest, Refused
from qdemo.services.arguments import Arguments
from qdemo.serving.limits import Limits
from qdemo.views.answer import END_MARK
from qdemo.views.bundle import bundle_html
from tests.conftest import tiny_services

LIMITS = Limits(max_input_chars=50)


def read() -> Arguments:
    return Arguments(LIMITS)


@pytest.mark.parametrize("value", ["false", "no", "true", 0, 1, 0.0, [], {}])
def test_a_boolean_is_a_json_boolean_and_nothing_else(value):
    with pytest.raises(Refused, match="sublayers must be true or false \\(a JSON boolean\\), got "):
        read().flag(value, "sublayers")


def test_booleans_and_the_defaults_of_null():
    args = read()
    assert (args.flag(True, "a"), args.flag(False, "a"), args.flag(None, "a"), args.flag(None, "a", True)) == \
        (True, False, False, True)
    assert (args.text(None, "question"), args.optional_text(None, "system"), args.model(None)) == ("", None, "")
    assert args.whole(None, "top_n", 1, 200, default=20) == 20 and args.settings(None) is None


@pytest.mark.parametrize("value,match", [
    (True, "top_n must be a whole number from 1 to 200, got a boolean: True"),
    (5.0, "top_n must be a whole number from 1 to 200, got a number: 5.0"),
    ("5", "top_n must be a whole number from 1 to 200, got text: '5'"),
    (0, "top_n must be a whole number from 1 to 200, got 0"),
    (201, "top_n must be a whole number from 1 to 200, got 201"),
])
def test_whole_numbers_in_their_range(value, match):
    with pytest.raises(Refused, match=f"^{match}$"):
        read().whole(value, "top_n", 1, 200)


@pytest.mark.parametrize("call", [
    lambda a: a.whole("9" * 100_000, "top_n", 1, 200),
    lambda a: a.whole(10 ** 4000, "top_n", 1, 200),
    lambda a: a.choice("m" * 100_000, "method", ("occlusion",)),
    lambda a: a.text(["x" * 100_000], "text"),
    lambda a: a.history([{"role": "r" * 100_000, "content": "x"}]),
    lambda a: a.history("h" * 100_000),
    lambda a: a.token_id("7" * 100_000, "token"),
    lambda a: a.model(["m" * 100_000]),
    lambda a: a.settings("s" * 100_000),
])
def test_a_huge_wrong_value_is_quoted_short(call):
    with pytest.raises(Refused) as refused:
        call(read())
    assert 10 < len(str(refused.value)) < 200 and "…" in str(refused.value)


def test_texts_are_cleaned_and_cut_with_a_notice_naming_the_field():
    args = read()
    assert args.text("a\x00b\x1b[0m\r\nc", "text") == "ab[0m\nc"
    assert args.text("x" * 70, "question") == "x" * 50
    assert args.cuts == {"question": "Your question had 70 characters; only the first 50 were sent."}
    with pytest.raises(Refused, match="^message is empty$"):
        args.text(" \x00\x01 ", "message", required=True)
    with pytest.raises(Refused, match="^text must be text, got a number: 12345$"):
        args.text(12345, "text")


@pytest.mark.parametrize("history,match", [
    ("abc", r"history must be a list of \{role, content\} messages, got text: 'abc'"),
    (7, r"history must be a list of \{role, content\} messages, got a number: 7"),
    ([{"role": "user", "content": "hi"}, "hello"],
     r"history message 1 must be a \{role, content\} object, got text: 'hello'"),
    ([{"role": "tool", "content": "x"}], "history message 0 has role 'tool'; expected user or assistant$"),
    ([{"role": "system", "content": "x"}], r"history message 0 has role 'system'; .*\(put the system prompt in"),
    ([{"content": "x"}], "history message 0 has role None"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
     "history message 0 content part 0 must be text, got int"),
    ([{"role": "user", "content": 5}], "history message 0 content must be text, got int"),
    ([{"role": "assistant", "content": "x", "metadata": {"title": "thinking"}}],
     r"history message 0 is a titled note \(metadata.title\)"),
])
def test_one_validator_for_every_conversation(history, match):
    with pytest.raises(Refused, match=match):
        read().history(history)


def test_a_conversation_read_back_as_the_model_sees_it():
    args = read()
    history = [{"role": "user", "content": [{"type": "text", "text": "你好"}, " there"]},
               {"role": "assistant", "content": f"hello\n\n{END_MARK}*cut at the time limit*", "metadata": None},
               {"role": "user", "content": "y" * 80}]
    assert args.history(history) == [{"role": "user", "content": "你好 there"},
                                     {"role": "assistant", "content": "hello"},
                                     {"role": "user", "content": "y" * 50}]
    assert args.cuts == {"history message 2": "Your history message 2 had 80 characters; only the first 50 were "
                                              "sent."}
    assert args.history(None) == []
    with pytest.raises(Refused, match="^history must end with the assistant answer to inspect$"):
        args.history(history, answer="to inspect")


def test_token_ids_within_the_vocabulary_where_known():
    args = read()
    assert args.token_id(5, "token", vocab=6) == 5 and args.token("七", "token") == "七"
    with pytest.raises(Refused, match=r"^token \(a token id\) must be a whole number from 0 to 5, got 6$"):
        args.token_id(6, "token", vocab=6)
    with pytest.raises(Refused, match=r"token \(a token id\) must be a whole number from 0 to 2,147,483,647"):
        args.token(2 ** 40, "token")


@pytest.fixture(scope="module")
def services(tiny_dir, tmp_path_factory):
    return tiny_services(tiny_dir, tmp_path_factory.mktemp("arguments"))


@pytest.fixture(scope="module")
def run(services) -> RunRecord:
    with services.admit(None, ModelRequest(None, sampling=False)) as admitted:  # loads the model: its vocabulary known
        backend = admitted.backend
        params = SamplingParams(max_new_tokens=4, seed=3)
        record = RunRecord(run_id=1, model=backend.name, settings=params.to_dict(), label="api")
        record.extend(backend.generate(messages=[{"role": "user", "content": "hi"}], params=params, top_n=3))
    return record


def test_a_run_is_read_whole_and_checked_against_its_model(services, run):
    args = Arguments(Limits(max_input_chars=10))  # a run is never cut to the input limit
    assert args.run(run_to_json(run), services).to_dict() == run.to_dict()
    assert args.run(bundle_html(run, "fingerprint"), services).to_dict() == run.to_dict()
    vocab = services.pool.get(run.model).vocab_size
    data = json.loads(run_to_json(run))
    data["tokens"][1]["token_id"] = vocab
    with pytest.raises(Refused, match=f"^run: token 1's id is {vocab}, outside the vocabulary of tiny-qwen2 "
                                      f"\\(0..{vocab - 1}\\)$"):
        args.run(json.dumps(data), services)
    with pytest.raises(Refused, match=r"^run: the run's model must be a model name \(text\), got 5$"):
        args.run(run_to_json(dataclasses.replace(run, model=5)), services)
    with pytest.raises(Refused, match="^unknown model 'elsewhere'"):
        args.run(run_to_json(dataclasses.replace(run, model="elsewhere")), services)
    with pytest.raises(Refused, match="^run must be a run's JSON text .* got an object"):
        args.run({"model": 5}, services)
