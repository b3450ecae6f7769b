"""Prompt attribution (qdemo.probes.attribution) on tiny models.

Oracles: gradient × input against central finite differences of the log-probability along each token's own
embedding (an fp64 copy of the model, so the differences are exact to ~1e-7); occlusion against a plain forward
of the context with the unit removed; turn units against the chat's own message texts, also on the released
Qwen v1 and Baichuan2 vocabularies (Chinese split across tokens)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from qdemo.models.prompting import conversation_prompt_ids
from qdemo.probes.attribution import Unit, gradient_x_input, occlusion, token_pieces, token_units, turn_units
from tests.family_checkpoints import load_family_models

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime number 请用中文回答"},
            {"role": "assistant", "content": "七 is seven"},
            {"role": "user", "content": "And another one?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_family_models(tmp_path_factory.mktemp("attribution-families"))


def context_of(lm, n: int = 12) -> list[int]:
    ids = lm.tokenizer.encode("def is_prime(n): return n > 1 and 你好 all(n % k for k in range(2, n))",
                              add_special_tokens=False)
    return ids[:n]


def f64(lm):
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model).double())


def logprob_of_embeds(lm, embeds: torch.Tensor, target: int) -> float:
    with torch.inference_mode():
        logits = lm.model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
    return float(torch.log_softmax(logits.double(), -1)[target])


@pytest.mark.parametrize("family", ["qwen2", "baichuan2-13b"])
def test_gradient_x_input_equals_finite_differences(models, family):
    lm = f64(models[family])
    ids = context_of(lm)
    target = 5
    result = gradient_x_input(lm, ids, target)
    with torch.inference_mode():
        embeds = lm.model.get_input_embeddings()(torch.tensor([ids])).double()
    assert result.logprob == pytest.approx(logprob_of_embeds(lm, embeds, target), abs=1e-6)
    # Central differences with Richardson extrapolation: the models' RMSNorm computes in fp32 even in an fp64
    # copy, so the step cannot be tiny; extrapolating two steps cancels the h² error instead.
    def central(i: int, h: float) -> float:
        up, down = embeds.clone(), embeds.clone()
        up[0, i] *= 1 + h
        down[0, i] *= 1 - h
        # d/dα log p(e + α e_i) at 0 = ∇_{e_i} log p · e_i
        return (logprob_of_embeds(lm, up, target) - logprob_of_embeds(lm, down, target)) / (2 * h)

    for i in range(len(ids)):
        want = (4 * central(i, 0.01) - central(i, 0.02)) / 3
        assert result.scores[i] == pytest.approx(want, abs=2e-4, rel=2e-3), (family, i)


def test_gradients_stay_inside(models):
    lm = models["qwen2"]
    before = torch.is_grad_enabled()
    result = gradient_x_input(lm, context_of(lm), 7)
    assert torch.is_grad_enabled() == before
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
    assert len(result.scores) == 12 and any(abs(s) > 0 for s in result.scores)


def plain_logprob(lm, ids, target) -> float:
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return float(torch.log_softmax(logits.float(), -1)[target])


@pytest.mark.parametrize("family", ["qwen2", "qwen", "baichuan", "baichuan2", "baichuan-13b", "baichuan2-13b"])
def test_occlusion_equals_recomputation(models, family):
    lm = models[family]
    ids = context_of(lm)
    target = 9
    units = token_units([str(t) for t in ids]) + [
        Unit("middle", "user", (3, 4, 5)), Unit("scattered", "template", (0, 6, 11)), Unit("tail", "user", (10, 11))]
    calls = []

    class Lock:
        def __enter__(self):
            calls.append(1)

        def __exit__(self, *exc):
            return False

    result = occlusion(lm, ids, target, units, lock=Lock, chunk=64)
    full = plain_logprob(lm, ids, target)
    assert result.logprob == pytest.approx(full, abs=1e-4)
    for unit, score in zip(units, result.scores):
        kept = [t for i, t in enumerate(ids) if i not in unit.indices]
        assert score == pytest.approx(full - plain_logprob(lm, kept, target), abs=2e-4), (family, unit.label)
    assert len(calls) == 1 + len(units)  # one forward per unit: each reuses the cached prefix before it


def test_occlusion_of_everything_is_none_and_limits(models):
    lm = models["qwen2"]
    ids = context_of(lm, 4)
    result = occlusion(lm, ids, 3, [Unit("all", "user", (0, 1, 2, 3))])
    assert result.scores == (None,)
    with pytest.raises(ValueError, match="positions in 0..3"):
        occlusion(lm, ids, 3, [Unit("bad", "user", (9,))])
    with pytest.raises(ValueError, match="per turn"):
        occlusion(lm, list(range(5, 205)), 3, token_units(["x"] * 200))


def check_turn_units(tokenizer, ids, messages, answer_from=None):
    pieces = token_pieces(tokenizer.decode, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    units = turn_units(pieces, messages, answer_from)
    covered = sorted(i for u in units for i in u.indices)
    assert covered == list(range(len(ids)))  # every token in exactly one unit
    by_label = {u.label: u for u in units}
    for label, message in [("system", messages[0]), ("user 1", messages[1]), ("assistant 1", messages[2]),
                           ("user 2", messages[3])]:
        text = tokenizer.decode([ids[i] for i in by_label[label].indices])
        assert message["content"] in text, (label, text)
        assert "<|im_start|>" not in text and "<reserved_106>" not in text
    assert by_label["template"].kind == "template"
    return by_label


def test_turn_units_on_the_tiny_chat(models):
    lm = models["qwen2"]
    ids = conversation_prompt_ids(lm.tokenizer, MESSAGES[:-1] + [MESSAGES[-1]], lm.family.build_prompt)
    check_turn_units(lm.tokenizer, ids, MESSAGES)


@pytest.mark.parametrize("which", ["qwen_v1", "baichuan2"])
def test_turn_units_on_released_vocabularies(which):
    from tests import real_vocab_fixtures as rv

    tokenizer = rv.qwen_v1_tokenizer() if which == "qwen_v1" else rv.baichuan2_tokenizer()
    from qdemo.models.families import get_family

    build = get_family("qwen" if which == "qwen_v1" else "baichuan2").build_prompt
    ids = conversation_prompt_ids(tokenizer, MESSAGES, build)
    answer = tokenizer.encode("好的，十一。", add_special_tokens=False)
    by_label = check_turn_units(tokenizer, ids + answer, MESSAGES, answer_from=len(ids))
    assert by_label["answer so far"].indices == tuple(range(len(ids), len(ids) + len(answer)))
