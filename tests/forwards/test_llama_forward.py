"""The llama.cpp forward on the real embedded default (its own GGUF), against the torch fp32 path as the oracle:
full raw logits, the engine's chain on them, kept states across turns, forked and selected rows, left-padded
batches, a context that outgrows itself, scoring at every position, and the step gate.

Needs requirements-llama.txt (it builds llama.cpp). Without it these tests skip, unless QDEMO_REQUIRE_LLAMA=1 (set
by .ci/run) makes that a failure."""

from __future__ import annotations

import contextlib
import math
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from qdemo.core.decode import decode_step, last_logits, new_state, prefill
from qdemo.core.engine import collect, generate, generate_batch, generate_rows
from qdemo.forwards import llama_cpp as llama_forward
from qdemo.forwards.gate import StepGate
from qdemo.forwards.llama_cpp import SOLO_EXACT_ROWS, load_llama_model
from qdemo.models.loader import load_model
from qdemo.models.prompting import build_prompt
from qdemo.models.registry import load_registry
from qdemo.probes.scoring import score_ids
from qdemo.sampling import SamplingParams
from qdemo.services.kept_states import KeptStates
from qdemo.services.sweep import read_grid, run_sweep
from qdemo.serving.local import LocalBackend

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("QDEMO_REQUIRE_LLAMA") == "1":
        raise RuntimeError("QDEMO_REQUIRE_LLAMA=1 but llama-cpp-python is not installed "
                           "(pip install -r requirements-llama.txt)")
    pytest.skip("the llama.cpp forward is not installed (pip install -r requirements-llama.txt)",
                allow_module_level=True)

pytestmark = pytest.mark.real_model
NAME = "qwen2.5-coder-0.5b-instruct"
NOLOCK = contextlib.nullcontext
EN = "Write a Python function that checks whether a number is prime."


@pytest.fixture(scope="module")
def spec():
    return load_registry().get(NAME)


@pytest.fixture(scope="module")
def fast(spec):
    return load_llama_model(spec)


@pytest.fixture(scope="module")
def exact(spec):
    return load_model(spec, dtype="float32")


def chat_ids(lm, text: str, tokens: int = 32) -> list[int]:
    return build_prompt(lm.tokenizer, [{"role": "user", "content": text}], lm.max_context, tokens,
                        lm.spec.system_prompt, lm.spec.name, lm.family.build_prompt).ids


def greedy(lm, ids, tokens=24, **kwargs):
    return collect(generate(lm, input_ids=ids, params=SamplingParams(max_new_tokens=tokens), **kwargs))["done"]


def test_loads_the_gguf_itself(fast, spec):
    assert fast.forward == "llama.cpp" and fast.model is None and fast.forward_label == "llama.cpp Q4_K_M"
    assert fast.key == f"{NAME} [llama.cpp]"
    assert fast.vocab_size == 151936 and fast.weight_bytes == spec.source.size
    assert 151645 in fast.eos_token_ids


def test_full_raw_logits_match_the_torch_fp32_path(fast, exact):
    """Every vocabulary entry comes back; the distribution is the fp32 model's up to Q4/Q5 arithmetic."""
    for text in (EN, "你好，请介绍一下你自己。", "def fib(n):"):
        ids = chat_ids(fast, text)
        a, b = last_logits(fast, ids, NOLOCK), last_logits(exact, ids, NOLOCK)
        assert a.shape == b.shape == (151936,) and a.dtype == torch.float32
        assert int(a.argmax()) == int(b.argmax()), text
        assert total_variation(a, b) < 0.1, text


def test_greedy_tokens_equal_the_torch_fp32_path(fast, exact):
    ids = chat_ids(fast, EN)
    a, b = greedy(fast, ids, 24), greedy(exact, ids, 24)
    assert a.token_ids == b.token_ids and a.reason == b.reason == "max_tokens"


