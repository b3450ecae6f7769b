"""Column-major tall weights change storage order only: same outputs, same state-dict keys, ties kept."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from qdemo.models.cpu_layout import column_major_tall_linears
from tests.conftest import write_tiny_qwen2


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_relayout_keeps_logits_and_keys(tmp_path):
    path = write_tiny_qwen2(tmp_path / "m")
    before, after = _load(path), _load(path)
    changed = column_major_tall_linears(after)
    tall = [m for m in after.modules() if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features]
    assert changed == len(tall) > 0
    assert all(not m.weight.is_contiguous() and m.weight.t().is_contiguous() for m in tall)
    assert list(before.state_dict()) == list(after.state_dict())
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.inference_mode():
        torch.testing.assert_close(after(ids).logits, before(ids).logits, rtol=1e-5, atol=1e-5)


def test_tied_embedding_is_left_alone(tmp_path):
    model = _load(write_tiny_qwen2(tmp_path / "tied", tie_word_embeddings=True))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    column_major_tall_linears(model)
    assert model.lm_head.weight.is_contiguous()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
