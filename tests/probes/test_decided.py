"""Which stage decided: chain.summarise's `removed` / `argmax_prob` and qdemo.probes.decided against an oracle that runs
transformers' processors by hand on full-vocabulary tensors (masks from -inf logits, not from probabilities)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from qdemo.core.chain import run_chain, summarise
from qdemo.core.engine import collect, generate
from qdemo.core.events import MemorySample, StageTopN, TokenEvent
from qdemo.core.runs import RunRecord, run_from_json, run_to_json
from qdemo.probes.decided import decided_indices, token_decision, token_decisions
from qdemo.sampling import SamplingParams, build_stages
from qdemo.views.decided import answer_summary, decision_marks

VOCAB = 1000
MEM = MemorySample(device="cpu")


@dataclass
class Oracle:
    """Everything computed directly from the full tensors, stage by stage."""

    names: list[str]
    probs: list[torch.Tensor]  # [V] per stage
    removed: list[float]  # mass (under the stage before) of the logits this stage turned to -inf
    argmax_probs: list[float]  # raw argmax's probability at each stage
    raw_argmax: int
    changed: list[str]  # stages whose argmax differs from the stage before
    argmax_removed_by: str | None


def oracle(logits: torch.Tensor, context: list[int], params: SamplingParams) -> Oracle:
    seq = torch.tensor([context])
    scores = logits.reshape(1, -1).clone()
    names, probs, removed = ["raw"], [torch.softmax(scores, -1)[0]], [0.0]
    for name, processor in build_stages(params):
        new = processor(seq, scores.clone())
        cut = torch.isinf(new[0]) & ~torch.isinf(scores[0])
        removed.append(float(torch.softmax(scores, -1)[0][cut].double().sum()))
        scores = new
        names.append(name)
        probs.append(torch.softmax(scores, -1)[0])
    raw_argmax = int(torch.argmax(probs[0]))
    argmax_probs = [float(p[raw_argmax]) for p in probs]
    changed = [names[s] for s in range(1, len(names)) if int(torch.argmax(probs[s])) != int(torch.argmax(probs[s - 1]))]
    gone = [names[s] for s in range(1, len(names)) if argmax_probs[s] == 0]
    return Oracle(names, probs, removed, argmax_probs, raw_argmax, changed, gone[0] if gone else None)


def summarised(logits: torch.Tensor, context: list[int], params: SamplingParams, chosen: int, top_n: int = 10
               ) -> tuple[StageTopN, ...]:
    _, names, probs = run_chain(logits.reshape(1, -1), torch.tensor([context]), build_stages(params), keep=True)
    token, stages = summarise(names, probs, torch.tensor([chosen]), top_n)
    assert token == chosen
    return stages


def event(step: int, token: int, stages: tuple[StageTopN, ...]) -> TokenEvent:
    return TokenEvent(step=step, token_id=token, text=f"t{token}", stages=stages, step_seconds=0.01,
                      kv_cache_bytes=0, memory=MEM)


CASES = [
    SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(do_sample=True, top_p=0.5),
    SamplingParams(do_sample=True, temperature=1.5, min_p=0.1),
    SamplingParams(do_sample=True, top_k=3, repetition_penalty=2.0),
    SamplingParams(do_sample=False, repetition_penalty=1.5),
]


@pytest.mark.parametrize("params", CASES, ids=["all", "top-p", "min-p", "top-k+penalty", "greedy+penalty"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summarise_removed_and_argmax_match_the_full_tensors(params, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=gen) * 3
    context = torch.randint(0, VOCAB, (30,), generator=gen).tolist()
    truth = oracle(logits, context, params)
    chosen = int(torch.argmax(truth.probs[-1]))
    stages = summarised(logits, context, params, chosen)
    assert [s.name for s in stages] == truth.names
    for stage, removed, argmax_prob in zip(stages, truth.removed, truth.argmax_probs):
        assert stage.removed == pytest.approx(removed, abs=2e-6), stage.name
        assert stage.argmax_prob == pytest.approx(argmax_prob, abs=1e-7), stage.name
        assert (stage.argmax_prob == 0) == (argmax_prob == 0), stage.name
    # The filters of these cases do cut: the test would not notice a summarise that always says 0.
    if any(name in ("top_k", "top_p", "min_p") for name in truth.names):
        assert max(truth.removed) > 0.01


def test_reshaping_stages_remove_nothing_and_keep_the_argmax_alive():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 2
    params = SamplingParams(do_sample=True, temperature=0.5, repetition_penalty=1.8)
    stages = summarised(logits, list(range(50)), params, chosen=0)
    assert [s.name for s in stages] == ["raw", "repetition_penalty", "temperature"]
    assert [s.removed for s in stages] == [0.0, 0.0, 0.0]
    assert all(s.argmax_prob > 0 for s in stages)


def crafted_penalty_then_top_k() -> tuple[torch.Tensor, list[int], SamplingParams]:
    """Token 7 is the model's favourite but already in the context: the penalty sinks it below token 3, and
    top-k 1 then keeps only token 3, removing the raw argmax."""
    logits = torch.full((VOCAB,), -5.0)
    logits[7], logits[3], logits[11] = 6.0, 5.0, 4.0
    return logits, [7, 7, 2], SamplingParams(do_sample=True, repetition_penalty=3.0, top_k=1)


def test_a_crafted_penalty_moves_the_top_and_top_k_removes_the_raw_argmax():
    logits, context, params = crafted_penalty_then_top_k()
    truth = oracle(logits, context, params)
    assert truth.raw_argmax == 7 and truth.changed == ["repetition_penalty"] and truth.argmax_removed_by == "top_k"
    stages = summarised(logits, context, params, chosen=3)
    decision = token_decision(0, event(0, 3, stages))
    assert decision.raw_top == truth.raw_argmax and decision.final_top == 3
    assert list(decision.changed_by) == truth.changed
    assert decision.argmax_removed_by == truth.argmax_removed_by
    assert decision.not_argmax is True and decision.below_final_top is False
    removed = dict(decision.removed)
    assert removed["repetition_penalty"] == 0.0
    assert removed["top_k"] == pytest.approx(truth.removed[-1], abs=2e-6)
    # Top-k 1 keeps token 3 alone: it removed everything else the penalty left, the sunk favourite included.
    assert removed["top_k"] == pytest.approx(1 - float(truth.probs[1][3]), abs=2e-6)


def test_the_raw_argmax_removal_is_seen_even_outside_the_top_n():
    """top_n=2: after the penalty the raw argmax (7) ranks third, so no top-N lists it at the top-k stage."""
    logits = torch.full((VOCAB,), -5.0)
    logits[7], logits[3], logits[11], logits[12] = 6.0, 5.0, 4.9, 4.8
    params = SamplingParams(do_sample=True, repetition_penalty=3.0, top_k=2)
    truth = oracle(logits, [7], params)
    stages = summarised(logits, [7], params, chosen=11, top_n=2)
    assert 7 not in stages[-1].token_ids
    assert token_decision(0, event(0, 11, stages)).argmax_removed_by == truth.argmax_removed_by == "top_k"


def random_answer(params: SamplingParams, length: int = 40, seed: int = 0) -> tuple[list[TokenEvent], list[Oracle]]:
    """A made-up answer: random logits per step, the context growing with the chosen tokens, the token drawn from
    the final distribution (argmax for greedy) as the engine does."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, VOCAB, (20,), generator=gen).tolist()
    events, truths = [], []
    for step in range(length):
        logits = torch.randn(VOCAB, generator=gen) * 2.5
        # Now and then the model's favourite repeats a context token, so the penalty has something to do.
        if step % 3 == 0:
            logits[context[-1]] = logits.max() + 0.2
        truth = oracle(logits, context, params)
        final = truth.probs[-1]
        chosen = int(torch.argmax(final)) if params.greedy else int(torch.multinomial(final, 1, generator=gen))
        events.append(event(step, chosen, summarised(logits, context, params, chosen)))
        truths.append(truth)
        context.append(chosen)
    return events, truths


