"""The app in a real browser: Playwright driving Debian's Chromium against the app on loopback (tiny model).

Screenshots go to a temp dir (path printed); assertions are on page content, not pixels. Skipped when
Chromium or Playwright is missing unless QDEMO_REQUIRE_BROWSER=1 (set by .ci/run), which makes that a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("QDEMO_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
BROWSER_REGISTRY = """\
default: tiny-qwen2
models:
  - name: tiny-qwen2
    family: qwen2
    source: {{local: {{path: {path}}}}}
    dtype: float32
    max_context: 8192
    system_prompt: You are a tiny test model.
    sampling: {{do_sample: false, max_new_tokens: 2000}}
"""


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt install chromium)"
    return None


@pytest.fixture(scope="module")
def page(tiny_dir, tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("QDEMO_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from qdemo.registry import load_registry
    from qdemo.ui.app import build_app

    shots = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {shots}")
    # Greedy and long by default, so Stop always has something to stop: from a clear chat the tiny model writes
    # 3000+ tokens without eos (≈ 400 tok/s), and no test depends on typing into sliders.
    registry = tmp_path_factory.mktemp("registry") / "models.yaml"
    registry.write_text(BROWSER_REGISTRY.format(path=tiny_dir), encoding="utf-8")
    demo = build_app(load_registry(registry))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(demo.local_url)
        page.get_by_role("tab", name="Chat").wait_for()
        page.shots = shots
        try:
            yield page
        finally:
            context.close()
            browser.close()
            demo.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _plot_rendered(page, elem_id: str) -> None:
    page.locator(f"#{elem_id} .js-plotly-plot, #{elem_id} .plotly").first.wait_for(state="visible")


def _send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def test_chat_streams_and_token_view(page):
    _tab(page, "Chat")
    _send(page, "hello 你好")
    page.locator("#chatbot").get_by_text("hello 你好").wait_for()
    page.locator("#metrics").get_by_text(re.compile(r"eos|max_tokens|stop_token")).wait_for()
    answer = page.locator("#chatbot .message").last.inner_text()
    assert answer.strip()
    tokens = page.locator("#token-view .token")
    assert tokens.count() > 0
    tokens.first.click()
    _plot_rendered(page, "stage-plot")
    page.screenshot(path=str(page.shots / "chat.png"), full_page=True)


def test_stop_halts_generation(page):
    _tab(page, "Chat")
    page.locator("#clear").click()
    page.locator("#chatbot").get_by_text("hello 你好").wait_for(state="detached")  # the send must see an empty chat
    _send(page, "a very long story please")
    page.locator("#metrics").get_by_text("generating").wait_for()
    page.locator("#stop").click()
    page.locator("#metrics").get_by_text("stopped").wait_for()
    page.screenshot(path=str(page.shots / "chat-stopped.png"), full_page=True)


def test_export_json(page):
    _tab(page, "Chat")
    with page.expect_download() as info:
        page.get_by_text("Save / load conversation (JSON)").click()
        page.locator("#export").click()
    path = info.value.path()
    text = Path(path).read_text(encoding="utf-8")
    assert '"qdemo_conversation"' in text and "a very long story please" in text  # the chat after Stop


def test_compare_tab(page):
    _tab(page, "Compare")
    page.locator("#compare-prompt textarea").fill("Write a haiku.")
    page.locator("#compare-run").click()
    page.locator("#compare-verdict").get_by_text(re.compile(r"diverge|identical")).wait_for()
    _plot_rendered(page, "compare-chart")
    assert page.locator("#compare-out-a").inner_text().strip()
    page.screenshot(path=str(page.shots / "compare.png"), full_page=True)


def test_sampling_lab_tab(page):
    _tab(page, "Sampling lab")
    page.locator("#lab-context textarea").fill("one two three")
    page.locator("#lab-compute").click()
    _plot_rendered(page, "lab-stages")
    page.locator("#lab-sample").click()
    _plot_rendered(page, "lab-histogram")
    page.screenshot(path=str(page.shots / "sampling-lab.png"), full_page=True)


def test_internals_tab(page):
    _tab(page, "Internals")
    page.locator("#internals-refresh").click()
    _plot_rendered(page, "rope-freq")
    page.locator("#attn-run").click()
    _plot_rendered(page, "attn-plot")
    assert "layers" in page.locator("#model-card").inner_text()
    page.screenshot(path=str(page.shots / "internals.png"), full_page=True)


def test_performance_tab(page):
    _tab(page, "Performance")
    page.locator("#perf-refresh").click()
    _plot_rendered(page, "perf-latency")
    _plot_rendered(page, "perf-memory")
    assert "chat" in page.locator("#perf-table").inner_text()
    page.screenshot(path=str(page.shots / "performance.png"), full_page=True)


def test_conversation_survives_reload(page):
    _tab(page, "Chat")
    page.reload()
    page.get_by_role("tab", name="Chat").wait_for()
    page.locator("#chatbot").get_by_text("a very long story please").wait_for()
