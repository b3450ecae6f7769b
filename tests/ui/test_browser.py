"""The app in a real browser: Playwright driving Debian's Chromium against the app on loopback.

Models: the tiny random Qwen2 (sampled answers), the scripted "cycle" model (greedy, writes "The quick brown
fox" and a newline forever, so answers have known line breaks and only Stop or the limit ends them), the same
model behind a slow loader (Stop during a load), and a hub model that is not cached (errors where the user looks).
Assertions are on page content, not pixels; screenshots go to a temp dir (path printed). Skipped when Chromium or
Playwright is missing unless QDEMO_REQUIRE_BROWSER=1 (set by .ci/run), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("QDEMO_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
SLOW_LOAD_S = 4.0
BROWSER_REGISTRY = """\
default: tiny-qwen2
models:
  - name: tiny-qwen2
    display_name: Tiny random Qwen2
    family: qwen2
    source: {{local: {{path: {tiny}}}}}
    dtype: float32
    max_context: 8192
    system_prompt: You are a tiny test model.
    sampling: {{do_sample: true, temperature: 1.0, max_new_tokens: 24}}
  - name: cycle
    display_name: Scripted cycle model
    family: qwen2
    source: {{local: {{path: {cycle}}}}}
    dtype: float32
    max_context: 8192
    sampling: {{do_sample: false, max_new_tokens: 2000}}
  - name: slow-cycle
    display_name: Scripted cycle model (slow to load)
    family: qwen2
    source: {{local: {{path: {cycle}}}}}
    dtype: float32
    max_context: 8192
    sampling: {{do_sample: false, max_new_tokens: 2000}}
  - name: hub-model
    display_name: A hub model
    family: qwen2
    source: {{hub: {{repo_id: qdemo-test/not-cached}}}}
    max_context: 4096
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
def app(tiny_dir, cycle_dir, tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("QDEMO_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from qdemo.models.loader import load_model
    from qdemo.models.registry import load_registry
    from qdemo.serving.pool import ModelPool
    from qdemo.ui.app import build_app

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(tmp_path_factory.mktemp("empty-hub"))

    def loader(spec, **kw):
        if spec.name == "slow-cycle":
            time.sleep(SLOW_LOAD_S)
        return load_model(spec, **kw)

    path = tmp_path_factory.mktemp("registry") / "models.yaml"
    path.write_text(BROWSER_REGISTRY.format(tiny=tiny_dir, cycle=cycle_dir), encoding="utf-8")
    registry = load_registry(path)
    demo = build_app(registry, pool=ModelPool(registry, "cpu", loader=loader))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    shots = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {shots}")
    try:
        yield demo, shots
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser(app):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # waiting assertions wait as long as the page's own waits
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _open(app, browser, width: int = 1400, height: int = 1000):
    demo, shots = app
    context = browser.new_context(accept_downloads=True, viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(demo.local_url)
    _loaded(page)
    page.shots = shots
    return page


def _expect(target, what: str):
    """Playwright's waiting assertions (expect), failing with `what` was expected when the wait times out."""
    from playwright.sync_api import expect  # optional package: without it this module skips instead of failing

    return expect(target, f"timed out waiting for {what}")  # the call log below it says how long


def _until(page, what: str, js: str, arg=None) -> None:
    """Wait for the page function `js` to hold, then assert it; a timeout fails saying `what` was expected."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # optional package, as above

    try:
        page.wait_for_function(js, arg=arg)
    except PlaywrightTimeout:
        raise AssertionError(f"timed out after {TIMEOUT_MS // 1000} s waiting for {what}") from None
    assert page.evaluate(js, arg), what


def _holds(page, what: str, check, seconds: float) -> None:
    """Assert `check()` throughout `seconds`: a late update (a stream's last words) must not break it."""
    deadline = time.monotonic() + seconds
    while True:
        assert check(), what
        if time.monotonic() >= deadline:
            return
        page.wait_for_timeout(100)


def _loaded(page) -> None:
    """The page is up and its load event (it restores the saved conversation and runs) has answered: the model
    picker's progress, shown from the first render until then, is gone."""
    _expect(page.get_by_role("tab", name="Chat"), "the Chat tab").to_be_visible()
    _expect(page.locator("#chat-model .wrap.default").first,
            "the page's load event to finish restoring").to_have_class(re.compile(r"\bhide\b"))


@pytest.fixture
def page(app, browser):
    page = _open(app, browser)
    try:
        yield page
    finally:
        page.context.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _plot_rendered(page, elem_id: str) -> None:
    _expect(page.locator(f"#{elem_id} .js-plotly-plot, #{elem_id} .plotly").first,
            f"a plot drawn in #{elem_id}").to_be_visible()


def _pick(page, elem_id: str, name: str) -> None:
    """Choose a model in a dropdown by typing its name."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(name)
    page.get_by_role("option", name=re.compile(re.escape(name))).first.click()
    _expect(box, f"#{elem_id} to show {name}").to_have_value(re.compile(re.escape(name)))


def _send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def _done(page) -> str:
    """Wait for the page's next run to end (each run's metrics line names its run number)."""
    page.runs_done = getattr(page, "runs_done", 0) + 1
    ended = re.compile(rf"(finished|length limit|stopped|error).*run #{page.runs_done}\b")
    _expect(page.locator("#metrics"), f"run #{page.runs_done} to end in the metrics line").to_contain_text(ended)
    metrics = page.locator("#metrics").inner_text()
    assert ended.search(metrics), metrics
    return metrics


def _stopped_cycle_answer(page, text: str) -> None:
    """Ask the scripted cycle model (it never ends by itself) and stop it once it streams."""
    _pick(page, "chat-model", "Scripted cycle model")
    _expect(page.locator("#chat-model-info"), "the cycle model's forward line").to_contain_text("runs as")
    _send(page, text)
    _generating(page, "#metrics")
    page.locator("#stop").click()
    assert "stopped" in _done(page)


def _generating(page, selector: str) -> None:
    _expect(page.locator(selector), f"an answer streaming ({selector} says generating)").to_contain_text("generating")


def _reload(page) -> None:
    page.reload()
    _loaded(page)


def _restored_model(page, name: str) -> None:
    """After a reload: the saved conversation came back with its model (so what the chat lacks, it really lacks)."""
    _expect(page.locator("#chat-model input"), f"the saved conversation's model {name} restored").to_have_value(
        re.compile(re.escape(name)))


def _shows(page, selector: str, text, what: str | None = None) -> None:
    """Wait until the element at `selector` contains `text` (a string or a pattern): the assertion itself."""
    shown = text if isinstance(text, str) else f"/{text.pattern}/"
    _expect(page.locator(selector).first, what or f"{shown!r} in {selector}").to_contain_text(text)


def _appears(page, selector: str, what: str) -> None:
    """Wait until the first element at `selector` is visible: the assertion itself."""
    _expect(page.locator(selector).first, what).to_be_visible()


def _wait_for_text(page, selector: str, text: str) -> None:
    _expect(page.locator(selector), f"{text!r} in {selector}").to_contain_text(text, use_inner_text=True)
    assert text in page.locator(selector).inner_text()


def _chat_text(page) -> str:
    return page.locator("#chatbot").inner_text()


def test_chat_streams_and_the_token_view_shows_numbers_on_hover(page):
    _send(page, "hello 你好")
    _shows(page, "#chatbot", "hello 你好")
    metrics = _done(page)
    assert re.search(r"seed \d+", metrics)
    tokens = page.locator("#token-view .tok")
    assert tokens.count() > 0
    tokens.first.hover()
    tip = page.locator("#token-view .tok").first.locator(".tip")
    _expect(tip, "the hovered token's numbers").to_be_visible()  # no server round trip: they are in the page
    assert re.search(r"raw.*\d+(\.\d+)?%", tip.inner_text(), re.S)
    tokens.nth(1).click()
    _plot_rendered(page, "stage-plot")
    page.get_by_text("Prompt inspector").click()
    _appears(page, "#prompt-view .chip.special", "the prompt's special-token chips")
    assert page.locator("#prompt-view .chip.special").count() >= 2  # <|im_start|> … chips with their ids
    page.screenshot(path=str(page.shots / "chat.png"), full_page=True)


def test_empty_message_and_unready_model_are_explained_where_the_user_looks(page):
    _send(page, "   ")
    notice = page.locator("#chat-notice")
    _shows(page, "#chat-notice", "Empty message ignored")
    assert notice.is_visible()
    page.locator("#chat-model input").click()
    options = page.get_by_role("option")
    labels = [options.nth(i).inner_text() for i in range(options.count())]
    assert any("needs the hub" in label for label in labels) and any("✓" in label for label in labels)
    page.get_by_role("option", name=re.compile("A hub model")).click()
    _shows(page, "#chat-model-info", "not ready here")
    _send(page, "hello")
    _shows(page, "#chat-notice", "hub-model is not available on this server")
    assert notice.is_visible() and "/tmp" not in notice.inner_text()
    page.screenshot(path=str(page.shots / "chat-errors.png"), full_page=True)


def test_clear_while_an_answer_streams_keeps_the_chat_empty(page):
    """Bug 1: Clear during an answer brought the whole conversation back when the answer ended."""
    _stopped_cycle_answer(page, "first turn")
    _send(page, "second turn")
    _generating(page, "#metrics")
    page.locator("#clear").click()
    _cleared(page)
    _holds(page, "the cleared chat to stay empty while the stopped answer winds down",
           lambda: "first turn" not in _chat_text(page) and "quick brown" not in _chat_text(page),
           seconds=2.5)  # longer than the stream would need to deliver its last update
    _reload(page)
    _restored_model(page, "Scripted cycle model")
    assert "first turn" not in _chat_text(page)


def _cleared(page) -> None:
    """Clear has run on the server: the panels about the last answer are empty again."""
    _shows(page, "#metrics", "TTFT – · tok/s –", "the metrics line reset by Clear")


def test_the_chatbots_trash_icon_also_forgets_the_saved_conversation(page):
    """Bug 2: the chatbot's own trash icon emptied the view, but the conversation came back on reload."""
    _stopped_cycle_answer(page, "remember me?")
    page.locator("#chatbot").get_by_role("button", name=re.compile("clear", re.I)).click()
    _cleared(page)  # and so the emptied conversation is saved in the browser
    _reload(page)
    _restored_model(page, "Scripted cycle model")
    assert "remember me?" not in _chat_text(page)


def test_stop_while_the_model_loads_is_honoured(page):
    """Bug 3: Stop pressed during the first load was ignored and the answer ran to max new tokens."""
    _pick(page, "chat-model", "slow to load")
    _send(page, "a story")
    _shows(page, "#chatbot", "a story")  # the message shows while the model loads
    page.locator("#stop").click()
    _expect(page.locator("#chatbot"), "the answer stopped before it started").to_contain_text(
        "stopped before the answer started", timeout=int(SLOW_LOAD_S * 1000) + TIMEOUT_MS)
    assert "quick brown" not in _chat_text(page)


def test_regenerate_samples_a_fresh_answer_and_a_seed_can_be_pinned(page):
    """Bug 4: Regenerate in sample mode repeated the identical answer (the seed box defaulted to 1234)."""
    _send(page, "hello")
    first = _done(page)
    page.locator("#regenerate").click()
    second = _done(page)
    seeds = [re.search(r"seed (\d+)", m).group(1) for m in (first, second)]
    assert seeds[0] != seeds[1]
    page.locator("#pin-seed").click()
    page.get_by_text("Sampling", exact=True).click()
    assert page.locator("#chat-seed textarea, #chat-seed input").first.input_value() == seeds[1]


def test_compare_keeps_line_breaks_and_shows_each_sides_decoding(page):
    """Bug 6: Compare panes dropped single line breaks."""
    _tab(page, "Compare")
    for side in ("a", "b"):
        _pick(page, f"compare-model-{side}", "Scripted cycle model")
    assert "greedy" in page.locator("#compare-decoding-a").inner_text()
    assert "sample" in page.locator("#compare-decoding-b").inner_text()
    page.locator("#compare-prompt textarea").fill("Write a haiku.")
    page.locator("#compare-run").click()
    _generating(page, "#compare-metrics-a")
    page.locator("#compare-stop").click()
    _shows(page, "#compare-verdict", re.compile(r"diverge|identical"))
    lines = page.locator("#compare-out-a").inner_text().splitlines()
    assert lines.count("The quick brown fox") >= 2
    assert "TTFT" in page.locator("#compare-table").inner_text()
    _plot_rendered(page, "compare-chart")
    page.screenshot(path=str(page.shots / "compare.png"), full_page=True)


def test_undo_clear_and_import_reset_every_panel(page, tmp_path):
    """Bugs 9 and 10: stale token view, metrics and prompt inspector after Undo/Clear/Import; Import ignored the
    sampling settings in the file."""
    _send(page, "hello")
    _done(page)
    assert page.locator("#token-view .tok").count() > 0
    page.locator("#undo").click()
    _shows(page, "#token-view", "appear here")
    assert "TTFT –" in page.locator("#metrics").inner_text()
    assert page.locator("#chat-input textarea").input_value() == "hello"
    _send(page, "hello again")
    _done(page)
    page.locator("#clear").click()
    _shows(page, "#token-view", "appear here")
    assert page.locator("#prompt-view .chip").count() == 0
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({"qdemo_conversation": 1, "model": "tiny-qwen2", "system": "imported system",
                                 "settings": {"do_sample": True, "temperature": 0.35, "top_k": 7},
                                 "messages": [{"role": "user", "content": "imported question"},
                                              {"role": "assistant", "content": "imported answer"}]}),
                     encoding="utf-8")
    page.get_by_text("Save / load conversation (JSON)").click()
    with page.expect_file_chooser() as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(saved))
    _shows(page, "#chatbot", "imported answer")
    page.get_by_text("Sampling", exact=True).click()
    assert page.locator("#chat-temperature input[type=number]").input_value() == "0.35"
    assert page.locator("#chat-top-k input[type=number]").input_value() == "7"
    page.get_by_text("System prompt", exact=True).click()
    assert page.locator("#chat-system textarea").input_value() == "imported system"


def test_sample_n_pressed_while_compute_runs_still_draws(page):
    """Bug 11: Sample N pressed while Compute was running left the histogram blank."""
    _tab(page, "Sampling lab")
    _pick(page, "lab-model", "slow to load")
    page.locator("#lab-context textarea").fill("one two three")
    page.locator("#lab-compute").click()
    page.locator("#lab-sample").click()  # while the model still loads
    _plot_rendered(page, "lab-histogram")
    _plot_rendered(page, "lab-stages")
    assert "⚠️" not in page.locator("#lab-message").inner_text()
    page.screenshot(path=str(page.shots / "sampling-lab.png"), full_page=True)


def test_internals_layer_changes_redraw_without_recomputing(page):
    _send(page, "hello")  # a conversation: its template tokens are what "hide special tokens" hides
    _done(page)
    _tab(page, "Internals")
    page.locator("#internals-refresh").click()
    _plot_rendered(page, "rope-freq")
    page.locator("#attn-run").click()
    _plot_rendered(page, "attn-plot")
    assert "layers" in page.locator("#model-card").inner_text()
    page.locator("#attn-head input").click()
    page.get_by_role("option", name="all heads (grid)").click()
    _shows(page, "#attn-caption", "redraws")
    page.locator("#sinks").get_by_text("Attention sinks").first.click()
    _wait_for_text(page, "#sink-summary", "heads")
    _plot_rendered(page, "sink-plot")
    page.locator("#attn-hide-special input").check()
    _shows(page, "#attn-plot", "special tokens hidden")
    page.screenshot(path=str(page.shots / "internals.png"), full_page=True)


def test_performance_runs_survive_a_reload(page):
    _send(page, "hello")
    _done(page)
    _tab(page, "Performance")
    _wait_for_text(page, "#perf-table", "chat")
    _reload(page)
    _tab(page, "Performance")
    _wait_for_text(page, "#perf-table", "chat")
    _plot_rendered(page, "perf-latency")
    page.screenshot(path=str(page.shots / "performance.png"), full_page=True)


def test_phone_width_keeps_the_chat_usable_and_every_tab_reachable(app, browser):
    page = _open(app, browser, width=390, height=844)
    try:
        dropdown = page.locator("#chat-model").bounding_box()
        assert dropdown["x"] >= 0 and dropdown["x"] + dropdown["width"] <= 390
        box = page.locator("#chat-input textarea").bounding_box()
        assert box["y"] + box["height"] <= 844 * 1.6  # reachable with a short scroll at most
        for name in ("Compare", "Sampling lab", "Internals", "Performance", "Chat"):
            tab = page.get_by_role("tab", name=name)
            tab.scroll_into_view_if_needed()
            tab.click()
            assert tab.get_attribute("aria-selected") == "true"
        page.screenshot(path=str(page.shots / "phone-chat.png"), full_page=False)
    finally:
        page.context.close()


def test_an_empty_seed_box_means_a_fresh_seed_in_compare_too(page):
    """An empty number box reads as 0; the seed boxes are text, so "empty" really draws a fresh seed."""
    _tab(page, "Compare")
    page.locator("#compare-prompt textarea").fill("hello")
    page.locator("#compare-run").click()
    _shows(page, "#compare-verdict", re.compile(r"diverge|identical"))
    first = re.search(r"seed (\d+)", page.locator("#compare-metrics-b").inner_text()).group(1)
    page.locator("#compare-run").click()
    _until(page, f"pane B to run again with a seed other than {first}",
           "(old) => { const m = (document.querySelector('#compare-metrics-b')?.innerText || '')"
           ".match(/seed (\\d+)/); return m && m[1] !== old; }", arg=first)


@pytest.fixture(scope="module")
def limited_app(tiny_dir, cycle_dir, tmp_path_factory):
    """A second app with a rate limit of 2 model requests a minute per session."""
    from qdemo.models.registry import load_registry
    from qdemo.serving.limits import Limits
    from qdemo.serving.pool import ModelPool
    from qdemo.ui.app import build_app

    path = tmp_path_factory.mktemp("limited") / "models.yaml"
    path.write_text(BROWSER_REGISTRY.format(tiny=tiny_dir, cycle=cycle_dir), encoding="utf-8")
    registry = load_registry(path)
    demo = build_app(registry, pool=ModelPool(registry, "cpu"), limits=Limits(requests_per_minute=2))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, tmp_path_factory.mktemp("limited-shots")
    finally:
        demo.close()


def test_the_rate_limit_counts_each_page_user_apart_and_covers_internals(limited_app, browser):
    """Issue 10, bugs 1 and 4: page handlers got no request, so every browser user shared one bucket, and
    Internals' attention ran outside every limit."""
    alice = _open(limited_app, browser)
    bob = _open(limited_app, browser)
    try:
        for text in ("one", "two"):
            _send(alice, text)
            _done(alice)
        _send(alice, "three")
        _shows(alice, "#chat-notice", "Too many requests")
        _tab(alice, "Internals")
        alice.locator("#attn-run").click()
        _shows(alice, "#attn-caption", "Too many requests")
        _send(bob, "my first")  # another user still has the whole minute's allowance
        metrics = _done(bob)
        assert "finished" in metrics or "length limit" in metrics
    finally:
        alice.context.close()
        bob.context.close()


# --- looking inside: which stage decided, branches, the Inspect tab ---------------------------------------------

def _open_accordion(page, elem_id: str, title: str) -> None:
    page.locator(f"#{elem_id}").get_by_text(title).first.click()


def test_which_stage_decided_filters_the_token_view(page):
    _send(page, "hello 你好")
    _done(page)
    summary = page.locator("#decided-summary").inner_text()
    assert "Which stage decided" in summary
    page.locator("#decided-filter input").click()
    page.get_by_role("option", name="not the raw argmax").click()
    _appears(page, "#token-view .decided-count", "the count of the tokens shown")
    shown, total = map(int, re.match(r"(\d+) of (\d+) tokens", page.locator(".decided-count").inner_text()).groups())
    assert total == page.locator("#token-view .tok").count()
    assert shown == page.locator("#token-view .only-marked .tok.marked").count()
    # the answer-level line counts the same tokens
    said = re.search(r"not the raw argmax at (\d+) of (\d+)", summary)
    assert (int(said.group(1)), int(said.group(2))) == (shown, total) if said else shown == 0
    page.screenshot(path=str(page.shots / "decided.png"), full_page=True)


def test_branch_from_a_token_reuses_the_start_and_switches_back(page):
    _send(page, "hello")
    first = _done(page)
    page.get_by_text("Branch from a token").click()
    page.locator("#token-view .tok").first.click()  # sampled answers can be one token long
    _shows(page, "#branch-hint", "pick what to write there instead")
    page.locator("#branch-run").click()
    _shows(page, "#branch-compare", re.compile(r"\S"), "where the branch parts from the answer")
    _shows(page, "#branch-hint", re.compile(r"reused \d+ of \d+ tokens"))
    page.locator("#branch-tree input").click()
    options = page.get_by_role("option")
    assert options.count() == 2  # the answer and its branch
    options.first.click()
    _shows(page, "#branch-hint", "The chat now shows")
    assert page.locator("#metrics").inner_text().split(" · ")[0] == first.split(" · ")[0]
    page.screenshot(path=str(page.shots / "branch.png"), full_page=True)


def test_inspect_lens_attribution_scoring_and_bundle(page, tmp_path):
    _send(page, "hello 你好")
    _done(page)
    answer_tokens = page.locator("#token-view .tok").count()
    _tab(page, "Inspect")
    page.locator("#lens-run").click()
    _appears(page, "#lens-grid td.cell", "the lens grid's cells")
    assert page.locator("#lens-grid thead th").count() == answer_tokens + 1  # a column per answer token
    assert page.locator("#lens-grid tbody tr").count() == 3  # embed, L0, L1 of the tiny model
    page.locator("#lens-grid td.cell").nth(1).click()
    _wait_for_text(page, "#lens-cell", "top-10")
    cell = page.locator("#lens-cell").inner_text()
    probs = [float(p) for p in re.findall(r"^(0\.\d+|1\.0+)$", cell, re.M)]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True)  # the clicked cell's top-10, best first
    _appears(page, "#lens-csv", "the lens's CSV download")
    _open_accordion(page, "attribution", "Prompt attribution")
    pick = min(2, answer_tokens - 1)  # sampled answers differ in length
    page.locator("#attr-pick .tok").nth(pick).click()
    _expect(page.locator("#attr-token input"), f"answer token {pick} picked").to_have_value(str(pick))
    page.locator("#attr-run").click()
    _appears(page, "#attr-text .attr", "the attribution drawn")
    _plot_rendered(page, "attr-turns")
    assert f"answer token {pick}" in page.locator("#attr-status").inner_text()
    page.locator("#attr-method").get_by_text("occlusion").click()
    page.locator("#attr-run").click()
    _shows(page, "#attr-status", "occlusion over")
    _open_accordion(page, "scoring", "Score any text")
    page.locator("#score-reuse").click()
    _appears(page, "#score-view .sc", "the scored tokens")
    assert page.locator("#score-view .sc").count() == answer_tokens
    page.locator("#score-text textarea").fill("plain text 纯文本 here")
    _pick(page, "score-model-b", "Tiny random Qwen2")
    page.locator("#div-run").click()
    _shows(page, "#score-status", "top-1 agreement 100%")
    _open_accordion(page, "bundle", "Evidence bundle")
    page.locator("#bundle-make").click()
    _shows(page, "#bundle-status", "is ready")
    with page.expect_download() as download:
        page.locator("#bundle-download").click()
    saved = tmp_path / "bundle.html"
    download.value.save_as(saved)
    assert "qdemo evidence bundle" in saved.read_text(encoding="utf-8")
    with page.expect_file_chooser() as chooser:
        page.locator("#bundle-open").click()
    chooser.value.set_files(str(saved))
    _appears(page, "#bundle-view .tok", "the opened bundle's tokens")
    assert page.locator("#bundle-view .tok").count() == answer_tokens
    page.screenshot(path=str(page.shots / "inspect.png"), full_page=True)


def test_inspect_at_phone_width_keeps_the_lens_inside_the_screen(app, browser):
    page = _open(app, browser, width=390, height=844)
    try:
        _send(page, "hello")
        _done(page)
        tab = page.get_by_role("tab", name="Inspect")
        tab.scroll_into_view_if_needed()
        tab.click()
        page.locator("#lens-run").click()
        _appears(page, "#lens-grid td.cell", "the lens grid's cells")
        grid = page.locator("#lens-grid .lensgrid").bounding_box()
        assert grid["x"] >= 0 and grid["x"] + grid["width"] <= 390  # the table scrolls inside its box
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(page.shots / "phone-inspect.png"), full_page=False)
    finally:
        page.context.close()
