"""Chat-turn logic behind the Chat tab: input handling, the handler's stream, Stop, export/import."""

from __future__ import annotations

import json
import threading

import pytest

from qdemo.registry import load_registry
from qdemo.ui import chatflow
from qdemo.ui.chat_tab import _respond
from qdemo.ui.context import AppContext, StopFlag
from qdemo.ui.controls import defaults_for
from qdemo.pool import ModelPool


@pytest.fixture(scope="module")
def ctx(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    return AppContext(registry=registry, models=ModelPool(registry, "cpu"), default_model=registry.default)


def test_empty_and_long_input():
    assert chatflow.prepare_turn("  \n ", [], None) is None
    assert chatflow.prepare_turn(None, [], None) is None
    turn = chatflow.prepare_turn("字" * 50, [], "sys", max_chars=10)
    assert turn.user_text == "字" * 10 and "50" in turn.notice and "10" in turn.notice
    assert turn.messages[0] == {"role": "system", "content": "sys"}


def test_history_parts_are_flattened():
    history = [{"role": "user", "content": [{"type": "text", "text": "你好"}]},
               {"role": "assistant", "content": "hi"}]
    turn = chatflow.prepare_turn("next", history, "")
    assert turn.messages == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"},
                             {"role": "user", "content": "next"}]


def test_export_import_round_trip():
    messages = [{"role": "user", "content": "写一首诗 🌸"}, {"role": "assistant", "content": "春眠不觉晓"}]
    text = chatflow.export_conversation("tiny-qwen2", "be nice", messages, {"seed": 3})
    assert "写一首诗 🌸" in text  # readable UTF-8, not \u escapes
    data = chatflow.import_conversation(text)
    assert data["messages"] == messages and data["system"] == "be nice" and data["model"] == "tiny-qwen2"


@pytest.mark.parametrize("text,match", [
    ("{not json", "not a JSON file"),
    ("[1, 2]", "not a qdemo conversation"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "role"),
    (json.dumps({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}), "system"),
])
def test_bad_imports_are_explained(text, match):
    with pytest.raises(ValueError, match=match):
        chatflow.import_conversation(text)


def _values(ctx, **changes):
    values = defaults_for(ctx.registry.get(ctx.default_model))
    names = ["mode", "num_beams", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "max_new_tokens", "seed"]
    return [changes.get(n, v) for n, v in zip(names, values)]


def test_respond_streams_and_records_the_run(ctx):
    updates = list(_respond(ctx, "hello 你好", [], ctx.default_model, "", _values(ctx, max_new_tokens=6),
                            StopFlag(), [], None))
    final = updates[-1]
    chat, box, metrics, tokens, _, prompt_view, prompt_ids, _, runs, run, conversation, _ = final
    assert box == "" and chat[-2] == {"role": "user", "content": "hello 你好"}
    assert chat[-1]["content"] == run.done.text and len(runs) == 1 and runs[0] is run
    assert len(tokens) == len(run.tokens) and all(p is None or 0 <= p <= 1 for _, p in tokens)
    assert json.loads(prompt_ids) == list(run.prefill.prompt_ids)
    assert any(label == "special" for _, label in prompt_view)
    assert conversation["messages"] == [{"role": m["role"], "content": m["content"]} for m in chat]
    assert run.done.reason in metrics


def test_respond_ignores_empty_and_explains_bad_settings(ctx):
    (empty,) = list(_respond(ctx, "  ", [], ctx.default_model, "", _values(ctx), StopFlag(), [], None))
    assert "ignored" in empty[-1]
    (bad,) = list(_respond(ctx, "hi", [], ctx.default_model, "", _values(ctx, top_p=0), StopFlag(), [], None))
    assert "top_p" in bad[-1]


def test_stop_flag_ends_the_answer_within_one_step(ctx):
    flag = StopFlag()
    stream = _respond(ctx, "tell me a long story", [], ctx.default_model, "",
                      _values(ctx, max_new_tokens=100, mode="sample"), flag, [], None)
    first = next(stream)
    assert first[0][-1]["role"] == "assistant"
    flag.set()
    rest = list(stream)
    run = rest[-1][9]
    assert run.done.reason == "stopped" and len(run.tokens) <= 2


def test_stop_flags_are_per_session():
    import copy

    a = StopFlag()
    b = copy.deepcopy(a)
    ea, eb = a.arm(), b.arm()
    a.set()
    assert ea.is_set() and not eb.is_set()
    assert isinstance(ea, threading.Event)
