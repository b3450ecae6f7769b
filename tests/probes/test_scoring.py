"""Scoring any text and the divergence of two models on one text (qdemo.probes.scoring, on decode.position_logits).

Oracles, independent of the code under test: ONE plain forward of the whole text (`lm.model(input_ids=…).logits`),
with log_softmax, gather, ranks, entropy and KL recomputed here. Chunks smaller than the text, so chunk boundaries
are crossed. The llama.cpp forward is checked against the torch fp32 path on the real default."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math

import pytest
import torch

from qdemo.core import decode
from qdemo.core.decode import position_logits
from qdemo.forwards.gate import StepGate
from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry
from qdemo.probes.scoring import (
    TextScore,
    divergence,
    same_tokenizer,
    score_ids,
)
from qdemo.serving.local import LocalBackend
from tests.conftest import write_registry, write_tiny_qwen2
from tests.family_checkpoints import LAYOUTS, load_family_models

FAMILIES = list(LAYOUTS)
NOLOCK = contextlib.nullcontext
TEXT = "The quick brown fox jumps over the lazy dog. def is_prime(n): return n > 1 你好，世界！"
LN2 = math.log(2.0)


# --- oracles --------------------------------------------------------------------------------------------------

def plain_logits(lm, ids) -> torch.Tensor:
    """fp32 [len(ids), V] logits from one forward of the whole text, no cache."""
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([list(ids)])).logits[0].float()


def f64(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64)


def oracle_scores(logits: torch.Tensor, ids, first: int = 1) -> dict[str, list]:
    out = {"logprob": [], "rank": [], "entropy_bits": [], "top1": []}
    for i in range(first, len(ids)):
        row = logits[i - 1].double()
        lp = row - torch.logsumexp(row, dim=0)
        out["logprob"].append(lp[ids[i]].item())
        out["rank"].append(1 + sum(1 for v in row.tolist() if v > row[ids[i]].item()))
        p = lp.exp()
        out["entropy_bits"].append(-(p * lp).sum().item() / LN2)
        out["top1"].append(int(row.argmax()))
    return out


def oracle_kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(P_a‖P_b) per row, fp64."""
    a, b = la.double(), lb.double()
    a, b = a - torch.logsumexp(a, -1, keepdim=True), b - torch.logsumexp(b, -1, keepdim=True)
    return (a.exp() * (a - b)).sum(-1)


def text_ids(lm, text: str = TEXT, minimum: int = 12) -> list[int]:
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= minimum, (lm.spec.name, len(ids))
    return ids


