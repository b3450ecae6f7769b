"""Branch from any token of an answer: pick another token at that position — one a sampling stage removed, too —
and generate on from there. Branches form a tree the user can switch between and compare. No Gradio here.

A branch reuses the chat's kept decode state: the prompt and the answer up to the branch point are already in
its KV cache, so only the forced token and what follows are computed (the engine keeps the longest common prefix
and crops the rest; its PrefillEvent says how many tokens it reused).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Sequence

from qdemo.core.events import DoneEvent, StageTopN, TokenEvent
from qdemo.core.runs import RunRecord
from qdemo.models.sources import ProgressFn
from qdemo.sampling import SamplingParams
from qdemo.services.admission import ModelRequest, Refused, Services
from qdemo.services.chat import (
    UI_INTERVAL_S,
    AnswerView,
    ChatSession,
    answer_view,
    history_messages,
)
from qdemo.views.labels import percent, token_label


@dataclass
class Branch:
    id: int
    parent: int | None
    at: int  # where it leaves its parent: the index of the first token that differs (0 for the root)
    token: int | None  # the token forced there (None: the chat's own answer)
    view: AnswerView  # the whole answer's events (the parent's first `at`, the forced one, then the new ones)
    text: str

    @property
    def ids(self) -> list[int]:
        return [t.token_id for t in self.view.run.tokens]


@dataclass
class BranchTree:
    """Every branch of one answer, keyed by id; the root (0) is the answer the chat wrote."""

    model: str  # the model reference the answer ran on ("name" or "name [forward]")
    messages: list[dict[str, str]]  # the turn's messages (system first when given)
    branches: dict[int, Branch] = field(default_factory=dict)
    current: int = 0

    @classmethod
    def of(cls, view: AnswerView, text: str) -> "BranchTree":
        """The tree of an answer the chat wrote (its view knows the model and the turn's messages)."""
        tree = cls(model=view.model, messages=list(view.messages))
        tree.branches[0] = Branch(id=0, parent=None, at=0, token=None, view=view, text=text)
        return tree

    @property
    def prompt_ids(self) -> list[int]:
        prefill = self.branches[0].view.run.prefill
        return list(prefill.prompt_ids) if prefill else []

    def depth(self, branch_id: int) -> int:
        depth, node = 0, self.branches[branch_id]
        while node.parent is not None:
            depth, node = depth + 1, self.branches[node.parent]
        return depth

    def label(self, branch: Branch) -> str:
        if branch.parent is None:
            return f"main answer ({len(branch.ids)} tokens)"
        view = branch.view
        was = self.branches[branch.parent].ids[branch.at] if branch.at < len(self.branches[branch.parent].ids) else None
        was_text = token_label(view.labels.get(was, "")) if was is not None else "(end)"
        now_text = token_label(view.labels.get(branch.token, ""))
        return f"{'  ' * self.depth(branch.id)}↳ #{branch.id} at token {branch.at}: {was_text} → {now_text} " \
               f"({len(branch.ids)} tokens)"

    def choices(self) -> list[tuple[str, int]]:
        """Depth-first, children after their parent."""
        out: list[tuple[str, int]] = []

        def visit(branch_id: int) -> None:
            out.append((self.label(self.branches[branch_id]), branch_id))
            for child in sorted(b.id for b in self.branches.values() if b.parent == branch_id):
                visit(child)

        visit(0)
        return out


@dataclass(frozen=True)
class Alternative:
    token_id: int
    label: str  # for a dropdown: the token and its numbers, and which stage removed it


def alternatives(view: AnswerView, index: int) -> list[Alternative]:
    """The tokens one could have written at `index`: every token of any stage's top-N there, by raw probability,
    each saying its raw and final probability and which stage (if any) removed it. The token written is left out."""
    event = _event(view, index)
    if not event.stages:
        raise ValueError(f"token {index} has no recorded distribution to branch from")
    raw, final = event.stages[0], event.stages[-1]
    raw_p = dict(zip(raw.token_ids, raw.probs))
    final_p = dict(zip(final.token_ids, final.probs))
    candidates = {i for s in event.stages for i in s.token_ids} - {event.token_id}
    out = []
    for token in sorted(candidates, key=lambda t: -raw_p.get(t, 0.0)):
        text = token_label(view.labels.get(token, ""))
        final_share = percent(final_p.get(token, 0.0) if token in final_p else None)
        label = f"{text} · raw {percent(raw_p.get(token))} · final {final_share}"
        removed = _removed_by(event.stages, token)
        if removed:
            label += f" · removed by {removed}"
        out.append(Alternative(token_id=token, label=label))
    return out


FILTERS = ("top_k", "top_p", "min_p")  # stages that only zero tokens out: the survivors keep their order


def _removed_by(stages: Sequence[StageTopN], token: int) -> str | None:
    """The filtering stage that zeroed `token`: it was in the stage's input top-N and is not in its output, or is
    listed there at 0 (a filter keeps the survivors' order, so a survivor from the top-N stays in it; a stage with
    fewer survivors than N lists tokens it cut at 0)."""
    for before, after in zip(stages, stages[1:]):
        kept = dict(zip(after.token_ids, after.probs)).get(token)
        if after.name in FILTERS and token in before.token_ids and not kept:
            return after.name
    return None


def _event(view: AnswerView, index: Any) -> TokenEvent:
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise ValueError(f"token index must be a whole number, got {index!r}") from None
    if not 0 <= i < len(view.run.tokens):
        raise ValueError(f"token index {i} is out of range (0..{len(view.run.tokens) - 1})")
    return view.run.tokens[i]


@dataclass
class BranchUpdate:
    text: str  # the branch's answer so far
    done: bool = False
    branch: Branch | None = None
    reused_tokens: int = 0  # prompt + answer tokens the branch did not recompute
    notice: str = ""


def grow(services: Services, session: ChatSession, tree: BranchTree, client: str | None, parent_id: int, at: int,
         token: int, params: SamplingParams, run_id: int, stop: threading.Event | None = None,
         progress: ProgressFn | None = None) -> Iterator[BranchUpdate]:
    """Generate a new branch of `tree`: the parent's answer up to `at`, then `token`, then the model's own
    continuation under `params` (its max_new_tokens counts the whole answer)."""
    parent = _branch_point(tree, parent_id, at, token)
    head = parent.ids[:at] + [token]  # the answer the continuation follows
    remaining = max(1, params.max_new_tokens - at - 1)
    with services.admit(client, ModelRequest(tree.model, params.replace(max_new_tokens=remaining)),
                        progress=progress) as admitted:
        backend, run_params = admitted.backend, admitted.params[0]
        services.need_logits(backend, "branching from a token")
        run = _branch_run(backend, parent, at, token, run_params, run_id)
        ids = tree.prompt_ids + head
        reused, new, done = yield from _continue(services, session, backend, ids, head, run, run_params, stop)
        all_ids = head + [t.token_id for t in new]
        text = backend.decode(all_ids, skip_special_tokens=True)
        if done is not None:
            run.done = dataclasses.replace(done, text=text, token_ids=tuple(all_ids))
            if done.error:
                raise Refused(done.error)
        view = dataclasses.replace(answer_view(backend, run, tree.messages), model=tree.model)
    branch = Branch(id=max(tree.branches) + 1, parent=parent_id, at=at, token=token, view=view, text=text)
    tree.branches[branch.id] = branch
    tree.current = branch.id
    yield BranchUpdate(text=text, done=True, branch=branch, reused_tokens=reused,
                       notice=f"Branch #{branch.id}: reused {reused} of {len(ids)} tokens from the cache, "
                              f"wrote {len(new)} new ones.")


def _branch_point(tree: BranchTree, parent_id: int, at: int, token: int) -> Branch:
    """The branch to part from, checked: `at` is one of its tokens and `token` is not the one written there."""
    parent = tree.branches.get(parent_id)
    if parent is None:
        raise Refused(f"there is no branch #{parent_id} to branch from")
    _event(parent.view, at)
    if token == parent.ids[at]:
        raise Refused("that is the token the answer already has there: pick another one")
    return parent


def _branch_run(backend: Any, parent: Branch, at: int, token: int, params: SamplingParams, run_id: int
                ) -> RunRecord:
    """The branch's record, holding the parent's tokens before `at` and the forced one (the rest follows)."""
    base = parent.view.run
    run = RunRecord(run_id=run_id, model=backend.name, settings={**params.to_dict(), "branch_of": parent.id,
                                                                 "branch_at": at, "branch_token": token},
                    label=f"branch of #{base.run_id}", forward=backend.forward_label)
    texts = backend.token_texts(parent.ids[:at] + [token])
    run.tokens = [dataclasses.replace(t) for t in base.tokens[:at]] + [_forced_event(parent, at, token, texts[token])]
    return run


def _continue(services: Services, session: ChatSession, backend: Any, ids: list[int], head: list[int],
              run: RunRecord, params: SamplingParams, stop: threading.Event | None
              ) -> Generator[BranchUpdate, None, tuple[int, list[TokenEvent], DoneEvent | None]]:
    """The model's continuation of `ids` from the session's kept decode state (kept again afterwards: it holds the
    shared start), streamed as the chat streams: not every token. Returns (tokens reused, new tokens, the end)."""
    at = len(head) - 1
    state = services.states.take(session.key, backend.key) or backend.new_state()
    try:
        events = backend.generate(input_ids=ids, params=params, state=state, stop_event=stop, top_n=20,
                                  time_limit_s=services.limits.max_generation_seconds)
    except ValueError as exc:  # a token outside the vocabulary, an answer past the context
        services.states.keep(session.key, state)
        raise Refused(str(exc)) from None
    reused, new, done, shown_at = 0, [], None, 0.0
    try:
        for event in events:
            if type(event).__name__ == "PrefillEvent":
                run.prefill, reused = event, event.reused_tokens
            elif isinstance(event, TokenEvent):
                new.append(dataclasses.replace(event, step=at + 1 + event.step))
                run.tokens.append(new[-1])
                if time.perf_counter() - shown_at >= UI_INTERVAL_S:
                    shown_at = time.perf_counter()
                    text = backend.decode(head + [t.token_id for t in new], skip_special_tokens=True)
                    yield BranchUpdate(text=text, reused_tokens=reused)
            elif isinstance(event, DoneEvent):
                done = event
    finally:
        events.close()
        if state is not None and not state.broken:
            services.states.keep(session.key, state)
    return reused, new, done


def _forced_event(parent: Branch, at: int, token: int, text: str) -> TokenEvent:
    """The branch point: the parent's distribution there, with the forced token as the one chosen."""
    was = parent.view.run.tokens[at]
    stages = tuple(dataclasses.replace(s, chosen_prob=dict(zip(s.token_ids, s.probs)).get(token, 0.0))
                   for s in was.stages)
    return dataclasses.replace(was, token_id=token, text=text, stages=stages, drafted=False)


def compare(tree: BranchTree, a: int, b: int) -> str:
    """Where two branches part and what each says from there, as Markdown."""
    first, second = tree.branches[a], tree.branches[b]
    ids_a, ids_b = first.ids, second.ids
    same = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
    labels = {**first.view.labels, **second.view.labels}

    def tail(branch: Branch) -> str:
        rest = "".join(branch.view.texts[same:])
        return rest.replace("|", "\\|").replace("\n", "⏎ ") or "(nothing more)"

    name_a, name_b = tree.label(first).strip(), tree.label(second).strip()
    if same == len(ids_a) == len(ids_b):
        return f"**{name_a}** and **{name_b}** are the same answer."
    shared = "".join(first.view.texts[:same])
    return (f"They share the first **{same}** tokens (…{shared[-60:]!r}); then "
            f"**{name_a}** writes {token_label(labels.get(ids_a[same], '')) if same < len(ids_a) else '(end)'} and "
            f"**{name_b}** writes {token_label(labels.get(ids_b[same], '')) if same < len(ids_b) else '(end)'}.\n\n"
            f"| {name_a} | {name_b} |\n|---|---|\n| {tail(first)} | {tail(second)} |")


def branch_report(services: Services, client: str | None, model: str, history: Sequence[Any] | None,
                  system: str | None, at: Any, token: Any, settings: Any = None) -> dict[str, Any]:
    """The API's branch: `history` ends with an assistant answer; write `token` (an id, or text that is one
    token) at answer token `at` instead and generate on. Stateless: the answer is tokenized as plain text."""
    messages, _ = history_messages(history, system)
    if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise Refused("history must end with the assistant answer to branch from")
    if isinstance(at, bool) or not isinstance(at, int):
        raise Refused(f"at must be a token index (a whole number), got {str(at)[:40]}")
    with services.admit(client, ModelRequest(model, settings)) as admitted:
        backend, params = admitted.backend, admitted.params[0]
        services.need_logits(backend, "branching from a token")
        answer = backend.raw_text_ids(messages[-1]["content"])
        if not 0 <= at < len(answer):
            raise Refused(f"at {at} is out of range: the answer has {len(answer)} tokens (0..{len(answer) - 1})")
        if isinstance(token, str):
            pieces = backend.raw_text_ids(token)
            if len(pieces) != 1:
                raise Refused(f"token text {token[:40]!r} is {len(pieces)} tokens for {backend.name}; give one token "
                              "or its id")
            token = pieces[0]
        if isinstance(token, bool) or not isinstance(token, int):
            raise Refused(f"token must be a token id or the text of one token, got {str(token)[:40]}")
        prompt = backend.chat_prompt(messages[:-1], params.max_new_tokens,
                                     max_prompt_tokens=services.limits.max_prompt_tokens)
        remaining = max(1, params.max_new_tokens - at - 1)
        try:
            events = list(backend.generate(input_ids=prompt.ids + answer[:at] + [token],
                                           params=params.replace(max_new_tokens=remaining), top_n=0,
                                           time_limit_s=services.limits.max_generation_seconds))
        except ValueError as exc:
            raise Refused(str(exc)) from None
        done = next(e for e in events if isinstance(e, DoneEvent))
        if done.error:
            raise Refused(done.error)
        ids = answer[:at] + [token] + list(done.token_ids)
        return {"model": backend.name, "forward": backend.forward_label, "at": at, "replaced": answer[at],
                "token": token, "token_ids": ids, "text": backend.decode(ids, skip_special_tokens=True),
                "reason": done.reason}