@pytest.mark.parametrize("params", CASES, ids=["all", "top-p", "min-p", "top-k+penalty", "greedy+penalty"])
def test_decisions_match_the_oracle_token_by_token(params):
    events, truths = random_answer(params)
    decisions = token_decisions(events)
    assert [d.index for d in decisions] == list(range(len(events)))
    for d, e, truth in zip(decisions, events, truths):
        assert d.raw_top == truth.raw_argmax
        assert d.final_top == int(torch.argmax(truth.probs[-1]))
        assert list(d.changed_by) == truth.changed
        assert d.argmax_removed_by == truth.argmax_removed_by
        assert d.not_argmax == (e.token_id != truth.raw_argmax)
        assert [name for name, _ in d.removed] == truth.names[1:]
        assert [m for _, m in d.removed] == pytest.approx(truth.removed[1:], abs=2e-6)
    expect_changed = [i for i, t in enumerate(truths) if t.changed]
    expect_removed = [i for i, t in enumerate(truths) if t.argmax_removed_by]
    expect_not_argmax = [i for i, (e, t) in enumerate(zip(events, truths)) if e.token_id != t.raw_argmax]
    assert decided_indices(decisions, "changed") == expect_changed
    assert decided_indices(decisions, "removed_argmax") == expect_removed
    assert decided_indices(decisions, "not_argmax") == expect_not_argmax
    if "repetition_penalty" in truths[0].names:
        assert expect_changed, "the crafted repeats should make the penalty move the top somewhere"
        assert decided_indices(decisions, "changed", stage="repetition_penalty") == expect_changed
        assert decided_indices(decisions, "changed", stage="top_p") == []


