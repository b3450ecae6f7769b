"""Issue 21: a sampling sweep's samples decode as rows after one shared prefill, and each equals its solo run with
its shown seed (tokens and every stage number); the cell measures read those rows; the grid is read strictly."""

from __future__ import annotations

import json
import math
import threading

import pytest

from qdemo.core.decode import new_state
from qdemo.core.engine import collect, generate
from qdemo.forwards.gate import StepGate
from qdemo.forwards.torch_runner import TorchRunner
from qdemo.models import loader
from qdemo.models.registry import load_registry
from qdemo.sampling import SamplingParams
from qdemo.services.admission import Refused, Services
from qdemo.services.sweep import read_grid, run_sweep, sweep
from qdemo.serving.limits import Client, Limits
from qdemo.serving.local import LocalBackend
from qdemo.serving.pool import ModelPool
from qdemo.views.sweep_measures import cell_measures
from tests.conftest import write_registry


def test_every_sample_equals_its_solo_run_and_the_prefill_is_shared(tiny_lm):
    backend = LocalBackend(tiny_lm, StepGate())
    ids = backend.chat_prompt([{"role": "user", "content": "写一首诗 about the sea"}], 8).ids
    base = SamplingParams(max_new_tokens=6, top_k=40)
    grid = read_grid({"temperature": [0.5, 1.2], "top_p": [0.8, 1.0]}, samples=3, seed=100)
    fed: list[int] = []
    handle = tiny_lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: fed.append(a[0].shape[1]))
    state = new_state(tiny_lm)
    try:
        final = list(run_sweep(backend, ids, base, grid, state=state, rows_per_chunk=5))[-1]
    finally:
        handle.remove()
        state.release()
    assert final.done and final.rows_done == final.rows_total == 12
    # the prompt is fed once: the later chunks feed only its last token again (the kept state holds the rest)
    assert sum(n for n in fed if n > 1) == len(ids)  # (in prefill chunks; every other forward is one column)
    seeds = [s for cell in final.cells for s in cell.seeds]
    assert seeds == list(range(100, 112))  # shown and distinct: sample k has seed + k
    for cell in final.cells:
        for k, seed in enumerate(cell.seeds):
            params = base.replace(do_sample=True, seed=seed, **cell.settings)
            solo = collect(generate(tiny_lm, input_ids=ids, params=params, top_n=20))
            assert cell.samples[k].tokens == solo["done"].token_ids, (cell.settings, k)
            for got, want in zip(cell.rows[k].events, solo["tokens"]):
                for a, b in zip(got.stages, want.stages):
                    assert a.token_ids == b.token_ids and a.probs == pytest.approx(b.probs, abs=1e-5)
            raw = [math.log(t.stages[0].chosen_prob) for t in solo["tokens"]]
            assert cell.samples[k].raw_logprobs == pytest.approx(raw, abs=1e-4)
        assert cell.measures() == cell_measures(cell.samples)


@pytest.mark.parametrize("axes,samples,seed,match", [
    ({"temperature": [0.5], "top_p": [0.9], "top_k": [5]}, 8, 0, "one or two"),
    ({"beam": [1]}, 8, 0, "not a sweepable field"),
    ({"temperature": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}, 8, 0, "1 to 5 values"),
    ({"temperature": ["hot"]}, 8, 0, "every value must be a number"),
    ({"temperature": [True]}, 8, 0, "every value must be a number"),
    ({"temperature": [0.7, 0.7]}, 8, 0, "appears twice"),
    ({"temperature": [0.7]}, 0, 0, "samples must be a whole number"),
    ({"temperature": [0.7]}, "8", 0, "samples must be a whole number"),
    ({"temperature": [0.7]}, 8, -1, "seed must be a whole number"),
    ([0.7], 8, 0, "axes must be an object"),
    ({"top_k": [2.5, 40]}, 8, 0, "axes top_k: every value must be a whole number"),  # not cut to 2
    ({"top_k": [2, 2.0]}, 8, 0, "axes top_k: a value appears twice"),  # the same cell twice once read
    ({"temperature": [0.5, -1]}, 8, 0, "axes temperature: "),  # out of range: refused before any model loads
    ({"top_p": [0.9, 1.5]}, 8, 0, "axes top_p: "),
])
def test_a_bad_grid_is_refused_naming_its_field(axes, samples, seed, match):
    with pytest.raises(Refused, match=match):
        read_grid(axes, samples, seed)


