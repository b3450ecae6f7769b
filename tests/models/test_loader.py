"""The loader: concurrent loads on two threads leave transformers' process-wide state as they found it."""

from __future__ import annotations

import threading

from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry


def test_two_loads_at_once_leave_weight_tying_working(tiny_registry_path):
    """transformers swaps PreTrainedModel.tie_weights for a no-op while it loads and puts it back after; two loads
    overlapping on two threads used to leave the no-op in place, so every tied model built later (Qwen2.5-0.5B
    ties lm_head to the embeddings) came up untied."""
    spec = load_registry(tiny_registry_path).get("tiny-qwen2")
    original = PreTrainedModel.tie_weights
    start = threading.Barrier(4)

    def load() -> None:
        start.wait()
        load_model(spec, device="cpu")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert PreTrainedModel.tie_weights is original
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
