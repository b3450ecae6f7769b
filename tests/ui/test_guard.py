"""The one guard every event passes (qdemo.ui.context.guarded): handlers bound with functools.partial keep the
parameters Gradio fills (request, progress, event data), refusals reach the user in the event's own way with one
log line, crashes keep their traceback in the log, and the page-event rate limit runs first."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio.context import LocalContext
from gradio.helpers import special_args

from qdemo.services.admission import Refused
from qdemo.ui.context import CRASHED, ErrorReply, NoticeLine, guarded, stoppable

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


# --- issue 19 item 4: an endpoint stops when its caller leaves (qdemo.ui.context.stoppable) -----------------------

class FakeJob:
    alive = True


def slow_stream(message: str, request: gr.Request = None, stop: threading.Event | None = None):
    """A handler blocked in its 'prefill' (no yield) until its stop event is set; it records what it saw."""
    slow_stream.seen = {"stop": stop, "closed": False}
    try:
        if not stop.wait(30):
            raise AssertionError("never stopped")
        yield "stopped"
    finally:
        slow_stream.seen["closed"] = True


def slow_view(text: str, request: gr.Request = None, stop: threading.Event | None = None) -> dict:
    """A plain handler (no yields at all) that runs until its stop event is set."""
    slow_view.seen = {"stop": stop}
    return {"stopped": stop.wait(30)}


def test_the_stop_keyword_is_hidden_from_gradio_and_filled_per_call():
    wrapped = stoppable(guarded(slow_view, ErrorReply()))
    assert list(inspect.signature(wrapped).parameters) == ["text", "request"]
    assert "stop" not in wrapped.__annotations__ and wrapped.__name__ == "slow_view"
    assert inspect.iscoroutinefunction(stoppable(guarded(slow_view, ErrorReply())))
    assert inspect.isasyncgenfunction(stoppable(guarded(slow_stream, ErrorReply())))


def test_a_caller_whose_stream_closed_stops_a_handler_that_has_not_yielded(monkeypatch):
    """Gradio marks the job dead (Queue.clean_events) and tells the handler nothing: the wrapper sees it and sets
    the handler's stop event; the handler's generator is closed on its own thread."""
    job = FakeJob()
    blocks = SimpleNamespace(_queue=SimpleNamespace(event_ids_to_events={"e1": job}))

    async def call():
        LocalContext.blocks.set(blocks)
        LocalContext.event_id.set("e1")
        items = stoppable(guarded(slow_stream, ErrorReply()))("hi", None)
        waiter = asyncio.ensure_future(anext(items, "ended"))
        await asyncio.sleep(0.2)
        assert not waiter.done() and not slow_stream.seen["stop"].is_set()  # still 'prefilling'
        job.alive = False  # the caller's event stream closed
        return await asyncio.wait_for(waiter, 10)

    assert asyncio.run(call()) == "ended"  # nobody listens: nothing more is yielded
    assert slow_stream.seen["stop"].is_set() and slow_stream.seen["closed"]


def test_a_cancel_sets_the_stop_and_waits_for_the_work_in_flight():
    """gradio_client's cancel cancels the task awaiting the handler: the stop is set at once, and the task ends
    only when the handler has (the concurrency slot is not freed under work that still runs)."""

    async def call():
        task = asyncio.ensure_future(stoppable(guarded(slow_view, ErrorReply()))("hi", None))
        await asyncio.sleep(0.2)
        assert not slow_view.seen["stop"].is_set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return slow_view.seen["stop"].is_set()

    assert asyncio.run(call())


def test_a_refusal_and_a_result_pass_through_the_wrapper():
    async def call(message):
        return await stoppable(guarded(endpoint, ErrorReply()))(message, None, SimpleNamespace())

    assert asyncio.run(call("hi")) == "HI"
    with pytest.raises(gr.Error, match="message is empty"):
        asyncio.run(call(""))


# --- issue 20: a streaming endpoint's next step does not wait for Gradio to send the last item -------------------

def counting_stream(n: int, request: gr.Request = None, stop: threading.Event | None = None):
    """Yields the answer so far, n times: the first, then (once the sender has it) the rest at once, recording how
    far it got and whether it was closed."""
    counting_stream.made = 0
    counting_stream.closed = False
    try:
        for i in range(1, n + 1):
            counting_stream.made = i
            yield "x" * i
            if i == 1 and not counting_stream.first_sent.wait(10):
                raise AssertionError("the first item never reached the sender")
    finally:
        counting_stream.closed = True


def test_a_stream_runs_ahead_of_a_slow_sender_and_its_last_item_always_arrives():
    """Before, the generator made its next item only when Gradio asked for it, after sending the last (a token's
    diff, JSON and event-stream write delayed every step). Now it runs on while the sender is busy; the sender
    then gets the newest item, and always the last."""
    counting_stream.first_sent = threading.Event()

    async def call():
        got, made_while_busy = [], None
        async for item in stoppable(guarded(counting_stream, ErrorReply()))(200, None):
            got.append(item)
            if len(got) == 1:  # a sender busy with the first item, not asking for the next
                counting_stream.first_sent.set()
                for _ in range(500):
                    if counting_stream.made == 200:
                        break
                    await asyncio.sleep(0.01)
                made_while_busy = counting_stream.made
        return got, made_while_busy

    got, made_while_busy = asyncio.run(call())
    assert made_while_busy == 200  # every item was made while the sender was busy with the first
    assert got[0] == "x" and got[-1] == "x" * 200 and len(got) == 2 and counting_stream.closed


def failing_stream(request: gr.Request = None, stop: threading.Event | None = None):
    yield "first"
    yield "second"
    raise Refused("the model went away")


def test_a_failure_after_some_items_reaches_the_caller_after_the_newest_item():
    async def call():
        got = []
        with pytest.raises(gr.Error, match="the model went away"):
            async for item in stoppable(guarded(failing_stream, ErrorReply()))(None):
                got.append(item)
                await asyncio.sleep(0.05)
        return got

    assert asyncio.run(call())[-1] == "second"