def test_a_callers_sweep_passes_admission_reuses_its_state_and_stops(tiny_dir, tmp_path):
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024))
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    alice = Client(session="alice", address="10.0.0.1")
    axes = {"temperature": [0.6, 1.0]}
    first = list(sweep(services, alice, "数一数: one two", "chat", "", {"max_new_tokens": 4}, axes, 2, 7))[-1]
    assert first.done and first.rows_done == 4
    assert [c.settings for c in first.cells] == [{"temperature": 0.6}, {"temperature": 1.0}]
    again = list(sweep(services, alice, "数一数: one two", "chat", "", {"max_new_tokens": 4}, axes, 2, 7))[-1]
    for a, b in zip(again.cells, first.cells):  # the same seeds, the same samples (the prompt now reused)
        assert [s.tokens for s in a.samples] == [s.tokens for s in b.samples]
        assert [s.raw_logprobs for s in a.samples] == [pytest.approx(s.raw_logprobs, abs=1e-5) for s in b.samples]
    stop = threading.Event()
    stop.set()
    stopped = list(sweep(services, alice, "数一数", "chat", "", None, axes, 2, 7, stop=stop))[-1]
    assert stopped.done and stopped.rows_done < stopped.rows_total
    with pytest.raises(Refused, match="context is empty"):
        list(sweep(services, alice, "  ", "chat", "", None, axes, 2, 7))
    with pytest.raises(Refused, match="temperature"):
        list(sweep(services, alice, "hi", "chat", "", {"temperature": -1}, axes, 2, 7))


def test_the_chunk_holds_as_many_rows_as_the_memory_budget_left_fits(tiny_dir, tmp_path, monkeypatch):
    """Rows decode in chunks that fit the pool's budget: each row holds keys and values for the prompt and its
    answer, so a budget with little room left makes small chunks (more of them), and every sample still runs."""
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024))
    pool = ModelPool(registry, "cpu")
    services = Services(registry=registry, pool=pool, default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    chunks = _count_chunks(monkeypatch)
    axes, settings = {"temperature": [0.6, 1.0, 1.4]}, {"max_new_tokens": 5}
    roomy = list(sweep(services, "a", "one two three", "chat", "", settings, axes, 3, 0))[-1]
    assert roomy.rows_done == 9 and chunks == [8, 1]
    config = json.loads((tiny_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4  # float32 K and V
    chunks.clear()
    pool.budget = pool.used_bytes() + 2 * 3 * per_token * (roomy.prompt_tokens + 5)  # room for 3 rows, no more
    tight = list(sweep(services, "b", "one two three", "chat", "", settings, axes, 3, 0))[-1]
    assert tight.rows_done == 9 and tight.rows_per_chunk == 3 and chunks == [3, 3, 3]
    assert [[s.tokens for s in c.samples] for c in tight.cells] == [[s.tokens for s in c.samples] for c in roomy.cells]


def test_the_chunk_keeps_to_the_rows_a_forward_decodes_exactly(tiny_dir, tmp_path, monkeypatch):
    """A forward whose kernels round differently above some batch size (llama.cpp: 7 rows on this CPU kind) caps
    the chunk there even when the budget has room for more, so every sample stays equal to its solo run."""
    registry = load_registry(write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024))
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    chunks = _count_chunks(monkeypatch)
    monkeypatch.setattr(TorchRunner, "solo_exact_rows", 4)
    final = list(sweep(services, "a", "one two three", "chat", "", {"max_new_tokens": 4},
                       {"temperature": [0.6, 1.0, 1.4]}, 3, 0))[-1]
    assert final.rows_done == 9 and final.rows_per_chunk == 4 and chunks == [4, 4, 1]


def _count_chunks(monkeypatch) -> list[int]:
    """The rows of each chunk the sweep hands the backend, in order."""
    chunks: list[int] = []
    real = LocalBackend.generate_rows

    def counted(self, input_ids, params, **kw):
        chunks.append(len(params))
        return real(self, input_ids, params, **kw)

    monkeypatch.setattr(LocalBackend, "generate_rows", counted)
    return chunks


@pytest.mark.parametrize("verdict, warned", [("varies", True), ("padded", False), ("alike", False)])
def test_a_sweep_says_when_its_samples_may_not_re_run_alone_exactly(tiny_dir, tmp_path, monkeypatch, verdict,
                                                                    warned):
    """Where half-precision kernels round a batch's rows unlike a row alone and padding cannot help (the probe's
    "varies"), the sweep's status says a sample re-run alone may part; where rows compute alike it says nothing."""
    path = write_registry(tmp_path / "models.yaml", tiny_dir, max_context=1024)
    path.write_text(path.read_text().replace("dtype: float32", "dtype: bfloat16"))
    monkeypatch.setattr(loader, "make_rows_alike", lambda model: verdict)
    registry = load_registry(path)
    services = Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                        limits=Limits(requests_per_minute=1000))
    final = list(sweep(services, "a", "one two three", "chat", "", {"max_new_tokens": 3},
                       {"temperature": [0.6, 1.0]}, 2, 0))[-1]
    assert final.rows_done == 4
    assert ("On torch bfloat16 this machine's kernels round" in final.notice) is warned, final.notice
