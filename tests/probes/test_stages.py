"""The sampling lab's stages equal transformers' generate on the same context (output_logits/output_scores),
and its sampler draws from the final distribution."""

from __future__ import annotations

import pytest
import torch

from qdemo.probes.stages import sample_counts, stage_distributions
from qdemo.sampling import SamplingParams

CONTEXT = [5, 17, 42, 99, 3, 250, 17]


def _first_step(lm, params: SamplingParams):
    ids = torch.tensor([CONTEXT])
    torch.manual_seed(0)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, output_logits=True,
                            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                            do_sample=params.do_sample, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, min_p=params.min_p or None,
                            repetition_penalty=params.repetition_penalty)
    return out.logits[0][0], out.scores[0][0]


@pytest.mark.parametrize("params", [
    SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3),
    SamplingParams(do_sample=True, temperature=1.5, min_p=0.05),
    SamplingParams(do_sample=False, repetition_penalty=1.2),
])
def test_stages_equal_generate(tiny_lm, params):
    raw, final = _first_step(tiny_lm, params)
    stages = stage_distributions(raw, CONTEXT, params, top_n=10)
    for stage, reference in ((stages[0], raw), (stages[-1], final)):
        probs = torch.softmax(reference.float(), dim=-1)
        top = torch.topk(probs, 10)
        assert list(stage.token_ids) == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(stage.probs, dtype=torch.float64), top.values.double(), rtol=1e-5, atol=1e-7)
    assert stages[-1].chosen_prob == pytest.approx(max(stages[-1].probs))
    expected = ["raw"] + (["repetition_penalty"] if params.repetition_penalty != 1.0 else []) + (
        [n for n, on in (("temperature", params.temperature != 1.0), ("top_k", params.top_k != 0),
                         ("top_p", params.top_p < 1.0), ("min_p", params.min_p > 0)) if on]
        if params.do_sample else [])
    assert [s.name for s in stages] == expected


def test_chosen_token_reported_at_every_stage(tiny_lm):
    raw, _ = _first_step(tiny_lm, SamplingParams(do_sample=True, top_k=3))
    params = SamplingParams(do_sample=True, top_k=3)
    outside = int(torch.argsort(raw)[0])  # least likely: removed by top-k
    stages = stage_distributions(raw, CONTEXT, params, top_n=5, chosen=outside)
    assert stages[0].chosen_prob > 0 and stages[-1].chosen_prob == 0


def test_sampling_follows_the_final_distribution(tiny_lm):
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=4)
    raw, final = _first_step(tiny_lm, params)
    counts = sample_counts(raw, CONTEXT, params, n=10_000, seed=3)
    assert counts == sample_counts(raw, CONTEXT, params, n=10_000, seed=3)
    probs = torch.softmax(final.float(), dim=-1)
    assert set(counts) <= set(torch.nonzero(probs).flatten().tolist())
    for token, count in counts.items():
        assert count / 10_000 == pytest.approx(float(probs[token]), abs=0.02)
    greedy = sample_counts(raw, CONTEXT, SamplingParams(do_sample=False), n=7)
    assert greedy == {int(torch.argmax(raw)): 7}


@pytest.mark.parametrize("call,match", [
    (lambda raw: sample_counts(raw, CONTEXT, SamplingParams(), n=0), "number of samples"),
    (lambda raw: sample_counts(raw, [], SamplingParams(), n=3), "context is empty"),
    (lambda raw: stage_distributions(raw.reshape(1, -1), CONTEXT, SamplingParams()), "one vector"),
    (lambda raw: stage_distributions(raw, CONTEXT, SamplingParams(), chosen=10**6), "outside the vocabulary"),
])
def test_bad_lab_input_is_explained(tiny_lm, call, match):
    raw, _ = _first_step(tiny_lm, SamplingParams())
    with pytest.raises(ValueError, match=match):
        call(raw)
