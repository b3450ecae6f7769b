"""Speculative decoding: greedy output equals the target alone; sampled output follows the target's distribution
(the acceptance rule on its own, and end to end); proposals, acceptances and the gate are all accounted for."""

from __future__ import annotations

import copy
import threading
from collections import Counter

import pytest
import torch

from qdemo.core.engine import collect, generate, generate_assisted
from qdemo.core.speculative import SpeculativeDecoder
from qdemo.forwards.gate import StepGate
from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry
from qdemo.sampling import SamplingParams
from tests.conftest import write_registry, write_tiny_qwen2

PROMPT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def near_draft_lm(tiny_dir, tmp_path_factory):
    """The target with noise on its output head: a draft that is right about half the time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("near-draft")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(5)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * model.lm_head.weight.std() * 0.7)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    registry = load_registry(write_registry(tmp_path_factory.mktemp("near-reg") / "models.yaml", path,
                                            name="near-draft"))
    return load_model(registry.get("near-draft"), device="cpu")


@pytest.fixture(scope="module")
def draft_lm(tmp_path_factory):
    """Another tiny Qwen2 with the same tokenizer and different weights: a draft that is often wrong."""
    path = write_tiny_qwen2(tmp_path_factory.mktemp("draft"), seed=1, num_hidden_layers=1)
    registry = load_registry(write_registry(tmp_path_factory.mktemp("draft-reg") / "models.yaml", path,
                                            name="tiny-draft"))
    return load_model(registry.get("tiny-draft"), device="cpu")


def prompt_ids(lm):
    return collect(generate(lm, messages=PROMPT, params=SamplingParams(max_new_tokens=1)))["prefill"].prompt_ids


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_exactly_the_targets(tiny_lm, draft_lm, k):
    ids = list(prompt_ids(tiny_lm))
    params = SamplingParams(max_new_tokens=24)
    alone = collect(generate(tiny_lm, input_ids=ids, params=params, ignore_eos=True))
    assisted = collect(generate_assisted(tiny_lm, draft_lm, ids, params, draft_tokens=k, ignore_eos=True))
    assert assisted["done"].token_ids == alone["done"].token_ids
    stats = assisted["done"].stats
    assert 0 <= stats.draft_accepted <= stats.draft_proposed
    assert sum(t.drafted for t in assisted["tokens"]) == stats.draft_accepted  # no round was cut by the limit
    for a, b in zip(assisted["tokens"], alone["tokens"]):
        assert a.stages[0].probs == pytest.approx(b.stages[0].probs, abs=1e-4)


def test_a_perfect_draft_has_every_proposal_accepted(tiny_lm):
    ids = list(prompt_ids(tiny_lm))
    run = collect(generate_assisted(tiny_lm, tiny_lm, ids, SamplingParams(max_new_tokens=16), draft_tokens=3,
                                    ignore_eos=True))
    stats = run["done"].stats
    assert stats.draft_proposed > 0 and stats.draft_accepted == stats.draft_proposed


def test_the_acceptance_rule_draws_from_the_targets_distribution(tiny_lm):
    """Accept x ~ q with probability min(1, p/q), else draw from max(0, p - q): the result is distributed as p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    decoder = SpeculativeDecoder(target=tiny_lm, draft=tiny_lm, target_state=None, draft_state=None,
                                 target_lock=None, draft_lock=None, stages=[], greedy=False, k=1,
                                 generator=torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(1)
    counts: Counter = Counter()
    n = 40_000
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=draws))
        counts[x if decoder._accept(x, p, q) else decoder._resample(p, q)] += 1
    empirical = torch.tensor([counts[i] / n for i in range(5)])
    assert torch.allclose(empirical, p, atol=0.012), empirical


@pytest.mark.slow  # 600 short runs
def test_sampled_answers_follow_the_targets_distribution_end_to_end(tiny_lm, near_draft_lm):
    """The first token of 600 seeded speculative runs (k = 1: the draft proposes it) against the target's own
    first-token distribution after the same sampling chain."""
    ids = list(prompt_ids(tiny_lm))
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=8, max_new_tokens=2)
    alone = collect(generate(tiny_lm, input_ids=ids, params=params.replace(seed=0), top_n=8))
    final = alone["tokens"][0].stages[-1]
    expected = dict(zip(final.token_ids, final.probs))
    counts: Counter = Counter()
    runs = 600
    proposed = accepted = 0
    for seed in range(runs):
        run = collect(generate_assisted(tiny_lm, near_draft_lm, ids, params.replace(seed=seed), draft_tokens=1,
                                        top_n=0, ignore_eos=True))
        counts[run["done"].token_ids[0]] += 1
        proposed += run["done"].stats.draft_proposed
        accepted += run["done"].stats.draft_accepted
    distance = 0.5 * sum(abs(counts[t] / runs - expected.get(t, 0.0)) for t in set(counts) | set(expected))
    assert distance < 0.08, (distance, counts, expected)
    assert proposed == runs and 0 < accepted < proposed  # the draft is sometimes right, sometimes not