def test_stage_capture_runs_on_its_logits(fast):
    """The chain, stage capture and seeded sampler run unchanged: stages present, reproducible by seed."""
    ids = chat_ids(fast, EN)
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05,
                            seed=7, max_new_tokens=12)
    runs = [collect(generate(fast, input_ids=ids, params=params, top_n=20)) for _ in range(2)]
    assert runs[0]["done"].token_ids == runs[1]["done"].token_ids
    names = [s.name for s in runs[0]["tokens"][0].stages]
    assert names == ["raw", "repetition_penalty", "temperature", "top_k", "top_p"]
    assert all(len(s.token_ids) == 20 for s in runs[0]["tokens"][0].stages[:3])


def test_kept_state_reuses_the_prefix_across_turns(fast):
    first = chat_ids(fast, EN, 8)
    state = new_state(fast)
    done = greedy(fast, first, 8, state=state)
    follow = first + list(done.token_ids) + fast.tokenizer("\nAnd in Rust?", add_special_tokens=False)["input_ids"]
    run = collect(generate(fast, input_ids=follow, params=SamplingParams(max_new_tokens=8), state=state))
    assert run["prefill"].reused_tokens >= len(first)
    assert run["done"].token_ids == greedy(fast, follow, 8).token_ids
    state.release()


def test_forked_rows_equal_their_solo_runs(fast):
    ids = chat_ids(fast, EN)
    sides = [SamplingParams(max_new_tokens=12),
             SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=3, max_new_tokens=12)]
    dones = {e.row: e for e in generate_rows(fast, ids, sides) if type(e).__name__ == "DoneEvent"}
    for row, params in enumerate(sides):
        solo = collect(generate(fast, input_ids=ids, params=params))["done"]
        assert dones[row].token_ids == solo.token_ids, row


def test_forked_rows_from_a_kept_state_end_as_one_row_that_serves_the_next_logits(fast):
    ids = chat_ids(fast, EN)
    sides = [SamplingParams(max_new_tokens=6),
             SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=3, max_new_tokens=9)]
    state = new_state(fast)
    try:
        greedy(fast, ids[:-5], 2, state=state)  # an earlier turn that shares all but the prompt's last 5 tokens
        events = list(generate_rows(fast, ids, sides, state=state))
        assert events[0].reused_tokens == len(ids) - 5
        dones = {e.row: e for e in events if type(e).__name__ == "DoneEvent"}
        assert dones[1].token_ids == collect(generate(fast, input_ids=ids, params=sides[1]))["done"].token_ids
        assert state.rows == 1 and state.row_ids(0)[:len(ids)] == ids  # the longer row's history: the prompt, its answer
        context = ids + list(dones[1].token_ids[:3])
        reused = last_logits(fast, context, NOLOCK, state=state)
        assert state.row_ids(0) == context
        fresh = last_logits(fast, context, NOLOCK)  # one prefill: the same up to llama.cpp's batch-size arithmetic
        assert int(reused.argmax()) == int(fresh.argmax()) and total_variation(reused, fresh) < 0.02
        assert total_variation(reused, last_logits(fast, context[:-1], NOLOCK)) > 0.3
        # The kept row is the one the shorter side's end left (not sequence 0): forking it again gives each row a
        # sequence of its own, so both rows still equal their solo runs.
        assert state.cache.seqs != [0]
        again = {e.row: e for e in generate_rows(fast, ids, sides, state=state) if type(e).__name__ == "DoneEvent"}
        for row, params in enumerate(sides):
            assert again[row].token_ids == collect(generate(fast, input_ids=ids, params=params))["done"].token_ids
    finally:
        state.release()


def test_left_padded_batch_equals_solo_runs(fast):
    prompts = [chat_ids(fast, EN), chat_ids(fast, "你好"), chat_ids(fast, "Sort a list in Python, briefly.")]
    assert len({len(p) for p in prompts}) == 3
    dones = {e.row: e for e in generate_batch(fast, prompts, SamplingParams(max_new_tokens=10))
             if type(e).__name__ == "DoneEvent"}
    for row, ids in enumerate(prompts):
        assert dones[row].token_ids == greedy(fast, ids, 10).token_ids, row