def assert_matches_oracle(score: TextScore, logits: torch.Tensor, ids, first: int = 1) -> None:
    want = oracle_scores(logits, ids, first)
    assert score.positions == tuple(range(first, len(ids))) and score.token_ids == tuple(ids[first:])
    assert score.count == len(ids) - first
    torch.testing.assert_close(f64(score.logprobs), f64(want["logprob"]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(f64(score.entropy_bits),
                               f64(want["entropy_bits"]), atol=1e-4, rtol=0)
    assert list(score.ranks) == want["rank"]
    assert list(score.top1_ids) == want["top1"]
    for lp, p, s in zip(score.logprobs, score.probs, score.surprisal_bits):
        assert p == pytest.approx(math.exp(lp)) and s == pytest.approx(-lp / LN2)
    nll = -sum(want["logprob"]) / len(want["logprob"])
    assert score.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert score.mean_surprisal_bits == pytest.approx(nll / LN2, rel=1e-5)
    assert score.top1_share == pytest.approx(sum(r == 1 for r in want["rank"]) / len(want["rank"]))


# --- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_env(tmp_path_factory):
    """All five families (and native Qwen2): original checkpoints through qdemo's loader, loaded once each."""
    return load_family_models(tmp_path_factory.mktemp("scoring-families"))


def _load_tiny(root, name: str, **overrides):
    model_dir = write_tiny_qwen2(root / name, **overrides)
    registry = load_registry(write_registry(root / f"{name}.yaml", model_dir, name=name))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QDEMO_CACHE", str(root / "cache"))
        return registry, load_model(registry.get(name), device="cpu")


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """Another random tiny Qwen2 (seed 1) with the same tokenizer as tiny_lm (seed 0)."""
    return _load_tiny(tmp_path_factory.mktemp("scoring-seed1"), "tiny-seed1", seed=1)[1]


@pytest.fixture(scope="module")
def tiny_bf16(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    return load_model(registry.get(registry.default), device="cpu", dtype="bfloat16")


class RecordingLock:
    """A StepLock that counts its entries and records which model's turn each one was."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name, self.held = log, name, False

    def __call__(self):
        @contextlib.contextmanager
        def held():
            assert not self.held
            self.held = True
            self.log.append(self.name)
            try:
                yield
            finally:
                self.held = False
        return held()


# --- position_logits ------------------------------------------------------------------------------------------

def test_position_logits_equal_one_plain_forward(tiny_lm):
    ids = text_ids(tiny_lm)
    full = plain_logits(tiny_lm, ids)
    for start in (0, 7):
        got = list(position_logits(tiny_lm, ids, NOLOCK, chunk=5, start=start))
        assert [s for s, _ in got] == [start] + [b for b in range(0, len(ids), 5) if b > start]
        rows = torch.cat([logits for _, logits in got])
        assert rows.dtype == torch.float32 and rows.shape == (len(ids) - start, tiny_lm.vocab_size)
        assert max(logits.shape[0] for _, logits in got) <= 5
        torch.testing.assert_close(rows, full[start:], atol=1e-4, rtol=1e-4)


def test_position_logits_one_forward_per_lock_entry_and_released_early(tiny_lm, monkeypatch):
    ids = text_ids(tiny_lm)
    states = []
    real_new_state = decode.new_state
    monkeypatch.setattr(decode, "new_state", lambda *a, **k: states.append(real_new_state(*a, **k)) or states[-1])
    forwards = []
    real_forward = decode._forward

    def forward(lm, state, columns, keep=1):
        assert lock.held, "a forward outside the lock"
        forwards.append(columns.shape[1])
        return real_forward(lm, state, columns, keep)

    monkeypatch.setattr(decode, "_forward", forward)
    log: list = []
    lock = RecordingLock(log, "a")
    assert len(list(position_logits(tiny_lm, ids, lock, chunk=4))) == math.ceil(len(ids) / 4)
    assert len(log) == len(forwards) == math.ceil(len(ids) / 4) and max(forwards) <= 4
    assert states[-1].cache is None  # released at the end
    gen = position_logits(tiny_lm, ids, lock, chunk=4)
    next(gen)
    assert states[-1].cache is not None
    gen.close()  # the consumer stops early
    assert states[-1].cache is None
    with pytest.raises(ValueError, match="start"):
        position_logits(tiny_lm, ids, lock, start=len(ids))  # checked at the call, before any iteration


# --- score_ids ------------------------------------------------------------------------------------------------

def test_score_ids_equal_one_plain_forward_on_tiny_qwen2(tiny_lm):
    ids = text_ids(tiny_lm)
    full = plain_logits(tiny_lm, ids)
    score = score_ids(tiny_lm, ids, NOLOCK, chunk=5)
    assert_matches_oracle(score, full, ids)
    assert score.model == tiny_lm.key and score.forward == "torch fp32" and score.ids == tuple(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_score_ids_equal_one_plain_forward_on_every_family(family_env, family):
    lm = family_env[family]
    ids = text_ids(lm, minimum=8)
    assert_matches_oracle(score_ids(lm, ids, NOLOCK, chunk=3), plain_logits(lm, ids), ids)


def test_first_scores_only_the_answer_part(tiny_lm):
    ids = text_ids(tiny_lm)
    whole = score_ids(tiny_lm, ids, NOLOCK, chunk=4)
    for first in (2, 6, len(ids) - 1):
        part = score_ids(tiny_lm, ids, NOLOCK, first=first, chunk=4)
        assert part.first == first and part.positions == tuple(range(first, len(ids)))
        k = first - 1
        torch.testing.assert_close(f64(part.logprobs), f64(whole.logprobs[k:]), atol=1e-5, rtol=0)
        assert part.ranks == whole.ranks[k:] and part.top1_ids == whole.top1_ids[k:]
        assert_matches_oracle(part, plain_logits(tiny_lm, ids), ids, first)


def test_score_frame_and_json(tiny_lm):
    ids = text_ids(tiny_lm)
    score = score_ids(tiny_lm, ids, NOLOCK, first=3)
    frame = score.to_frame()
    assert list(frame.columns) == ["position", "token_id", "logprob", "prob", "rank", "surprisal_bits",
                                   "entropy_bits", "top1_id"]
    assert len(frame) == len(ids) - 3 and frame["position"].tolist() == list(range(3, len(ids)))
    texts = {t: tiny_lm.tokenizer.decode([t]) for t in set(ids)}
    framed = score.to_frame(texts)
    assert list(framed.columns)[:3] == ["position", "token_id", "text"]
    assert framed["text"].tolist() == [texts[t] for t in ids[3:]]
    data = json.loads(score.to_json())
    assert data["token_ids"] == ids[3:] and data["summary"]["tokens_scored"] == len(ids) - 3
    assert data["summary"]["perplexity"] == pytest.approx(score.perplexity)


def test_score_ids_refuses_bad_input(tiny_lm):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        score_ids(tiny_lm, [5])
    with pytest.raises(ValueError, match=r"of tiny-qwen2: token id 400 at position 1 is outside its vocabulary \(0\.\.399\)"):
        score_ids(tiny_lm, [5, 400, 6])
    with pytest.raises(ValueError, match="outside"):
        score_ids(tiny_lm, [5, -1, 6])
    for first in (0, 3, -2):
        with pytest.raises(ValueError, match=r"first must be in \[1, 2\]"):
            score_ids(tiny_lm, [5, 6, 7], first=first)
    with pytest.raises(ValueError, match="context of 256 tokens"):
        score_ids(tiny_lm, [5] * 300)


# --- divergence -----------------------------------------------------------------------------------------------

def test_a_model_against_itself_diverges_nowhere(tiny_lm):
    ids = text_ids(tiny_lm)
    result = divergence(tiny_lm, tiny_lm, ids, chunk=4)
    assert max(result.kl_ab) <= 1e-6 and max(result.kl_ba) <= 1e-6
    assert result.agreement == 1.0 and result.note == ""
    assert result.logprob_a == result.logprob_b
    assert result.perplexity_a == pytest.approx(score_ids(tiny_lm, ids).perplexity, rel=1e-6)


def test_fp32_against_bf16_equals_kl_of_two_plain_forwards(tiny_lm, tiny_bf16):
    """16-token chunks (three of them: boundaries crossed). bf16 kernels round differently for very short chunks
    (5 tokens: up to 1e-3 nats apart, the size of the KL itself), so the bf16 side is compared where its cached
    chunks compute what one plain forward computes; 5-token chunks must still give a small KL."""
    ids = text_ids(tiny_lm)
    assert len(ids) > 32
    result = divergence(tiny_lm, tiny_bf16, ids, chunk=16)
    assert "bf16" in result.forward_b
    la, lb = plain_logits(tiny_lm, ids)[:-1], plain_logits(tiny_bf16, ids)[:-1]
    want_ab, want_ba = oracle_kl(la, lb), oracle_kl(lb, la)
    assert 0 < result.mean_kl_ab < 0.01 and 0 < result.mean_kl_ba < 0.01, result.summary()
    short = divergence(tiny_lm, tiny_bf16, ids, chunk=5)
    assert 0 < short.mean_kl_ab < 0.01 and short.agreement > 0.8, short.summary()
    torch.testing.assert_close(f64(result.kl_ab), want_ab, atol=1e-4, rtol=0)
    torch.testing.assert_close(f64(result.kl_ba), want_ba, atol=1e-4, rtol=0)
    assert result.mean_kl_ab == pytest.approx(want_ab.mean().item(), abs=1e-4)
    assert list(result.top1_a) == la.argmax(-1).tolist()


def test_two_random_checkpoints_diverge_and_most_different_is_sorted(tiny_lm, other_tiny):
    assert same_tokenizer(tiny_lm, other_tiny) and tiny_lm.path != other_tiny.path
    ids = text_ids(tiny_lm)
    log: list = []
    result = divergence(tiny_lm, other_tiny, ids, RecordingLock(log, "a"), RecordingLock(log, "b"), first=2,
                        top=5, chunk=4)
    # Interleaved: one chunk of a, then one of b, each under its own lock.
    chunks = math.ceil((len(ids) - 1) / 4)
    assert log == ["a", "b"] * chunks
    assert result.positions == tuple(range(2, len(ids))) and result.token_ids == tuple(ids[2:])
    la, lb = plain_logits(tiny_lm, ids)[1:-1], plain_logits(other_tiny, ids)[1:-1]
    torch.testing.assert_close(f64(result.kl_ab), oracle_kl(la, lb), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(f64(result.kl_ba), oracle_kl(lb, la), atol=1e-4, rtol=1e-5)
    assert result.mean_kl_ab > 1.0 and result.mean_kl_ba > 1.0  # random models: far apart
    assert list(result.top1_a) == la.argmax(-1).tolist() and list(result.top1_b) == lb.argmax(-1).tolist()
    assert result.agreement == pytest.approx(sum(a == b for a, b in zip(result.top1_a, result.top1_b))
                                             / result.count)
    for logprob, model in ((result.logprob_a, tiny_lm), (result.logprob_b, other_tiny)):
        torch.testing.assert_close(f64(logprob), f64(score_ids(model, ids, first=2).logprobs),
                                   atol=1e-5, rtol=0)
    assert result.perplexity_a == pytest.approx(score_ids(tiny_lm, ids, first=2).perplexity, rel=1e-5)

    top = result.most_different()
    assert len(top) == 5 and len(result.most_different(3)) == 3
    assert len(result.most_different(1000)) == result.count
    kls = [p.kl_ab for p in top]
    assert kls == sorted(kls, reverse=True)
    assert kls[0] == max(result.kl_ab) == result.max_kl_ab[0]
    assert top[0].position == result.max_kl_ab[1]
    assert min(kls) >= sorted(result.kl_ab, reverse=True)[4]
    for p in top:
        k = p.position - 2
        assert (p.token_id, p.kl_ab, p.kl_ba, p.top1_a, p.top1_b) == (
            ids[p.position], result.kl_ab[k], result.kl_ba[k], result.top1_a[k], result.top1_b[k])
        assert p.prob_a == pytest.approx(math.exp(result.logprob_a[k]))

    data = json.loads(result.to_json())
    assert len(data["most_different"]) == 5 and data["summary"]["agreement"] == pytest.approx(result.agreement)
    frame = result.to_frame()
    assert list(frame.columns) == ["position", "token_id", "kl_ab", "kl_ba", "top1_a", "top1_b", "agree",
                                   "prob_a", "prob_b"]
    assert frame["kl_ab"].tolist() == list(result.kl_ab)


def test_different_logit_widths_compare_the_shared_rows(tmp_path_factory, tiny_lm):
    """A checkpoint with a padded embedding table (more logits rows than tokens): the KL covers the shared rows,
    each distribution renormalised there, and the note says so."""
    _, padded = _load_tiny(tmp_path_factory.mktemp("scoring-padded"), "tiny-padded", seed=1, vocab_size=416)
    assert padded.vocab_size == 416 and same_tokenizer(tiny_lm, padded)
    ids = text_ids(tiny_lm)
    result = divergence(tiny_lm, padded, ids, chunk=6)
    assert result.compared_vocab == 400 and "first 400" in result.note and "416" in result.note
    la, lb = plain_logits(tiny_lm, ids)[:-1], plain_logits(padded, ids)[:-1]
    torch.testing.assert_close(f64(result.kl_ab), oracle_kl(la, lb[:, :400]), atol=1e-4, rtol=1e-5)
    # Each model's own probability of the text's tokens is over its whole distribution.
    torch.testing.assert_close(f64(result.logprob_b), f64(score_ids(padded, ids).logprobs),
                               atol=1e-5, rtol=0)


def test_different_tokenizers_are_refused_naming_both(tiny_lm, family_env):
    other = family_env["baichuan"]
    assert not same_tokenizer(tiny_lm, other)
    with pytest.raises(ValueError, match=r"tiny-qwen2 \(torch fp32\) and tiny-baichuan \(torch fp32\) have "
                                         r"different tokenizers"):
        divergence(tiny_lm, other, [5, 6, 7])


def test_divergence_refuses_bad_input(tiny_lm, other_tiny):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        divergence(tiny_lm, other_tiny, [5])
    with pytest.raises(ValueError, match="outside"):
        divergence(tiny_lm, other_tiny, [5, 4000])
    with pytest.raises(ValueError, match="first must be"):
        divergence(tiny_lm, other_tiny, [5, 6], first=2)
    shortest = divergence(tiny_lm, other_tiny, [5, 6])  # the shortest text that scores: one position
    assert (shortest.positions, shortest.token_ids, shortest.count) == ((1,), (6,), 1)
    assert shortest.kl_ab[0] >= 0 and shortest.kl_ba[0] >= 0


# --- the llama.cpp forward on the real default ----------------------------------------------------------------

REAL = "qwen2.5-coder-0.5b-instruct"
ENGLISH = ("The history of computing is a story of abstraction: each generation of engineers hides the details of "
           "the machine below so that the next can think about bigger problems.")


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="the llama.cpp forward is not installed (pip install -r requirements-llama.txt)")
def test_llama_cpp_forward_scores_like_torch_fp32():
    from qdemo.forwards.llama_cpp import load_llama_model

    spec = load_registry().get(REAL)
    fast, exact = load_llama_model(spec), load_model(spec, dtype="float32")
    ids = exact.tokenizer.encode(ENGLISH, add_special_tokens=False)
    assert 30 <= len(ids) <= 50
    a, b = score_ids(fast, ids), score_ids(exact, ids)
    assert a.forward == "llama.cpp Q4_K_M" and b.forward == "torch fp32"
    delta = sum(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) / a.count
    assert delta < 0.25, delta
    assert abs(a.perplexity / b.perplexity - 1) < 0.15, (a.perplexity, b.perplexity)
    result = divergence(fast, exact, ids)
    assert 0 < result.mean_kl_ab < 0.2 and 0 < result.mean_kl_ba < 0.2, result.summary()
    assert result.perplexity_a == pytest.approx(a.perplexity, rel=1e-4)
    assert result.perplexity_b == pytest.approx(b.perplexity, rel=1e-4)


def test_the_backends_batch_scoring_is_score_ids_and_equals_a_plain_forward(tiny_lm):
    backend = LocalBackend(tiny_lm, StepGate())
    rows = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
    got = backend.token_logprobs(rows)
    for row, scores in zip(rows, got):
        with torch.inference_mode():
            logits = tiny_lm.model(input_ids=torch.tensor([row])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(row) - 1), torch.tensor(row[1:])]
        assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="at least 2 tokens are needed, got 1"):
        backend.token_logprobs([[5]])
