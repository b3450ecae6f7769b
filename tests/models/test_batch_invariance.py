"""Half-precision rows compute alike alone and in a batch (qdemo.models.batch_invariance): the probe's verdict, the
padded one-row products, and, on the real default in bfloat16, a sweep's samples equal to their solo runs."""

from __future__ import annotations

import math

import pytest
import torch

from qdemo.core.engine import collect, generate
from qdemo.forwards.gate import StepGate
from qdemo.models.batch_invariance import PROBE_ROWS, PairedLinear, make_rows_alike
from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry
from qdemo.services.sweep import read_grid, run_sweep
from qdemo.serving.local import LocalBackend


def _half_mlp(dtype: torch.dtype) -> torch.nn.Sequential:
    """The 0.5B model's MLP shapes (896 → 4864 → 896), where bf16 one-row products round unlike batched rows."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(896, 4864), torch.nn.Linear(4864, 896, bias=False)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_row_alone_gets_the_numbers_it_gets_in_any_batch(dtype):
    model = _half_mlp(dtype)
    keys = set(model.state_dict())
    verdict = make_rows_alike(model)
    if verdict == "varies":
        pytest.skip(f"this CPU's {dtype} kernels round rows by batch size from two rows up: nothing to pad")
    assert set(model.state_dict()) == keys
    assert all(type(m) is (PairedLinear if verdict == "padded" else torch.nn.Linear) for m in model)
    for seed in (1, 3, 4, 28):  # unpadded, bf16 on this CPU kind parts 0, 2, 3 and 3 of 8 rows
        x = torch.randn(PROBE_ROWS, 896, generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.inference_mode():
            alone = torch.cat([model(x[i:i + 1]) for i in range(PROBE_ROWS)])
            assert torch.equal(model(x[None, :1])[0], alone[:1])  # [batch, tokens, features] as a model calls it
            for rows in range(2, PROBE_ROWS + 1):
                assert torch.equal(model(x[:rows]), alone[:rows]), (seed, rows)
                assert torch.equal(model(x[:rows, None])[:, 0], alone[:rows]), (seed, rows)


def test_float32_and_quantized_models_are_left_alone():
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
    assert make_rows_alike(plain) == "alike" and type(plain[0]) is torch.nn.Linear
    quantized = _half_mlp(torch.bfloat16)
    quantized[1].register_buffer("qweight", torch.zeros(1, dtype=torch.int32))  # as GPTQ's kernels carry
    assert make_rows_alike(quantized) == "varies"
    assert all(type(m) is torch.nn.Linear for m in quantized)


@pytest.mark.real_model
def test_a_bf16_sweeps_samples_equal_their_solo_runs_on_the_real_default():
    """Before the padding, 2 of 8 such samples equalled their solo runs (they parted after 1-9 tokens)."""
    lm = load_model(load_registry().get("qwen2.5-coder-0.5b-instruct"), device="cpu", dtype="bfloat16")
    if not lm.rows_alike:
        pytest.skip("this CPU's bf16 kernels cannot be made to compute rows alike (the sweep says so)")
    backend = LocalBackend(lm, StepGate())
    ids = backend.chat_prompt([{"role": "user", "content": "用一句话介绍 Python。"}], 16).ids
    base = lm.spec.sampling.replace(max_new_tokens=16)
    grid = read_grid({"temperature": [0.5, 1.3], "top_p": [0.8, 1.0]}, samples=2, seed=1)
    state = backend.new_state()
    try:
        final = list(run_sweep(backend, ids, base, grid, state=state, rows_per_chunk=8))[-1]
    finally:
        state.release()
    for cell in final.cells:
        for k, seed in enumerate(cell.seeds):
            events = collect(generate(lm, input_ids=ids, params=base.replace(do_sample=True, seed=seed,
                                                                             **cell.settings)))
            assert cell.samples[k].tokens == events["done"].token_ids, (cell.settings, k)
            raw = [math.log(max(e.stages[0].chosen_prob, 1e-45)) for e in events["tokens"]]
            assert list(cell.samples[k].raw_logprobs) == raw, (cell.settings, k)