def test_select_duplicates_and_crop_keep_each_row_its_own_history(fast):
    """Beam-style reshuffles: rows chosen twice get their own copy; a crop forgets exactly the cut columns."""
    ids = chat_ids(fast, EN)
    state = new_state(fast)
    logits, _ = prefill(fast, state, [ids], NOLOCK, 64)
    state.fork(3)
    decode_step(fast, state, [11, 22, 33], NOLOCK)
    state.select([2, 2, 0])
    after = decode_step(fast, state, [44, 55, 66], NOLOCK)
    histories = [[33, 44], [33, 55], [11, 66]]
    references = [last_logits(fast, ids + h, NOLOCK) for h in histories]
    for row in range(3):
        # Its own history within batch-size noise (TV ≈ 0.01–0.05); any other history is far off (TV > 0.4).
        distances = [total_variation(after[row], ref) for ref in references]
        assert distances[row] < 0.1 and min(d for k, d in enumerate(distances) if k != row) > 0.3, (row, distances)
    state.select([1])
    state.crop(len(ids))
    again = decode_step(fast, state, [77], NOLOCK)
    assert total_variation(again[0], last_logits(fast, ids + [77], NOLOCK)) < 0.1
    assert total_variation(again[0], last_logits(fast, ids + [33, 55, 77], NOLOCK)) > 0.3
    state.release()


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (torch.softmax(a, -1) - torch.softmax(b, -1)).abs().sum().item()


def test_a_state_that_outgrows_its_context_moves_without_recomputing(fast, monkeypatch):
    monkeypatch.setattr(llama_forward, "FIRST_CONTEXT", 48)
    ids = chat_ids(fast, EN)
    state = new_state(fast, capacity=16)
    assert state.cache.n_ctx == 48 < len(ids) + 24
    calls = []
    original = llama_forward.LlamaCppRunner._grow
    monkeypatch.setattr(llama_forward.LlamaCppRunner, "_grow",
                        lambda self, st, n: (calls.append(n), original(self, st, n))[1])
    done = greedy(fast, ids, 24, state=state)
    assert calls and state.cache.n_ctx >= len(ids) + 23
    monkeypatch.setattr(llama_forward, "FIRST_CONTEXT", 2048)
    assert done.token_ids == greedy(fast, ids, 24).token_ids
    state.release()


def test_scoring_reads_logits_at_every_position(fast, exact):
    ids = chat_ids(fast, EN)
    scored = score_ids(fast, ids, NOLOCK).logprobs
    assert len(scored) == len(ids) - 1
    for i in (3, len(ids) // 2, len(ids) - 2):  # teacher forcing equals the next-token logits of each prefix
        expected = torch.log_softmax(last_logits(fast, ids[:i + 1], NOLOCK), -1)[ids[i + 1]].item()
        assert scored[i] == pytest.approx(expected, abs=0.05)  # batch-size noise only
    torch_scored = score_ids(exact, ids, NOLOCK).logprobs
    mean_gap = sum(abs(a - b) for a, b in zip(scored, torch_scored)) / len(scored)
    assert mean_gap < 0.25  # nats per token: quantization, not a different model


def test_forwards_outside_the_gate_are_refused(spec, tmp_path):
    from qdemo.forwards.gate import UngatedForwardError
    from qdemo.serving.local import leased
    from qdemo.serving.pool import ModelPool

    pool = ModelPool(load_registry(), budget_bytes=4 << 30)
    with leased(pool, NAME, forward="llama.cpp") as backend:
        assert backend.key == f"{NAME} [llama.cpp]" and not backend.capabilities.attention
        lm = pool.get(NAME, forward="llama.cpp")
        with pytest.raises(UngatedForwardError):
            last_logits(lm, [1, 2, 3], NOLOCK)
        steps = pool.gate(backend.key).steps
        backend.next_token_logits([1, 2, 3])
        assert pool.gate(backend.key).steps > steps
    assert f"{NAME} [llama.cpp]" in pool.loaded() and pool.unload(f"{NAME} [llama.cpp]")


def test_beam_search_equals_the_torch_fp32_path(fast, exact):
    """Beams reorder and duplicate rows (select): the llama.cpp rows must follow, as the torch cache does."""
    params = SamplingParams(num_beams=3, max_new_tokens=16)
    ids = chat_ids(fast, EN)
    a = collect(generate(fast, input_ids=ids, params=params))["done"]
    b = collect(generate(exact, input_ids=ids, params=params))["done"]
    assert a.token_ids == b.token_ids and a.reason == b.reason


def test_the_kv_reported_is_the_cache_in_use_and_a_side_keeps_its_own(fast):
    """Issue 19, item 7: the llama.cpp forward reported its whole allocated context as the KV cache ("KV 24.0 MiB"
    for ~40 tokens), and a Compare side's figure doubled when the other side ended. Every forward reports the
    tokens its row holds × the bytes a token's keys and values take (f16, worked out here from the config); the
    allocated context is reported apart."""
    config = fast.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 2
    assert per_token == 12 * 1024  # Qwen2.5-0.5B: 12 KiB a token
    ids = chat_ids(fast, EN)
    sides = [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=9)]
    events = list(generate_rows(fast, ids, sides, ignore_eos=True))
    prefills = [e for e in events if type(e).__name__ == "PrefillEvent"]
    assert [e.kv_cache_bytes for e in prefills] == [len(ids) * per_token] * 2
    for row in (0, 1):
        tokens = [e for e in events if type(e).__name__ == "TokenEvent" and e.row == row]
        assert [e.kv_cache_bytes for e in tokens] == [(len(ids) + k) * per_token for k in range(len(tokens))], row
        assert all(e.kv_allocated_bytes >= 2048 * per_token > e.kv_cache_bytes for e in tokens)


