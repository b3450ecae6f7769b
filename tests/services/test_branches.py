"""Branch from any token: the branch continues exactly as a fresh generation from the same tokens would, reuses
the chat's cached prefix instead of recomputing it, can start from a token a stage removed, and forms a tree."""

from __future__ import annotations

import pytest

from qdemo.core.engine import collect, generate
from qdemo.sampling import SamplingParams
from qdemo.services import branches, chat
from qdemo.services.admission import Refused
from qdemo.serving.local import leased
from tests.conftest import tiny_services

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def services(tiny_dir, tmp_path_factory):
    return tiny_services(tiny_dir, tmp_path_factory.mktemp("branches"))


def answered(services, params=GREEDY):
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hello 你好", [], services.limits)
    final = list(chat.answer(services, session, "c", begun.chat, services.default_model, "", params, 1))[-1]
    assert final.done and session.view is final.view and len(final.view.run.tokens) > 0
    return session, final


def test_a_branch_continues_as_a_fresh_run_from_the_same_tokens_and_reuses_the_prefix(services):
    session, final = answered(services)
    view = session.view
    tree = branches.BranchTree.of(view, final.view.run.done.text)
    at = 4
    options = branches.alternatives(view, at)
    assert options and all(o.token_id != view.run.tokens[at].token_id for o in options)
    token = options[0].token_id
    updates = list(branches.grow(services, session, tree, "c", 0, at, token, GREEDY, run_id=2))
    done = updates[-1]
    assert done.done and tree.current == done.branch.id == 1 and tree.branches[1] is done.branch
    prompt = list(view.run.prefill.prompt_ids)
    prefix = [t.token_id for t in view.run.tokens[:at]]
    # the oracle: a fresh greedy run (no kept state) from the prompt, the answer's first tokens and the new token
    lm = services.pool.get(services.default_model)
    fresh = collect(generate(lm, input_ids=prompt + prefix + [token],
                             params=SamplingParams(max_new_tokens=GREEDY.max_new_tokens - at - 1),
                             step_lock=services.pool.gate(services.default_model).step))["done"]
    assert fresh.error is None
    assert done.branch.ids == prefix + [token] + list(fresh.token_ids)
    # only the new token was computed again: the prompt and the shared answer prefix came from the cache
    assert done.reused_tokens == len(prompt) + at
    assert done.branch.view.run.tokens[at].token_id == token and len(done.branch.view.texts) == len(done.branch.ids)


def test_branches_form_a_tree_and_compare(services):
    session, final = answered(services)
    tree = branches.BranchTree.of(session.view, final.view.run.done.text)
    first = branches.alternatives(session.view, 2)[0].token_id
    one = list(branches.grow(services, session, tree, "c", 0, 2, first, GREEDY, run_id=2))[-1].branch
    second = branches.alternatives(one.view, 5)[0].token_id
    two = list(branches.grow(services, session, tree, "c", one.id, 5, second, GREEDY, run_id=3))[-1].branch
    labels = [label for label, _ in tree.choices()]
    assert labels[0].startswith("main answer") and "#1 at token 2" in labels[1] and labels[2].startswith("    ↳ #2")
    assert two.ids[:2] == tree.branches[0].ids[:2] and two.ids[2] == first and two.ids[5] == second
    text = branches.compare(tree, 0, two.id)
    assert "share the first **2** tokens" in text
    assert "same answer" in branches.compare(tree, 1, 1)


def test_a_token_a_stage_removed_can_be_chosen(services):
    params = SamplingParams(do_sample=True, top_k=2, temperature=1.0, seed=3, max_new_tokens=8)
    session, final = answered(services, params)
    view = session.view
    options = branches.alternatives(view, 1)
    removed = [o for o in options if "removed by top_k" in o.label]
    assert removed, [o.label for o in options]
    done = list(branches.grow(services, session, branches.BranchTree.of(view, final.view.run.done.text), "c", 0, 1,
                              removed[0].token_id, params, run_id=2))[-1]
    assert done.branch.ids[1] == removed[0].token_id


def test_bad_branch_requests_are_refused(services):
    session, final = answered(services)
    tree = branches.BranchTree.of(session.view, final.view.run.done.text)
    same = session.view.run.tokens[3].token_id
    with pytest.raises(Refused, match="already has there"):
        list(branches.grow(services, session, tree, "c", 0, 3, same, GREEDY, run_id=2))
    with pytest.raises(Refused, match="no branch #9"):
        list(branches.grow(services, session, tree, "c", 9, 3, 1, GREEDY, run_id=2))
    with pytest.raises(ValueError, match="out of range"):
        branches.alternatives(session.view, 999)
    with pytest.raises(Refused, match="token id 1000000 at position 55 is outside its vocabulary"):
        list(branches.grow(services, session, tree, "c", 0, 3, 10 ** 6, GREEDY, run_id=2))


def test_the_api_branch_is_stateless_and_names_bad_values(services):
    session, final = answered(services)
    history = final.chat
    messages, _ = chat.history_messages(history)
    with leased(services.pool, services.default_model) as backend:  # the answer as plain text, end note left out
        answer_ids = backend.raw_text_ids(messages[-1]["content"])
    report = branches.branch_report(services, "c", "", history, None, 2, 7, {"do_sample": False,
                                                                               "max_new_tokens": 10})
    assert report["token_ids"][:3] == answer_ids[:2] + [7] and report["replaced"] == answer_ids[2]
    with pytest.raises(Refused, match="at 500 is out of range"):
        branches.branch_report(services, "c", "", history, None, 500, 7)
    with pytest.raises(Refused, match="must end with the assistant answer"):
        branches.branch_report(services, "c", "", chat.without_answer(history), None, 0, 7)
    with pytest.raises(Refused, match="token must be a token id"):
        branches.branch_report(services, "c", "", history, None, 0, 1.5)