def test_both_models_step_through_their_gates(tiny_lm, draft_lm):
    ids = list(prompt_ids(tiny_lm))
    target_gate, draft_gate = StepGate(), StepGate()
    held = {"target": [], "draft": []}
    handles = [tiny_lm.model.get_input_embeddings().register_forward_hook(
                   lambda *a: held["target"].append(target_gate.held_here())),
               draft_lm.model.get_input_embeddings().register_forward_hook(
                   lambda *a: held["draft"].append(draft_gate.held_here()))]
    try:
        collect(generate_assisted(tiny_lm, draft_lm, ids, SamplingParams(max_new_tokens=12), draft_tokens=3,
                                  target_lock=target_gate.step, draft_lock=draft_gate.step))
    finally:
        for handle in handles:
            handle.remove()
    assert held["target"] and held["draft"] and all(held["target"]) and all(held["draft"])
    assert target_gate.steps == len(held["target"]) and draft_gate.steps == len(held["draft"])


def test_drafts_that_do_not_share_the_tokenizer_are_refused(tiny_lm, draft_lm, monkeypatch):
    # Another tokenizer object (a loaded tokenizer's table is digested once and does not change in place).
    other = copy.copy(draft_lm.tokenizer)
    monkeypatch.setattr(other, "get_vocab", lambda: {"other": 0})
    monkeypatch.setattr(draft_lm, "tokenizer", other)
    with pytest.raises(ValueError, match="cannot draft for tiny-qwen2: their tokenizers differ"):
        generate_assisted(tiny_lm, draft_lm, [5, 6], SamplingParams(max_new_tokens=4))


def test_the_chat_drafts_with_the_registrys_draft_where_asked(tiny_dir, tmp_path, tiny_lm):
    from qdemo.services import chat
    from qdemo.services.admission import Services
    from qdemo.serving.limits import Limits
    from qdemo.serving.pool import ModelPool

    draft_dir = write_tiny_qwen2(tmp_path / "draft", seed=1, num_hidden_layers=1)
    path = write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024)
    text = path.read_text(encoding="utf-8").replace("    family: qwen2\n", "    family: qwen2\n    draft: tiny-draft\n",
                                                    1)
    text += (f"  - name: tiny-draft\n    family: qwen2\n    source: {{local: {{path: {draft_dir}}}}}\n"
             f"    dtype: float32\n    max_context: 1024\n")
    path.write_text(text, encoding="utf-8")
    registry = load_registry(path)
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model="tiny-qwen2",
                        limits=Limits(requests_per_minute=1000))
    params = SamplingParams(max_new_tokens=12)
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hello", [], services.limits)
    final = list(chat.answer(services, session, "c", begun.chat, "tiny-qwen2", "", params, 1, assisted=True))[-1]
    run = final.view.run
    assert run.done.stats.draft_proposed > 0 and "draft accepted" in final.metrics
    alone = collect(generate(tiny_lm, input_ids=list(run.prefill.prompt_ids), params=params))
    assert run.done.token_ids == alone["done"].token_ids
    session = chat.ChatSession()
    begun = chat.begin_turn(session, "hello", [], services.limits)
    auto = list(chat.answer(services, session, "c", begun.chat, "tiny-qwen2", "", params, 2))[-1]
    assert auto.view.run.done.stats.draft_proposed == 0  # on a CPU drafting does not pay: off unless asked


@pytest.mark.parametrize("ending", ["stopped", "time_limit"])
def test_stop_and_the_time_limit_end_the_assisted_prefill_between_chunks(tiny_lm, draft_lm, ending):
    """Like `generate`, an assisted run checks Stop and the time limit between prefill chunks: with either already
    due, a 120-token prompt in chunks of 8 ends after its first forward, with no token. Forwards are counted at the
    step gates."""
    ids = list(range(5, 125))
    params = SamplingParams(max_new_tokens=16)
    stop = threading.Event()
    stop.set()
    due = {"stop_event": stop} if ending == "stopped" else {"time_limit_s": 0.0}
    plain_gate, target_gate, draft_gate = StepGate(), StepGate(), StepGate()
    plain = collect(generate(tiny_lm, input_ids=ids, params=params, prefill_chunk=8, step_lock=plain_gate.step,
                             ignore_eos=True, **due))
    assert plain["done"].reason == ending and plain["tokens"] == [] and plain_gate.steps == 1
    run = collect(generate_assisted(tiny_lm, draft_lm, ids, params, draft_tokens=4, prefill_chunk=8,
                                    target_lock=target_gate.step, draft_lock=draft_gate.step, ignore_eos=True,
                                    **due))
    forwards = (target_gate.steps, draft_gate.steps)
    assert (run["done"].reason, len(run["tokens"]), forwards) == (ending, 0, (1, 0))
    assert run["prefill"].prompt_ids == tuple(ids) and run["done"].stats.new_tokens == 0
