"""Compare on one model: one prefill forked into two rows decoded as one batch; each side equals its solo run."""

from __future__ import annotations

import pytest

from qdemo.core.engine import collect, generate
from qdemo.models.registry import load_registry
from qdemo.probes.introspect import next_token_logits
from qdemo.probes.stages import stage_distributions
from qdemo.sampling import SamplingParams
from qdemo.services import compare
from qdemo.services.admission import Services
from qdemo.serving.limits import Client, Limits
from qdemo.serving.pool import ModelPool
from tests.conftest import write_registry


def test_one_model_compare_shares_its_prefill_and_equals_the_solo_runs(tiny_dir, tmp_path, tiny_lm):
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024))
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    greedy = SamplingParams(max_new_tokens=10)
    sampled = SamplingParams(do_sample=True, temperature=0.5, top_k=3, max_new_tokens=14)  # seed 4: agrees 4 steps
    lm = services.pool.get(registry.default)
    forwards = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda *a: forwards.append(1))
    try:
        final = list(compare.compare(services, None, "c", "Write a haiku.", "", "", greedy, sampled, 4, 1))[-1]
    finally:
        handle.remove()
    assert final.done and final.report["level"] == "token"
    prompt = list(final.a.prefill.prompt_ids)
    assert prompt == list(final.b.prefill.prompt_ids)
    for run, params in ((final.a, greedy), (final.b, sampled)):
        solo = collect(generate(tiny_lm, input_ids=prompt, params=params.replace(seed=4)))
        assert run.done.token_ids == solo["done"].token_ids
    steps = max(len(final.a.tokens), len(final.b.tokens))
    step = final.report["step"]
    assert step is not None and step > 0  # a divergence after shared tokens: the case the kept state serves
    # One prefill, one forward per step for both sides, and one more for both cross-probabilities: the run's kept
    # state already holds the shared context but its last token.
    assert len(forwards) == 1 + (steps - 1) + 1
    # The oracle: the model's own full forward over the shared context, through each side's own stage chain.
    context = prompt + [t.token_id for t in final.a.tokens[:step]]
    logits = next_token_logits(tiny_lm, context)
    for params, other, key in ((greedy, final.report["b_token"], "a"), (sampled, final.report["a_token"], "b")):
        stages = stage_distributions(logits, context, params, top_n=1, chosen=other)
        assert final.report[f"{key}_raw_prob_of_{'b' if key == 'a' else 'a'}"] == pytest.approx(
            stages[0].chosen_prob, abs=1e-6)
        assert final.report[f"{key}_prob_of_{'b' if key == 'a' else 'a'}"] == pytest.approx(
            stages[-1].chosen_prob, abs=1e-6)


def test_a_clients_next_compare_reuses_its_prompt_and_no_one_elses(tiny_dir, tmp_path, tiny_lm):
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024))
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    greedy = SamplingParams(max_new_tokens=6)
    sampled = SamplingParams(do_sample=True, temperature=1.2, top_k=40, max_new_tokens=6)
    alice, bob = Client(session="alice", address="10.0.0.1"), Client(session="bob", address="10.0.0.2")
    first = list(compare.compare(services, None, alice, "写一首诗 about the sea", "", "", greedy, sampled, 5, 1))[-1]
    again = list(compare.compare(services, None, alice, "写一首诗 about the sea", "", "", greedy, sampled, 5, 1))[-1]
    other = list(compare.compare(services, None, bob, "写一首诗 about the sea", "", "", greedy, sampled, 5, 1))[-1]
    prompt = list(first.a.prefill.prompt_ids)
    assert first.a.prefill.reused_tokens == 0
    assert again.a.prefill.reused_tokens == len(prompt) - 1  # all but the token whose logits choose the first
    assert again.b.prefill.reused_tokens == len(prompt) - 1  # one shared prefill serves both rows
    assert other.a.prefill.reused_tokens == 0  # never another client's state
    for run in (again, other):
        assert run.a.done.token_ids == first.a.done.token_ids and run.b.done.token_ids == first.b.done.token_ids
        assert run.report == first.report


def test_where_a_batch_of_two_does_not_pay_the_sides_run_one_after_the_other_from_one_prefill(tiny_dir, tmp_path,
                                                                                               tiny_lm):
    """Issue 20: a Compare must never be slower than its sides one after the other. On a model whose two-row steps
    have cost more than two single steps, A runs to its end, then B from the same state (only the prompt's last
    token is fed again); each side still equals its solo run, and the status says why B waits."""
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024))
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    lm = services.pool.get(registry.default)
    for _ in range(8):
        lm.step_costs.add(1, 0.010)
        lm.step_costs.add(2, 0.025)
    greedy = SamplingParams(max_new_tokens=10)
    sampled = SamplingParams(do_sample=True, temperature=0.5, top_k=3, max_new_tokens=14)
    fed: list[int] = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: fed.append(a[0].shape[0]))
    try:
        updates = list(compare.compare(services, None, "c", "Write a haiku.", "", "", greedy, sampled, 4, 1))
    finally:
        handle.remove()
    final = updates[-1]
    assert compare.SEQUENTIAL_NOTE in updates[0].status and compare.SEQUENTIAL_NOTE in final.status
    assert all(len(u.b.tokens) == 0 or u.a.done is not None for u in updates)  # B starts once A has ended
    assert set(fed) == {1}  # never a batch of two rows
    prompt = list(final.a.prefill.prompt_ids)
    assert final.b.prefill.reused_tokens == len(prompt)  # B feeds nothing: A's prefill and its last logits
    for run, params in ((final.a, greedy), (final.b, sampled)):
        solo = collect(generate(tiny_lm, input_ids=prompt, params=params.replace(seed=4)))
        assert run.done.token_ids == solo["done"].token_ids
    assert final.report["step"] == 4 and final.report["a_prob_of_b"] is not None


def test_the_engine_times_its_decode_steps_by_rows(tiny_dir, tmp_path, tiny_lm):
    from qdemo.core.engine import generate_rows

    before = len(tiny_lm.step_costs._seen.get(2, ()))
    list(generate_rows(tiny_lm, [1, 2, 3], [SamplingParams(max_new_tokens=6)] * 2, ignore_eos=True))
    assert len(tiny_lm.step_costs._seen[2]) == min(before + 5, 32)  # one per decode forward after the prefill
