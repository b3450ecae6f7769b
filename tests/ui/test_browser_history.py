"""Issue 21: the run store in the page. A chat answer is kept as this browser's; the Performance tab's stored
history lists it (filtered by model and forward); its `?run=ID` link opens it read-only in Chat, and Inspect reads
it token for token. Slow tests on test_browser's app (which serves a run store) and Chromium."""

from __future__ import annotations

import re

import pytest

from tests.ui.test_browser import (  # noqa: F401 - app and browser are the fixtures these tests run on
    _done,
    _expect,
    _loaded,
    _open,
    _pick,
    _send,
    _shows,
    app,
    browser,
)

SIZES = {"desktop": (1366, 900), "phone": (390, 844)}


def _tab(page, name: str) -> None:
    tab = page.get_by_role("tab", name=name)
    tab.scroll_into_view_if_needed()  # at phone width the tab bar scrolls sideways
    tab.click()


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
def test_a_stored_run_is_listed_and_its_link_opens_it_read_only(request, size):
    demo, shots = request.getfixturevalue("app")
    page = _open((demo, shots), request.getfixturevalue("browser"), *SIZES[size])
    try:
        _pick(page, "chat-model", "Tiny random Qwen2")
        _send(page, f"kept run {size} 你好")
        _done(page)
        shown = page.locator("#chatbot .message-row").all_inner_texts()  # the answer (and a note, if it was cut)
        _tab(page, "Performance")
        _shows(page, "#history-line", re.compile(r"\d+ stored run"))
        rows = page.locator("#history-table tbody tr")
        _expect(rows.first, "the newest stored run").to_contain_text("tiny-qwen2")
        link = rows.first.locator("a").first
        href = link.get_attribute("href")
        run_id = re.search(r"run=(\d+)", href).group(1)
        box = page.locator("#history-model input")
        box.scroll_into_view_if_needed()  # the list opens below it: at the page's foot it must have room
        box.click()
        box.fill("cycle")  # filtered to "cycle" and "slow-cycle": a short list that stays in view
        page.get_by_role("option", name="cycle", exact=True).click()
        _shows(page, "#history-line", "stored run(s) of cycle")
        assert "tiny-qwen2" not in page.locator("#history-table").inner_text()  # filtered out
        page.screenshot(path=str(shots / f"history-{size}.png"), full_page=True)
        page.goto(f"{demo.local_url}?run={run_id}")
        _loaded(page)
        _shows(page, "#chat-notice", f"Stored run #{run_id}")
        _shows(page, "#chatbot", f"kept run {size} 你好")
        stored = page.locator("#chatbot .message-row").last.inner_text()
        assert any(row.startswith(stored) for row in shown[1:]), (stored, shown)  # the answer, without a cut's note
        _expect(page.locator("#chat-input textarea"), "the read-only message box").to_be_disabled()
        for button in ("#send", "#regenerate", "#undo"):  # nothing that would answer again or change the stored chat
            _expect(page.locator(button), f"{button} off on a stored run").to_be_disabled()
        page.screenshot(path=str(shots / f"stored-run-{size}.png"), full_page=True)
    finally:
        page.context.close()


@pytest.mark.slow
def test_another_browsers_link_opens_nothing(request):
    demo, shots = request.getfixturevalue("app")
    page = _open((demo, shots), request.getfixturevalue("browser"))
    try:
        _pick(page, "chat-model", "Tiny random Qwen2")
        _send(page, "mine alone")
        _done(page)
        _tab(page, "Performance")
        _shows(page, "#history-line", re.compile(r"\d+ stored run"))
        run_id = re.search(r"run=(\d+)", page.locator("#history-table tbody tr a").first.get_attribute("href"))
    finally:
        page.context.close()
    stranger = _open((demo, shots), request.getfixturevalue("browser"))  # a new context: another browser's id
    try:
        stranger.goto(f"{demo.local_url}?run={run_id.group(1)}")
        _loaded(stranger)
        _shows(stranger, "#chat-notice", f"run {run_id.group(1)}: no such run of yours here")
        assert "mine alone" not in stranger.locator("#chatbot").inner_text()
    finally:
        stranger.context.close()
