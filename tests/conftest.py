"""Tiny random Qwen2 checkpoints built from a config (no downloads), shared by the unit tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello model!",
    "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))",
    "你好，世界！今天天气很好。我们一起学习语言模型。",
    "emoji 🚀🌍✨ café naïve",
] * 20


def build_tokenizer(vocab_size: int = 400, merges: bool = True):
    """A byte-level BPE tokenizer with Qwen's chatml special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if merges else 259,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def write_tiny_qwen2(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config = Qwen2Config(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Spread the logits so sampling has a shape worth looking at (default init is nearly uniform).
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_registry(path: Path, model_dir: Path, name: str = "tiny-qwen2", max_context: int = 256) -> Path:
    path.write_text(textwrap.dedent(f"""\
        default: {name}
        models:
          - name: {name}
            family: qwen2
            source:
              local:
                path: {model_dir}
            dtype: float32
            max_context: {max_context}
            system_prompt: You are a tiny test model.
            sampling:
              do_sample: true
              temperature: 0.8
              top_k: 40
              top_p: 0.9
              max_new_tokens: 16
              seed: 7
        """), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_registry_path(tmp_path_factory, tiny_dir) -> Path:
    return write_registry(tmp_path_factory.mktemp("registry") / "models.yaml", tiny_dir)


@pytest.fixture(scope="session")
def tiny_lm(tiny_registry_path):
    from qdemo.loader import load_model
    from qdemo.registry import load_registry

    registry = load_registry(tiny_registry_path)
    return load_model(registry.get(registry.default), device="cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Unit tests never touch the user's qdemo cache (the real-model tests opt out)."""
    if "real_model" not in request.keywords:
        monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "qdemo-cache"))
