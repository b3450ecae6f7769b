"""The chain on the surviving tokens against transformers' processors on the full vocabulary (qdemo.core.chain's
run_chain, which applies them as generate does), and the fast draw's distribution by a chi-square test."""

from __future__ import annotations

import math

import pytest
import torch

from qdemo.core.chain import run_chain, summarise
from qdemo.core.support import draw, run_on_support
from qdemo.core.support_summary import summarise_chained
from qdemo.sampling import SamplingParams, build_stages

CASES = {
    "top-k only": SamplingParams(do_sample=True, top_k=20),
    "top-p only": SamplingParams(do_sample=True, top_p=0.8),
    "top-k and top-p": SamplingParams(do_sample=True, top_k=20, top_p=0.8),
    "min-p only": SamplingParams(do_sample=True, min_p=0.05),
    "the models' defaults": SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                                           repetition_penalty=1.05),
    "temperature 1.6, top-p 0.95, min-p": SamplingParams(do_sample=True, temperature=1.6, top_p=0.95, min_p=0.02),
    "repetition penalty 1.3, top-k 50": SamplingParams(do_sample=True, repetition_penalty=1.3, top_k=50),
    "no filter": SamplingParams(do_sample=True, temperature=0.9),
}


def logits_like_a_model(size: int, seed: int) -> torch.Tensor:
    """[1, size] logits with a model's shape: a few likely tokens over a long, heavy tail."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, size, generator=g) * 2.5 + torch.linspace(6, 0, size) ** 1.5 / 3).float()


SEQ = torch.tensor([[3, 7, 7, 11, 40]])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", [151_936, 300])
def test_every_stage_equals_transformers_on_the_full_vocabulary(case, size):
    params = CASES[case]
    for seed in range(3):
        logits = logits_like_a_model(size, seed)
        scores, names, probs = run_chain(logits, SEQ, build_stages(params), keep=True)
        ours = run_on_support(logits, SEQ, build_stages(params), keep=True)
        assert ours.names == names
        for stage, theirs, mine in zip(names, probs, ours.probs):
            assert torch.allclose(mine, theirs, atol=1e-6, rtol=0), (case, stage)
            assert torch.equal(mine > 0, theirs > 0), (case, stage)  # the same tokens survive
        assert torch.equal(ours.full_scores() > float("-inf"), scores > float("-inf"))
        assert torch.allclose(torch.softmax(ours.full_scores(), -1), torch.softmax(scores, -1), atol=1e-6, rtol=0)


def test_top_k_keeps_every_token_tied_at_its_edge():
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.5] + [0.0] * 100])
    params = SamplingParams(do_sample=True, top_k=3)
    scores, _, _ = run_chain(logits, SEQ, build_stages(params), keep=False)
    ours = run_on_support(logits, SEQ, build_stages(params), keep=False)
    assert sorted(ours.support.tolist()) == [0, 1, 2, 3, 4] == (scores[0] > float("-inf")).nonzero().squeeze(1).tolist()


def chi_square_limit(df: int, z: float = 3.09) -> float:
    """The chi-square value a sample exceeds with probability 0.001 (Wilson–Hilferty, z of the 99.9th percentile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


DRAWS = 12_000


@pytest.mark.parametrize("case", CASES)
def test_the_fast_draw_follows_the_chains_distribution(case):
    """≥ 10,000 fast draws per case against the final distribution transformers' processors give; tokens expected
    fewer than 5 times are pooled into one bin, as a chi-square test needs."""
    params = CASES[case]
    logits = logits_like_a_model(2000, 5)
    scores, _, _ = run_chain(logits, SEQ, build_stages(params), keep=False)
    expected = torch.softmax(scores, -1)[0].double() * DRAWS
    chained = run_on_support(logits, SEQ, build_stages(params), keep=False)
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros_like(expected)
    for _ in range(DRAWS):
        counts[int(draw(chained, generator))] += 1
    assert counts[expected == 0].sum() == 0  # never a token the chain removed
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if wanted[-1] < 5:
        observed, wanted = observed[:-1], wanted[:-1]
        observed[-1] += counts[~big].sum()
        wanted[-1] += expected[~big].sum()
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    assert int(big.sum()) >= 4, case  # enough bins for the test to mean something
    assert statistic < chi_square_limit(len(wanted) - 1), (case, statistic, len(wanted))


def test_the_exact_draw_is_torchs_multinomial_over_the_full_vocabulary():
    params = CASES["the models' defaults"]
    logits = logits_like_a_model(151_936, 2)
    scores, _, _ = run_chain(logits, SEQ, build_stages(params), keep=False)
    chained = run_on_support(logits, SEQ, build_stages(params), keep=False)
    ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(50):
        expected = torch.multinomial(torch.softmax(scores, -1), 1, generator=theirs).squeeze(1)
        assert torch.equal(draw(chained, ours, exact=True), expected)


def test_a_seeded_fast_draw_repeats_itself():
    chained = run_on_support(logits_like_a_model(151_936, 4), SEQ, build_stages(CASES["no filter"]), keep=False)
    first, second = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [int(draw(chained, first)) for _ in range(30)] == [int(draw(chained, second)) for _ in range(30)]


@pytest.mark.parametrize("case", [*CASES, "greedy, penalty"])
@pytest.mark.parametrize("top_n", [20, 5, 40])
def test_the_summaries_equal_the_full_vocabulary_ones(case, top_n):
    """Every number the token view and the stage bars show, from the chain on its support, against the same logits
    summarised the full way (transformers' processors, every stage's whole distribution ranked)."""
    params = CASES.get(case) or SamplingParams(do_sample=False, repetition_penalty=1.3)
    for seed in range(3):
        logits = logits_like_a_model(151_936, seed)
        _, names, probs = run_chain(logits, SEQ, build_stages(params), keep=True)
        chained = run_on_support(logits, SEQ, build_stages(params), keep=True)
        token = torch.tensor([int(torch.argmax(probs[-1]))]) if params.greedy else draw(chained, None)
        want_id, want = summarise(names, probs, token, top_n)
        got_id, got = summarise_chained(chained, token, top_n)
        assert got_id == want_id == int(token)
        for a, b in zip(got, want, strict=True):
            assert a.name == b.name and len(a.token_ids) == len(b.token_ids) == top_n
            listed = [t for t, p in zip(b.token_ids, b.probs) if p > 0]
            assert list(a.token_ids[:len(listed)]) == listed, (case, a.name)  # the same tokens, the same order
            assert a.probs == pytest.approx(b.probs, abs=1e-6) and all(p == 0 for p in a.probs[len(listed):])
            assert a.chosen_prob == pytest.approx(b.chosen_prob, abs=1e-6)
            assert a.argmax_prob == pytest.approx(b.argmax_prob, abs=1e-6)
            assert a.removed == pytest.approx(b.removed, abs=1e-6)
