"""The Inspect tab in a real browser, and its handlers on their own (issue 19, items 5 and 9).

Browser tests reuse tests.ui.test_browser's app (the tiny random Qwen2 and the scripted cycle model on loopback),
its Chromium and its waiting helpers; they are slow tests, as there. The handler tests call the tab's handlers with
the data Gradio would hand them, over the same tiny model, and are quick.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from qdemo.sampling import SamplingParams
from qdemo.services import chat, perf
from qdemo.services.admission import Refused
from qdemo.ui import inspect_handlers as on_inspect
from qdemo.ui.context import UIContext
from qdemo.ui.inspect_handlers import InspectParts, InspectState
from qdemo.views.bundle import read_bundle
from tests.conftest import tiny_services
from tests.ui.test_browser import (  # noqa: F401 - app and browser are the fixtures these tests run on
    _appears,
    _conversation_saved_since,
    _done,
    _expect,
    _open,
    _open_accordion,
    _reload,
    _saved_conversation,
    _send,
    _shows,
    app,
    browser,
)

SIZES = {"desktop": (1366, 900), "phone": (390, 844)}


def _page(request, width: int, height: int):
    """A fresh page on test_browser's app and Chromium (its module-scoped fixtures, imported above)."""
    return _open(request.getfixturevalue("app"), request.getfixturevalue("browser"), width=width, height=height)


def _inspect_tab(page) -> None:
    tab = page.get_by_role("tab", name="Inspect")
    tab.scroll_into_view_if_needed()  # at phone width the tab bar scrolls sideways
    tab.click()


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
def test_after_a_reload_inspect_and_the_bundle_read_the_restored_conversation(request, size, tmp_path):
    """Item 9: the chat came back after a reload but Inspect said "No answer to inspect yet" and the bundle refused
    the same way. The lens must read the restored answer token for token (one column per token the token view
    showed before the reload), scoring its tokens likewise, and the bundle must hold that answer."""
    page = _page(request, *SIZES[size])
    try:
        before = _saved_conversation(page)
        _send(page, "hello 你好")
        _done(page)
        answer_tokens = page.locator("#token-view .tok").count()
        assert answer_tokens > 0
        _conversation_saved_since(page, before)
        _reload(page)
        _shows(page, "#chatbot", "hello 你好", "the restored conversation in the chat")
        _inspect_tab(page)
        page.locator("#lens-run").click()
        _shows(page, "#lens-status", re.compile(r"rows ×|⚠️"), "the lens's answer in its status line")
        status = page.locator("#lens-status").inner_text()
        assert "rows ×" in status and "No answer" not in status, status
        _appears(page, "#lens-grid td.cell", "the lens grid of the restored answer")
        assert page.locator("#lens-grid thead th").count() == answer_tokens + 1  # a column per answer token
        _open_accordion(page, "scoring", "Score any text")
        page.locator("#score-reuse").click()
        _appears(page, "#score-view .sc", "the restored answer's tokens scored")
        assert page.locator("#score-view .sc").count() == answer_tokens
        _open_accordion(page, "bundle", "Evidence bundle")
        page.locator("#bundle-make").click()
        _shows(page, "#bundle-status", "is ready", "the bundle of the restored answer")
        with page.expect_download() as download:
            page.locator("#bundle-download").click()
        saved = tmp_path / "bundle.html"
        download.value.save_as(saved)
        with page.expect_file_chooser() as chooser:
            page.locator("#bundle-open").click()
        chooser.value.set_files(str(saved))
        _appears(page, "#bundle-view .tok", "the restored answer's bundle opened")
        assert page.locator("#bundle-view .tok").count() == answer_tokens
        page.screenshot(path=str(page.shots / f"inspect-after-reload-{size}.png"), full_page=True)
    finally:
        page.context.close()


@pytest.mark.slow
def test_the_inspect_tab_has_a_stop_that_answers(request):
    """Item 5: Stop in the Inspect tab with nothing running says so, and a view after it runs to its end (a Stop
    pressed while idle never leaks into the next view)."""
    page = _page(request, *SIZES["desktop"])
    try:
        _send(page, "hello")
        _done(page)
        _inspect_tab(page)
        page.locator("#inspect-stop").click()
        _shows(page, "#inspect-stop-status", "Nothing is running")
        page.locator("#lens-run").click()
        _appears(page, "#lens-grid td.cell", "the lens grid after an idle Stop")
        _expect(page.locator("#lens-status"), "no cut in the lens's status").not_to_contain_text(
            re.compile("stopped|time limit"))
    finally:
        page.context.close()


