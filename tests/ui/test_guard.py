"""The one guard every event passes (qdemo.ui.context.guarded): handlers bound with functools.partial keep the
parameters Gradio fills (request, progress, event data), refusals reach the user in the event's own way with one
log line, crashes keep their traceback in the log, and the page-event rate limit runs first."""

from __future__ import annotations

import functools
import inspect
import logging
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio.helpers import special_args

from qdemo.services.admission import Refused
from qdemo.ui.context import CRASHED, ErrorReply, NoticeLine, guarded

NOTICE = "notice-component"  # any hashable stands in for the notice component: the guard only keys a dict by it


def handler(parts: str, data: dict, request: gr.Request, evt: gr.EventData,
            progress: gr.Progress = gr.Progress()) -> dict:
    """A page handler: what it was bound to, what it read, and what Gradio filled in."""
    return {"parts": parts, "data": data, "request": request, "evt": evt, "progress": progress}


def plain(parts: str, data: dict) -> dict:
    return {"parts": parts, "data": data}


def stream(data: dict):
    yield {"first": data}
    raise Refused(f"no {data['what']} here")


def failing(data: dict) -> dict:
    raise RuntimeError("simulated bug")


def endpoint(message: str, history: list[dict] | None = None, request: gr.Request = None) -> str:
    """Answer `message`."""
    if not message:
        raise ValueError("message is empty")
    return message.upper()


def test_a_partial_keeps_what_gradio_fills_and_its_name():
    wrapped = guarded(functools.partial(handler, "parts"), NoticeLine(NOTICE))
    assert list(inspect.signature(wrapped).parameters) == ["data", "request", "evt", "progress"]
    assert wrapped.__annotations__ == {"data": dict, "request": gr.Request, "evt": gr.EventData,
                                       "progress": gr.Progress}
    assert wrapped.__name__ == "handler" and wrapped.qdemo_guarded
    inputs, progress_at, event_at, _ = special_args(wrapped, inputs=[{"x": 1}], request="the request",
                                                    event_data=gr.EventData(None, {"index": 3}))
    assert (progress_at, event_at) == (3, 2)
    out = wrapped(*inputs)
    assert (out["parts"], out["data"], out["request"]) == ("parts", {"x": 1}, "the request")
    assert out["evt"]._data == {"index": 3} and isinstance(out["progress"], gr.Progress)


def test_a_handler_without_a_request_gets_one_for_admission_only():
    seen = []

    def admission(request):
        seen.append(request)
        return None

    wrapped = guarded(functools.partial(plain, "parts"), NoticeLine(NOTICE), admission)
    assert list(inspect.signature(wrapped).parameters) == ["data", "request"]
    inputs, *_ = special_args(wrapped, inputs=[{"x": 1}], request="the request")
    assert wrapped(*inputs) == {"parts": "parts", "data": {"x": 1}}  # the handler never sees the request
    assert seen == ["the request"]


def test_a_refused_page_event_is_one_line_in_its_notice(caplog):
    caplog.set_level(logging.INFO, logger="qdemo")
    wrapped = guarded(functools.partial(plain, "parts"), NoticeLine(NOTICE), lambda request: "Too many events")
    assert wrapped({"x": 1}, None) == {NOTICE: "⚠️ Too many events"}
    assert [r.getMessage() for r in caplog.records] == ["refused plain: Too many events"]


def test_a_generator_streams_then_its_refusal_lands_in_the_notice(caplog):
    caplog.set_level(logging.INFO, logger="qdemo")
    wrapped = guarded(stream, NoticeLine(NOTICE))
    assert inspect.isgeneratorfunction(wrapped)
    assert list(wrapped({"what": "model"}, None)) == [{"first": {"what": "model"}}, {NOTICE: "⚠️ no model here"}]
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [("refused stream: no model here", None)]


def test_a_crash_is_logged_with_its_traceback_and_answered_plainly(caplog):
    caplog.set_level(logging.INFO, logger="qdemo")
    assert guarded(failing, NoticeLine(NOTICE))({}, None) == {NOTICE: f"⚠️ {CRASHED}"}
    (record,) = caplog.records
    assert record.getMessage() == "failing failed" and "simulated bug" in str(record.exc_info[1])


def test_a_handler_that_changes_nothing_still_answers_its_notice():
    wrapped = guarded(lambda data: None, NoticeLine(NOTICE))
    assert wrapped({}, None) == {NOTICE: gr.skip()}


def test_an_endpoint_keeps_its_signature_and_refuses_with_a_gr_error(caplog):
    caplog.set_level(logging.INFO, logger="qdemo")
    wrapped = guarded(endpoint, ErrorReply())
    assert inspect.signature(wrapped) == inspect.signature(endpoint)  # gradio_client's parameters
    assert wrapped.__doc__ == "Answer `message`." and wrapped.__name__ == "endpoint"
    assert wrapped("hi", None, SimpleNamespace()) == "HI"
    with pytest.raises(gr.Error) as raised:
        wrapped("", None, None)
    assert raised.value.message == "message is empty" and raised.value.print_exception is False
    assert [r.getMessage() for r in caplog.records] == ["refused endpoint: message is empty"]
    with pytest.raises(gr.Error) as crashed:
        guarded(failing, ErrorReply())({}, None)
    assert crashed.value.message == CRASHED