def test_summary_counts_for_a_sampled_answer_match_the_oracle():
    params = CASES[0]
    events, truths = random_answer(params, length=48, seed=3)
    lines = answer_summary(token_decisions(events))
    changed = sum("repetition_penalty" in t.changed for t in truths)
    misses = sum(e.token_id != t.raw_argmax for e, t in zip(events, truths))
    top_p = [t.removed[t.names.index("top_p")] for t in truths]
    assert changed and misses
    assert f"repetition penalty changed the top token of {changed} of 48 tokens" in lines
    assert f"the chosen token was not the raw argmax at {misses} of 48 tokens" in lines
    cut = sum(t.argmax_removed_by == "top_p" for t in truths)
    assert cut and f"top-p removed the raw argmax at {cut} tokens" in lines
    average = sum(top_p) / len(top_p)
    line = next(x for x in lines if x.startswith("top-p removed ") and "of the probability" in x)
    shown = float(line.split()[2].removesuffix("%"))  # one decimal, as every percentage on screen
    assert shown == pytest.approx(average * 100, abs=0.051), line
    # Filters keep the previous top, and temperature keeps the order: no line may claim they changed it.
    assert not any(x.startswith(("top-p changed", "top-k changed", "min-p changed", "temperature changed"))
                   for x in lines)


def test_summary_of_a_greedy_run_with_only_the_penalty():
    events, truths = random_answer(CASES[-1], length=30, seed=4)
    lines = answer_summary(token_decisions(events))
    changed = sum(bool(t.changed) for t in truths)
    assert changed
    assert lines == [f"repetition penalty changed the top token of {changed} of 30 tokens",
                     f"the chosen token was not the raw argmax at {changed} of 30 tokens"]


def test_summary_of_plain_greedy_and_of_runs_without_stages():
    events, _ = random_answer(SamplingParams(do_sample=False), length=5)
    assert answer_summary(token_decisions(events)) == [
        "no processor ran: only the model's own distribution was recorded",
        "the chosen token was the raw argmax at all 5 tokens"]
    penalty_idle = [event(i, e.token_id, (e.stages[0], StageTopN("repetition_penalty", e.stages[0].token_ids,
                                                                 e.stages[0].probs, e.stages[0].chosen_prob,
                                                                 argmax_prob=e.stages[0].probs[0])))
                    for i, e in enumerate(events)]
    assert answer_summary(token_decisions(penalty_idle))[0] == (
        "no stage changed the top token at any of the 5 tokens (stages: repetition penalty)")
    beam = [event(i, 4, (StageTopN("beam", (4,), (0.9,), 0.9),)) for i in range(3)]
    assert answer_summary(token_decisions(beam)) == [
        "beam search: each token carries its beam transition probability, not per-stage distributions"]
    bare = [event(i, 4, ()) for i in range(3)]
    assert answer_summary(token_decisions(bare)) == ["no per-stage distributions were recorded for these 3 tokens"]
    assert decided_indices(token_decisions(bare), "not_argmax") == []
    assert answer_summary([]) == []


def test_ties_are_not_changes():
    """Two tokens of exactly equal probability may come out of top-k in either order: not a change of the top."""
    raw = StageTopN("raw", (5, 9, 2), (0.4, 0.4, 0.2), chosen_prob=0.4, argmax_prob=0.4)
    swapped = StageTopN("temperature", (9, 5, 2), (0.45, 0.45, 0.1), chosen_prob=0.45, argmax_prob=0.45)
    d = token_decision(0, event(0, 9, (raw, swapped)))
    assert d.changed_by == () and d.not_argmax is False and d.below_final_top is False


def test_old_records_say_unknown_instead_of_zero():
    """A run saved before `removed` / `argmax_prob` existed: tops and the argmax still come from the top-N, the
    removed mass is reported as not recorded, never as 0 %."""
    logits, context, params = crafted_penalty_then_top_k()
    stages = summarised(logits, context, params, chosen=3)
    old = tuple(StageTopN(s.name, s.token_ids, s.probs, s.chosen_prob) for s in stages)
    d = token_decision(0, event(0, 3, old))
    assert d.changed_by == ("repetition_penalty",)
    assert d.argmax_removed_by == "top_k"  # top-k 1 lists zeros, so the absent favourite is known to be 0
    assert all(mass is None for _, mass in d.removed)
    lines = answer_summary([d])
    assert not any("of the probability on average" in line for line in lines)
    assert any("removed probability was not recorded" in line for line in lines)


