"""The model pool: memory budget, LRU eviction of idle models only, release on unload, OOM on load, and the
per-model step gate that lets concurrent generations take turns."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from qdemo.core.engine import collect, generate
from qdemo.forwards.gate import StepGate
from qdemo.models.loader import load_model
from qdemo.models.sources import estimate_weight_bytes
from qdemo.sampling import SamplingParams
from qdemo.serving.budget import parse_bytes
from qdemo.serving.local import leased
from qdemo.serving.pool import MemoryBudgetError, ModelPool


def test_estimate_matches_loaded_size(pool_registry, one_model_bytes):
    from qdemo.models.sources import resolve

    assert estimate_weight_bytes(resolve(pool_registry.get("tiny-qwen2")), torch.float32) == one_model_bytes
    assert estimate_weight_bytes(resolve(pool_registry.get("tiny-qwen2")), torch.bfloat16) == one_model_bytes // 2


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 1024 ** 3 and parse_bytes("8 GB") == 8 * 10 ** 9
    assert parse_bytes("1073741824") == 1024 ** 3 and parse_bytes("1.5MiB") == 1572864
    for bad in ("lots", "12 parsecs", "0", "-1GB"):
        with pytest.raises(ValueError, match="QDEMO_MAX_MEMORY"):
            parse_bytes(bad)


def test_least_recently_used_idle_model_is_unloaded_and_released(pool_registry, one_model_bytes):
    pool = ModelPool(pool_registry, "cpu", budget_bytes=int(2.5 * one_model_bytes))
    a = weakref.ref(pool.get("tiny-qwen2").model)
    pool.get("tiny-b")
    pool.get("tiny-qwen2")  # a is now more recent than b
    pool.get("tiny-c")  # does not fit: b goes
    assert set(pool.loaded()) == {"tiny-qwen2", "tiny-c"}
    assert pool.used_bytes() <= pool.budget
    assert a() is not None
    assert pool.unload("tiny-qwen2")
    gc.collect()
    assert a() is None  # nothing else kept the weights alive


def test_a_generating_model_is_never_unloaded(pool_registry, one_model_bytes):
    pool = ModelPool(pool_registry, "cpu", budget_bytes=int(1.5 * one_model_bytes))
    with leased(pool, "tiny-qwen2") as backend:
        with pytest.raises(MemoryBudgetError, match=r"tiny-b needs about .* every loaded model is generating: "
                                                    r"tiny-qwen2"):
            pool.get("tiny-b")
        assert not pool.unload("tiny-qwen2")
        out = collect(backend.generate(input_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=3)))
        assert len(out["tokens"]) == 3  # still working
    pool.get("tiny-b")  # idle now, so it makes room
    assert pool.loaded() == ["tiny-b"]


def test_a_model_larger_than_the_budget_is_refused_by_name(pool_registry, one_model_bytes):
    pool = ModelPool(pool_registry, "cpu", budget_bytes=one_model_bytes // 2)
    with pytest.raises(MemoryBudgetError, match=r"tiny-b needs about .* budget is .*QDEMO_MAX_MEMORY"):
        pool.get("tiny-b")


def test_out_of_memory_while_loading_keeps_the_others(pool_registry, one_model_bytes):
    def loader(spec, **kwargs):
        if spec.name == "tiny-b":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return load_model(spec, **kwargs)

    pool = ModelPool(pool_registry, "cpu", budget_bytes=10 * one_model_bytes, loader=loader)
    lm = pool.get("tiny-qwen2")
    with pytest.raises(MemoryBudgetError, match="tiny-b: out of memory while loading.*keep working"):
        pool.get("tiny-b")
    assert pool.loaded() == ["tiny-qwen2"]
    with leased(pool, "tiny-qwen2") as backend:
        assert backend.name == lm.spec.name
        assert collect(backend.generate(input_ids=[5, 6], params=SamplingParams(max_new_tokens=2)))["done"].error is None


def test_unknown_names_fail_with_the_registry_message(pool_registry):
    pool = ModelPool(pool_registry, "cpu", budget_bytes=1 << 30)
    with pytest.raises(ValueError, match="no-such-model"):
        pool.get("no-such-model")


def test_concurrent_first_requests_load_once(pool_registry):
    calls = []

    def loader(spec, **kwargs):
        calls.append(spec.name)
        time.sleep(0.2)
        return load_model(spec, **kwargs)

    pool = ModelPool(pool_registry, "cpu", budget_bytes=1 << 30, loader=loader)
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.get("tiny-qwen2"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["tiny-qwen2"] and all(lm is got[0] for lm in got)


def test_step_gate_serves_in_arrival_order():
    gate = StepGate()
    order = []
    started = threading.Event()

    def worker(i):
        with gate.step():
            order.append(i)

    with gate.step():  # hold the gate while the others queue up in a known order
        threads = []
        for i in range(5):
            t = threading.Thread(target=worker, args=(i,))
            t.start()
            threads.append(t)
            while gate.waiting < i + 1:
                time.sleep(0.001)
        started.set()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3, 4] and gate.waiting == 0


def test_gated_generations_interleave_and_match_their_solo_runs(tiny_lm):
    """Two seeded generations sharing one model's gate take turns step by step and produce exactly the tokens
    each produces alone."""
    gate = StepGate()
    params = [SamplingParams(do_sample=True, temperature=1.0, seed=s, max_new_tokens=12) for s in (1, 2)]
    solo = [[t.token_id for t in collect(generate(tiny_lm, input_ids=[5, 6, 7], params=p, ignore_eos=True))["tokens"]]
            for p in params]
    steps: list[int] = []
    results: dict[int, list[int]] = {}

    def run(i):
        tokens = []
        for event in generate(tiny_lm, input_ids=[5, 6, 7], params=params[i], ignore_eos=True, step_lock=gate.step):
            if type(event).__name__ == "TokenEvent":
                tokens.append(event.token_id)
                steps.append(i)
                time.sleep(0.002)  # the consumer's work between tokens lets the other side in
        results[i] = tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == solo[0] and results[1] == solo[1]
    switches = sum(1 for a, b in zip(steps, steps[1:]) if a != b)
    assert switches >= 4  # neither waited for the other to finish


def test_every_forward_of_a_pooled_model_holds_its_gate(pool_registry):
    """The pool's promise, checked instead of trusted: a forward outside the step gate is refused, and every
    forward the backend runs (generation steps, next-token logits, attention) holds the gate."""
    from qdemo.forwards.gate import UngatedForwardError
    from qdemo.probes.introspect import next_token_logits

    pool = ModelPool(pool_registry, "cpu", budget_bytes=1 << 30)
    lm = pool.get("tiny-qwen2")
    with pytest.raises(UngatedForwardError, match="tiny-qwen2: a model forward ran outside its step gate"):
        next_token_logits(lm, [5, 6])
    gate = pool.gate("tiny-qwen2")
    held = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda *a: held.append(gate.held_here()))
    try:
        with leased(pool, "tiny-qwen2") as backend:
            collect(backend.generate(input_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=4)))
            backend.next_token_logits([5, 6, 7])
            backend.attention([5, 6, 7])
            collect(backend.generate(input_ids=[5, 6], params=SamplingParams(num_beams=2, max_new_tokens=3)))
    finally:
        handle.remove()
    assert len(held) >= 4 and all(held)
