"""Attention sinks from the Internals cache: per-head mass on the first token and on template tokens, and the
'hide special tokens' view — checked against sums written out in the test on known maps."""

from __future__ import annotations

import numpy as np
import pytest

from qdemo.services.internals import AttentionCache, attention_sinks, attention_view, without_special


def cache_with(maps: np.ndarray, special: tuple[bool, ...]) -> AttentionCache:
    q = maps.shape[-1]
    return AttentionCache(model="m", ids=list(range(q)), labels=[f"t{i}" for i in range(q)], maps=maps,
                          total_tokens=q, source="a test", special=special)


def causal_maps(layers: int, heads: int, q: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.random((layers, heads, q, q)) * np.tril(np.ones((q, q)))
    return (raw / raw.sum(-1, keepdims=True)).astype(np.float16)


def test_sink_masses_per_head():
    maps = causal_maps(2, 3, 6)
    special = (True, False, True, False, False, True)
    view = attention_sinks(cache_with(maps, special))
    m = maps.astype(np.float32)
    for _, row in view.table.iterrows():
        layer, head = int(row["layer"]), int(row["head"])
        expected_first = np.mean([m[layer, head, q, 0] for q in range(1, 6)])
        expected_special = np.mean([m[layer, head, q, 2] + m[layer, head, q, 5] for q in range(1, 6)])
        assert row["first_token"] == pytest.approx(expected_first, abs=1e-6)
        assert row["special_tokens"] == pytest.approx(expected_special, abs=1e-6)
    assert len(view.table) == 6 and "heads" in view.summary


def test_a_sink_head_is_counted():
    maps = causal_maps(1, 2, 5).astype(np.float32)
    maps[0, 1] = 0
    maps[0, 1, :, 0] = 1.0  # head 1 attends only to the first token
    view = attention_sinks(cache_with(maps.astype(np.float16), (False,) * 5))
    assert view.summary.startswith("**1 of 2 heads**")
    assert view.table.loc[1, "first_token"] == pytest.approx(1.0)


def test_hiding_special_tokens_renormalises_rows():
    maps = causal_maps(1, 1, 4, seed=3).astype(np.float32)
    special = (True, False, False, True)
    shown = without_special(maps, special)
    for q in range(4):
        row = maps[0, 0, q].copy()
        row[[0, 3]] = 0
        expected = row / row.sum() if row.sum() > 0 else row
        assert np.allclose(shown[0, 0, q], expected, atol=1e-6)
    assert np.all(shown[0, 0, 0] == 0)  # the first row attended only to a special token: nothing left to show
    view = attention_view(cache_with(maps.astype(np.float16), special), 0, "0", hide_special=True)
    assert "special tokens hidden" in view.figure.layout.title.text
    assert np.allclose(view.weights.sum(-1)[1:], 1.0, atol=1e-3)


def test_one_token_has_no_sinks():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        attention_sinks(cache_with(np.ones((1, 1, 1, 1), dtype=np.float16), (False,)))