# --- the handlers on their own --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ui(tiny_dir, tmp_path_factory):
    return UIContext(tiny_services(tiny_dir, tmp_path_factory.mktemp("inspect-ui")))


@pytest.fixture(scope="module")
def answered(ui):
    """A finished chat answer: its session, the chat as the chatbot shows it, and the session's runs."""
    services = ui.services
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hello 你好, name a prime", [], services.limits)
    final = list(chat.answer(services, session, "c", begun.chat, services.default_model, "",
                             SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, seed=3), 1))[-1]
    assert final.done and final.view is not None
    return session, final.chat, [final.view.run]


def _parts() -> SimpleNamespace:
    """The tab's parts with each component standing for itself by name: data is keyed by them."""
    return SimpleNamespace(**{name: name for name in InspectParts.__dataclass_fields__})


def _data(p, session, chatbot, runs, **more) -> dict:
    data = {p.state: InspectState(), p.chat_state: session, p.chatbot: chatbot, p.chat_model: "tiny-qwen2",
            p.chat_system: "", p.runs: runs, p.sublayers: False}
    return {**data, **{getattr(p, k): v for k, v in more.items()}}


def test_a_reloaded_page_inspects_the_saved_answer_token_for_token(ui, answered):
    """Item 9 on the handlers: a reloaded page has the chat's messages and the browser's compact runs but no
    answer view; the lens reads the saved run's own prompt and answer ids."""
    session, chatbot, runs = answered
    p = _parts()
    live = on_inspect.run_lens(p, ui, _data(p, session, chatbot, runs), None)
    reloaded = chat.ChatSession()  # what a reload leaves: no view
    restored = perf.restored(perf.saved(runs))  # the browser's copy, stages stripped
    data = _data(p, reloaded, chatbot, restored)
    after = on_inspect.run_lens(p, ui, data, None)
    answer = [t.token_id for t in runs[0].tokens]
    assert list(data[p.state].lens.grid.targets) == answer
    assert after[p.lens_grid] == live[p.lens_grid]
    bundle = on_inspect.make_bundle(p, ui, data, None)
    assert "is ready" in bundle[p.bundle_md] and "kept across the reload" in bundle[p.bundle_md]
    kept = read_bundle(Path(bundle[p.bundle_file].value["path"]).read_text(encoding="utf-8"))
    assert [t.token_id for t in kept.tokens] == answer and kept.prefill.prompt_ids == runs[0].prefill.prompt_ids
    with pytest.raises(Refused, match="No answer to inspect yet"):
        on_inspect.run_lens(p, ui, _data(p, reloaded, [], restored), None)


def test_a_reloaded_page_without_its_run_inspects_the_answer_text(ui, answered):
    """No saved run (an imported conversation, say): the views read the chat's text, tokenized by the model."""
    session, chatbot, _ = answered
    p = _parts()
    data = _data(p, chat.ChatSession(), chatbot, [])
    out = on_inspect.run_lens(p, ui, data, None)
    assert data[p.state].lens.grid.positions and "No answer" not in out[p.lens_md]
    with pytest.raises(Refused, match="no run kept in this browser"):
        on_inspect.make_bundle(p, ui, data, None)


def test_stop_ends_the_running_view_and_an_idle_stop_does_not_leak(ui, answered):
    session, chatbot, runs = answered
    p = _parts()
    data = _data(p, session, chatbot, runs)
    assert "Nothing is running" in on_inspect.stop(p, data)[p.stop_md]
    on_inspect.arm(p, data)
    out = on_inspect.run_lens(p, ui, data, None)  # the idle Stop before it changed nothing
    assert data[p.state].lens.grid.cut is None and "stopped" not in out[p.lens_md]
    on_inspect.arm(p, data)
    armed = data[p.state].stop
    assert "Stopping" in on_inspect.stop(p, data)[p.stop_md] and armed.is_set()
    with pytest.raises(Refused, match="stopped by you"):
        on_inspect.run_lens(p, ui, data, None)
    other = _data(p, session, chatbot, runs)
    on_inspect.arm(p, other)
    assert not other[p.state].stop.is_set()  # another session's state has its own event
    assert isinstance(armed, threading.Event)