def test_unknown_kind_and_stage_misuse_are_refused():
    decisions = token_decisions(random_answer(CASES[1], length=3)[0])
    with pytest.raises(ValueError, match="unknown decision kind 'argmax'"):
        decided_indices(decisions, "argmax")
    with pytest.raises(ValueError, match="'not_argmax' takes no stage"):
        decided_indices(decisions, "not_argmax", stage="top_p")


def test_marks_name_what_decided():
    logits, context, params = crafted_penalty_then_top_k()
    d = token_decision(2, event(2, 3, summarised(logits, context, params, chosen=3)))
    assert decision_marks([d]) == {2: "repetition penalty changed the top token; top-k removed the raw argmax; "
                                      "not the raw argmax"}


# --- on the engine ------------------------------------------------------------------------------------------------

ENGINE_CASES = [
    SamplingParams(do_sample=True, temperature=0.9, top_k=8, top_p=0.7, repetition_penalty=1.4, max_new_tokens=24,
                   seed=3),
    SamplingParams(do_sample=True, temperature=1.2, min_p=0.1, repetition_penalty=1.2, max_new_tokens=24, seed=8),
    SamplingParams(do_sample=False, repetition_penalty=1.6, max_new_tokens=24),
]


@pytest.mark.parametrize("params", ENGINE_CASES, ids=["topk-topp", "minp", "greedy"])
def test_engine_stages_keep_the_invariants(tiny_lm, params):
    """Invariants that tie the new fields to the recorded numbers (each would break on a wrong mass or index):
    a filter scales every token it keeps by 1 / (1 - removed), so the chosen token's (always kept) and the raw
    argmax's (while kept) probabilities must follow; a stage that cuts the argmax removed at least its mass."""
    run = collect(generate(tiny_lm, messages=[{"role": "user", "content": "写一个 Python 函数 hello"}],
                           params=params, top_n=8, ignore_eos=True))
    tokens = run["tokens"]
    assert len(tokens) == 24
    filters_cut = 0
    for t in tokens:
        raw = t.stages[0]
        assert raw.name == "raw" and raw.removed == 0.0
        assert raw.argmax_prob == raw.probs[0] == max(raw.probs)
        for before, here in zip(t.stages, t.stages[1:]):
            assert 0.0 <= here.removed <= 1.0
            if here.name in ("repetition_penalty", "temperature"):
                assert here.removed == 0.0
                assert here.argmax_prob > 0
                continue
            kept = 1.0 - here.removed
            filters_cut += here.removed > 0
            assert here.chosen_prob * kept == pytest.approx(before.chosen_prob, rel=1e-4, abs=1e-7)
            if here.argmax_prob > 0:
                assert here.argmax_prob * kept == pytest.approx(before.argmax_prob, rel=1e-4, abs=1e-7)
            else:
                assert here.removed >= before.argmax_prob - 1e-6
            if here.removed == 0.0:
                assert here.probs == pytest.approx(before.probs, abs=1e-7)
    if not params.greedy:
        assert filters_cut, "the filters never cut anything: the invariants above were not exercised"
    decisions = token_decisions(tokens)
    assert [d.not_argmax for d in decisions] == [t.token_id != t.stages[0].token_ids[0] for t in tokens]
    if params.greedy:  # greedy takes the final argmax: only the penalty can make it differ from the raw one
        assert decided_indices(decisions, "not_argmax") == decided_indices(decisions, "changed")
        assert all(d.final_top == d.token_id for d in decisions)


def test_new_fields_survive_json_and_the_engine_run_summarises(tiny_lm):
    params = ENGINE_CASES[0]
    record = RunRecord(run_id=1, model="tiny-qwen2", settings=params.to_dict())
    record.extend(generate(tiny_lm, messages=[{"role": "user", "content": "hi"}], params=params, top_n=4,
                           ignore_eos=True))
    again = run_from_json(run_to_json(record))
    assert again == record
    assert any(s.removed > 0 for t in again.tokens for s in t.stages)
    assert all(s.argmax_prob is not None and not math.isnan(s.argmax_prob) for t in again.tokens for s in t.stages)
    lines = answer_summary(token_decisions(again.tokens))
    assert any(line.startswith("top-k removed ") and "of the probability on average" in line for line in lines)
