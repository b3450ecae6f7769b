"""Compare on one model: one prefill forked into two rows decoded as one batch; each side equals its solo run."""

from __future__ import annotations

from qdemo.core.engine import collect, generate
from qdemo.models.registry import load_registry
from qdemo.sampling import SamplingParams
from qdemo.services import compare
from qdemo.services.admission import Services
from qdemo.serving.limits import Limits
from qdemo.serving.pool import ModelPool
from tests.conftest import write_registry


def test_one_model_compare_shares_its_prefill_and_equals_the_solo_runs(tiny_dir, tmp_path, tiny_lm):
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024))
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    greedy = SamplingParams(max_new_tokens=10)
    sampled = SamplingParams(do_sample=True, temperature=1.2, top_k=40, max_new_tokens=14)
    lm = services.pool.get(registry.default)
    forwards = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda *a: forwards.append(1))
    try:
        final = list(compare.compare(services, None, "c", "Write a haiku.", "", "", greedy, sampled, 21, 1))[-1]
    finally:
        handle.remove()
    assert final.done and final.report["level"] == "token"
    prompt = list(final.a.prefill.prompt_ids)
    assert prompt == list(final.b.prefill.prompt_ids)
    for run, params in ((final.a, greedy), (final.b, sampled)):
        solo = collect(generate(tiny_lm, input_ids=prompt, params=params.replace(seed=21)))
        assert run.done.token_ids == solo["done"].token_ids
    steps = max(len(final.a.tokens), len(final.b.tokens))
    cross = 0 if final.report["step"] is None else 2  # the divergence report's two gated forwards
    assert len(forwards) == 1 + (steps - 1) + cross  # one prefill, one forward per step for both sides
