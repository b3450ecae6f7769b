"""Compare → Arena in a real browser, at a laptop's width and a phone's: a battle streams two anonymous answers, the
vote buttons wake only when both have ended, the vote reveals who was who and where they parted, and the leaderboard
and the win-rate heatmap take the vote in.

Runs on tests.ui.test_browser's app (no `arena:` section there: the default tiny model's three presets play) and
its Chromium; slow tests, as there. Screenshots go to that app's screenshot folder (its path is printed).
"""

from __future__ import annotations

import re

import pytest

from tests.ui.test_browser import (  # noqa: F401 - app and browser are the fixtures these tests run on
    WIDTHS,
    _expect,
    _open,
    _plot_rendered,
    _shows,
    _tab,
    app,
    browser,
)

pytestmark = pytest.mark.slow

CONTENDERS = ("tiny-qwen2 greedy", "tiny-qwen2 default", "tiny-qwen2 t=1.0 top-p 0.95")
VOTE_BUTTONS = ("#arena-vote-a", "#arena-vote-b", "#arena-vote-tie", "#arena-vote-both-bad")
BEFORE_THE_VOTE = ("#arena-out-a", "#arena-out-b", "#arena-notice", "#arena-reveal")


@pytest.fixture(params=WIDTHS)
def arena_page(request):
    """A page on the Arena sub-tab, at a laptop's size, then at a phone's (on test_browser's app and Chromium: its
    module-scoped fixtures, imported above)."""
    page = _open(request.getfixturevalue("app"), request.getfixturevalue("browser"), *request.param)
    page.size = request.param
    try:
        _tab(page, "Compare")
        arena = page.get_by_role("tab", name="Arena")
        arena.scroll_into_view_if_needed()
        arena.click()
        _expect(page.locator("#arena-prompt textarea"), "the arena's prompt box").to_be_visible()
        yield page
    finally:
        page.context.close()


def _votes_counted(page) -> int:
    """Votes the leaderboard table counts: each vote is one battle for each of its two contenders. The table reads
    as its five headers, then five cells per row, one per line."""
    lines = [line.strip() for line in page.locator("#arena-board").inner_text().splitlines() if line.strip()]
    cells = lines[lines.index("votes") + 1:] if "votes" in lines else []
    return sum(int(row[-1]) for row in zip(*[iter(cells)] * 5) if row[-1].isdigit()) // 2


def _counted(page, votes: int) -> None:
    """Wait until the leaderboard counts `votes` votes (it is redrawn by the vote's own answer)."""
    for _ in range(300):
        if _votes_counted(page) == votes:
            return
        page.wait_for_timeout(100)
    assert _votes_counted(page) == votes, page.locator("#arena-board").inner_text()


def _buttons(page, enabled: bool) -> None:
    for selector in VOTE_BUTTONS:
        target = _expect(page.locator(selector), f"{selector} {'enabled' if enabled else 'disabled'}")
        target.to_be_enabled() if enabled else target.to_be_disabled()


def test_a_battle_is_voted_on_then_revealed_and_counted(arena_page):
    page = arena_page
    width, _ = page.size
    _plot_rendered(page, "arena-heatmap")  # the leaderboard is drawn when the sub-tab opens
    before = _votes_counted(page)
    _buttons(page, enabled=False)  # nothing to vote on yet
    page.locator("#arena-prompt textarea").fill("Write a haiku about the sea.")
    page.locator("#arena-start").click()
    _buttons(page, enabled=True)  # both answers ended
    _shows(page, "#arena-notice", "Vote to see who they were")
    for pane in ("#arena-out-a", "#arena-out-b"):  # (a tiny random model's answer may be empty or invisible)
        _expect(page.locator(pane), f"the answer pane {pane}").to_be_visible()
    for selector in BEFORE_THE_VOTE:
        shown = page.locator(selector).inner_text()
        assert "tiny" not in shown.lower(), f"{selector} names a contender before the vote: {shown}"
    _place_panes(page, width)
    page.screenshot(path=str(page.shots / f"arena-battle-{width}.png"), full_page=True)

    page.locator("#arena-vote-b").click()
    _shows(page, "#arena-reveal", "You voted B is better.")
    reveal = page.locator("#arena-reveal").inner_text()
    revealed = [name for name in CONTENDERS if name in reveal]
    assert len(revealed) == 2, reveal  # both sides named, two different contenders
    assert re.search(r"diverge at token \d+|identical", reveal), reveal
    _buttons(page, enabled=False)  # one vote per battle
    _counted(page, before + 1)
    for name in revealed:
        _shows(page, "#arena-board", name, f"{name} on the leaderboard")
    for name in revealed:  # the axes wrap long names over lines
        spread = re.compile(r"\s*".join(re.escape(ch) for ch in name.replace(" ", "")))
        _shows(page, "#arena-heatmap", spread, f"{name} on the win-rate heatmap")
    box = page.locator("#arena-board").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1  # the table stays inside the screen
    page.screenshot(path=str(page.shots / f"arena-revealed-{width}.png"), full_page=True)


def _place_panes(page, width: int) -> None:
    """Model A and Model B side by side on a laptop, stacked (A above B) on a phone, each inside the screen."""
    a, b = page.locator("#arena-out-a").bounding_box(), page.locator("#arena-out-b").bounding_box()
    for box in (a, b):
        assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1, box
    if width < 700:
        assert b["y"] >= a["y"] + a["height"] - 1, (a, b)
    else:
        assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"] - 1, (a, b)


def test_starting_without_a_prompt_says_so_in_the_notice(arena_page):
    page = arena_page
    page.locator("#arena-prompt textarea").fill("   ")
    page.locator("#arena-start").click()
    _shows(page, "#arena-notice", "Type a prompt first.")
    _buttons(page, enabled=False)
