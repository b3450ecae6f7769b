"""Compare → Arena: a blind battle between two contenders drawn at random, the vote, the reveal and the leaderboard.
Layout and wiring only (the arena itself: qdemo.services.arena)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import gradio as gr

from qdemo.services import arena as arena_service
from qdemo.services.admission import Refused
from qdemo.ui.context import UIContext, progress_callback
from qdemo.views.arena_view import empty_leaderboard, leaderboard_frame, win_rate_figure

VOTES = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both are bad"))
INTRO = ("Two contenders drawn at random answer your prompt as **Model A** and **Model B**. Vote for the better "
         "answer; then you see who they were, and where their answers parted.")


@dataclass(frozen=True)
class ArenaParts:
    battle: gr.State  # the id of this page's battle that waits for its vote (None: none)
    prompt: gr.Textbox
    among: gr.CheckboxGroup  # the contenders this page draws from
    start: gr.Button
    notice: gr.Markdown  # what is happening; refusals show here too
    answer_a: gr.Markdown
    answer_b: gr.Markdown
    votes: dict[str, gr.Button]  # outcome → its button
    reveal: gr.Markdown
    board: gr.Dataframe
    heatmap: gr.Plot


def build(ui: UIContext, tab: gr.Tab) -> None:
    """The Arena sub-tab's content; `tab` is that sub-tab (the leaderboard refreshes when it is opened)."""
    parts = _layout([c.name for c in arena_service.arena_of(ui.services).contenders])
    buttons = list(parts.votes.values())
    ui.on([parts.start.click, parts.prompt.submit], partial(start_battle, parts, ui), {parts.prompt, parts.among},
          [parts.answer_a, parts.answer_b, parts.reveal, parts.battle, *buttons], notice=parts.notice,
          runs_model=True)
    for outcome, button in parts.votes.items():
        ui.on(button.click, partial(cast_vote, parts, ui, outcome), {parts.battle},
              [parts.reveal, parts.battle, parts.board, parts.heatmap, *buttons], notice=parts.notice)
    ui.on(tab.select, partial(show_board, parts, ui), None, [parts.board, parts.heatmap], notice=parts.notice)


def _layout(names: list[str]) -> ArenaParts:
    battle = gr.State(None)
    gr.Markdown(INTRO)
    with gr.Row(equal_height=False):
        prompt = gr.Textbox(label="prompt", lines=2, scale=4, min_width=240, elem_id="arena-prompt")
        start = gr.Button("New battle", variant="primary", scale=1, min_width=140, elem_id="arena-start")
    with gr.Accordion("Contenders in the draw", open=False):
        among = gr.CheckboxGroup(names, value=names, show_label=False, elem_id="arena-among")
    notice = gr.Markdown("", elem_id="arena-notice")
    with gr.Row(equal_height=False):  # side by side on a laptop, stacked on a phone
        answers = []
        for side in ("a", "b"):
            with gr.Column(min_width=300):
                gr.Markdown(f"### Model {side.upper()}")
                answers.append(gr.Markdown("", elem_id=f"arena-out-{side}", height=320, line_breaks=True))
    with gr.Row():
        votes = {outcome: gr.Button(label, interactive=False, min_width=140,
                                    elem_id=f"arena-vote-{outcome.replace('_', '-')}") for outcome, label in VOTES}
    reveal = gr.Markdown("", elem_id="arena-reveal")
    with gr.Row(equal_height=False):
        board = gr.Dataframe(empty_leaderboard(), label="leaderboard", interactive=False, elem_id="arena-board",
                             min_width=340, wrap=True, column_widths=["16%", "32%", "18%", "18%", "16%"])
        heatmap = gr.Plot(label="win rates", show_label=False, elem_id="arena-heatmap", min_width=340)
    return ArenaParts(battle=battle, prompt=prompt, among=among, start=start, notice=notice, answer_a=answers[0],
                      answer_b=answers[1], votes=votes, reveal=reveal, board=board, heatmap=heatmap)


# --- handlers -------------------------------------------------------------------------------------------------------

def start_battle(parts: ArenaParts, ui: UIContext, data: dict, request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> Iterator[dict]:
    arena = arena_service.arena_of(ui.services)
    yield {parts.answer_a: "", parts.answer_b: "", parts.reveal: "", parts.battle: None,
           parts.notice: "Drawing two contenders…", **_voting(parts, False)}
    for update in arena_service.battle(ui.services, arena, ui.client(request), data[parts.prompt],
                                       progress=progress_callback(progress), among=data[parts.among]):
        out = {parts.answer_a: update.answer_a, parts.answer_b: update.answer_b, parts.notice: update.status}
        if update.done:
            out.update({parts.battle: update.battle_id if update.votable else None,
                        **_voting(parts, update.votable)})
        yield out


def cast_vote(parts: ArenaParts, ui: UIContext, outcome: str, data: dict, request: gr.Request) -> dict:
    if not data[parts.battle]:
        raise Refused("Start a battle first: there is no pair of answers waiting for a vote.")
    arena = arena_service.arena_of(ui.services)
    reveal = arena_service.vote(ui.services, arena, ui.client(request), data[parts.battle], outcome)
    out = {parts.reveal: reveal.line(), parts.battle: None, parts.notice: "Your vote is in.", **_voting(parts, False)}
    try:  # the vote is stored: its reveal shows even when the leaderboard cannot be read now
        out.update(_board(parts, arena.board()))
    except Refused as exc:
        out[parts.notice] = f"Your vote is in. {exc}"
    return out


def show_board(parts: ArenaParts, ui: UIContext) -> dict:
    return _board(parts, arena_service.arena_of(ui.services).board())


def _voting(parts: ArenaParts, enabled: bool) -> dict:
    return {button: gr.Button(interactive=enabled) for button in parts.votes.values()}


def _board(parts: ArenaParts, standings: arena_service.Standings) -> dict:
    table = leaderboard_frame(standings.ratings) if standings.ratings else empty_leaderboard()
    return {parts.board: table, parts.heatmap: win_rate_figure(standings.names, standings.rates)}
