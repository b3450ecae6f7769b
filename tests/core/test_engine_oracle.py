"""The engine against transformers' own generate(): greedy token-for-token, seeded sampling
token-for-token, and every step's raw / final stage against output_logits / output_scores."""

from __future__ import annotations

import pytest
import torch

from qdemo.core.engine import collect, generate
from qdemo.sampling import SamplingParams

PROMPT = [{"role": "user", "content": "Hello world, 你好！"}]


def hf_generate(lm, ids, params: SamplingParams, seed: int | None = None):
    input_ids = torch.tensor([ids])
    kwargs = dict(
        max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
        repetition_penalty=params.repetition_penalty, return_dict_in_generate=True,
        output_scores=True, output_logits=True, attention_mask=torch.ones_like(input_ids),
        eos_token_id=sorted(lm.eos_token_ids | lm.stop_token_ids), pad_token_id=lm.tokenizer.pad_token_id,
    )
    if not params.greedy:
        kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                      min_p=params.min_p or None)
    if seed is not None:
        torch.manual_seed(seed)
    out = lm.model.generate(input_ids, **kwargs)
    return out.sequences[0, len(ids):].tolist(), out


def prompt_ids(lm):
    from qdemo.models.prompting import build_prompt

    return build_prompt(lm.tokenizer, PROMPT, lm.spec.max_context, 32, lm.spec.system_prompt).ids


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_matches_generate(tiny_lm, repetition_penalty):
    params = SamplingParams(do_sample=False, repetition_penalty=repetition_penalty, max_new_tokens=24)
    ids = prompt_ids(tiny_lm)
    expected, _ = hf_generate(tiny_lm, ids, params)
    run = collect(generate(tiny_lm, messages=PROMPT, params=params))
    assert list(run["prefill"].prompt_ids) == ids
    assert [t.token_id for t in run["tokens"]] == expected
    assert list(run["done"].token_ids) == expected


SAMPLING_CASES = [
    SamplingParams(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=20, seed=7),
    SamplingParams(do_sample=True, temperature=1.3, repetition_penalty=1.2, min_p=0.05, max_new_tokens=20, seed=11),
    SamplingParams(do_sample=True, temperature=1.0, max_new_tokens=20, seed=3),
]


@pytest.mark.parametrize("params", SAMPLING_CASES, ids=["topk-topp", "penalty-minp", "plain"])
def test_seeded_sampling_matches_generate(tiny_lm, params):
    ids = prompt_ids(tiny_lm)
    expected, out = hf_generate(tiny_lm, ids, params, seed=params.seed)
    run = collect(generate(tiny_lm, input_ids=ids, params=params, exact_draw=True))
    tokens = run["tokens"]
    assert [t.token_id for t in tokens] == expected
    assert run["prefill"].seed == params.seed
    for step, event in enumerate(tokens):
        raw, last = event.stages[0], event.stages[-1]
        assert raw.name == "raw"
        _assert_stage_matches(raw, torch.softmax(out.logits[step][0].float(), -1), event.token_id)
        _assert_stage_matches(last, torch.softmax(out.scores[step][0].float(), -1), event.token_id)


def _assert_stage_matches(stage, probs: torch.Tensor, chosen: int) -> None:
    ours_ids = torch.tensor(stage.token_ids)
    assert torch.allclose(torch.tensor(stage.probs, dtype=torch.float32), probs[ours_ids], atol=1e-7, rtol=0)
    reference_top = torch.topk(probs, len(stage.token_ids)).values
    assert torch.allclose(torch.tensor(stage.probs, dtype=torch.float32), reference_top, atol=1e-7, rtol=0)
    assert stage.chosen_prob == pytest.approx(float(probs[chosen]), abs=1e-7)


def test_stage_names_follow_transformers_order(tiny_lm):
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.02,
                            repetition_penalty=1.1, max_new_tokens=3, seed=1)
    run = collect(generate(tiny_lm, messages=PROMPT, params=params, top_n=20))
    for event in run["tokens"]:
        assert [s.name for s in event.stages] == ["raw", "repetition_penalty", "temperature", "top_k", "top_p",
                                                  "min_p"]
        assert all(len(s.token_ids) == 20 for s in event.stages)
        assert event.stages[-1].chosen_prob > 0
        # top-k leaves exactly k tokens with mass: the 10 kept ones sum to 1, the rest of the top-20 are 0
        top_k_stage = event.stages[3]
        assert all(p > 0 for p in top_k_stage.probs[:10]) and all(p == 0 for p in top_k_stage.probs[10:])
        assert sum(top_k_stage.probs[:10]) == pytest.approx(1.0, abs=1e-5)
        # the raw stage still has mass beyond the 10th token: top-k removed it
        assert event.stages[0].probs[10] > 0


def test_greedy_stages_only_raw_and_penalty(tiny_lm):
    params = SamplingParams(do_sample=True, temperature=0.0, top_k=5, repetition_penalty=1.2, max_new_tokens=4)
    run = collect(generate(tiny_lm, messages=PROMPT, params=params))
    assert params.greedy and run["prefill"].seed is None
    for event in run["tokens"]:
        assert [s.name for s in event.stages] == ["raw", "repetition_penalty"]
        # greedy picks the top token of the last stage
        assert event.token_id == event.stages[-1].token_ids[0]


def test_same_seed_same_text_different_seed_differs(tiny_lm):
    base = SamplingParams(do_sample=True, temperature=1.5, max_new_tokens=16, seed=5)
    a = collect(generate(tiny_lm, messages=PROMPT, params=base))["done"].token_ids
    b = collect(generate(tiny_lm, messages=PROMPT, params=base))["done"].token_ids
    c = collect(generate(tiny_lm, messages=PROMPT, params=base.replace(seed=6)))["done"].token_ids
    assert a == b
    assert a != c