def test_a_kept_state_costs_the_budget_its_whole_context(fast):
    """The memory a kept llama.cpp state holds is its allocated context, not the tokens in use: the pool's budget
    counts that."""
    pool = SimpleNamespace(budget=10 ** 12, weight_bytes=lambda: 0, loaded=lambda: [fast.key],
                           admit_tenant=lambda tenant: None)
    state = new_state(fast)
    prefill(fast, state, [chat_ids(fast, EN)], NOLOCK, 64)
    kept = KeptStates(pool)
    assert kept.keep("session", state)
    assert kept.held_bytes() == state.cache.n_ctx * fast.runner.weights.kv_bytes_per_token > state.kv_bytes()
    state.release()


def test_a_sweeps_samples_equal_their_solo_runs(fast):
    """Issue 21: on the llama.cpp forward too, every sample of a sweep (rows after one prefill, in chunks that
    reuse it) equals its solo run with the seed the sweep shows: its tokens and the raw probability of each. The
    rows end at different steps, so the batch narrows under the ones still going (with the finished rows' cells
    freed, 9 of these 16 parted from their solo runs after 10-22 tokens)."""
    backend = LocalBackend(fast, StepGate())
    ids = chat_ids(fast, "用一句话介绍 Python。", 48)
    base = fast.spec.sampling.replace(max_new_tokens=48)
    grid = read_grid({"temperature": [0.5, 1.3], "top_p": [0.8, 1.0]}, samples=4, seed=1)
    state = new_state(fast)
    try:  # chunks as the app runs them on llama.cpp; later ones start from the first's prompt and last logits
        final = list(run_sweep(backend, ids, base, grid, state=state,
                               rows_per_chunk=backend.exact_rows(8)))[-1]
    finally:
        state.release()
    lengths = [len(sample.tokens) for cell in final.cells for sample in cell.samples]
    assert len(set(lengths[:SOLO_EXACT_ROWS])) > 2, lengths  # the first chunk's rows leave it at different steps
    for cell in final.cells:
        for k, seed in enumerate(cell.seeds):
            params = base.replace(do_sample=True, seed=seed, **cell.settings)
            events = collect(generate(fast, input_ids=ids, params=params))
            assert cell.samples[k].tokens == events["done"].token_ids, (cell.settings, k)
            raw = [math.log(max(e.stages[0].chosen_prob, 1e-45)) for e in events["tokens"]]
            assert list(cell.samples[k].raw_logprobs) == raw, (cell.settings, k)


def test_a_sweep_sizes_its_chunks_on_the_llama_cpp_forward_too(fast):
    """The tour found it: a sweep on the llama.cpp forward crashed sizing its chunks (it read the torch model's
    card, which a llama.cpp model has not). A row's keys and values per token agree with the runner's own figure."""
    assert LocalBackend(fast, StepGate()).kv_bytes_per_token() == fast.runner.weights.kv_bytes_per_token > 0
