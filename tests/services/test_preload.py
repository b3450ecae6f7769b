"""The default model's background load at start: it loads once through the pool (a first request waits for the
same load), warms up through the gate, and the page's line follows it; a failure is a line, not a crash."""

from __future__ import annotations

import pytest

from qdemo.models.registry import load_registry
from qdemo.services.preload import Preload
from qdemo.serving.pool import ModelPool


def test_preload_loads_once_through_the_gate(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    pool = ModelPool(registry, "cpu", budget_bytes=1 << 30)
    preload = Preload(registry.default)
    assert preload.line().startswith("⏳ Loading")
    preload.start(pool).join(60)
    assert preload.ready and preload.forward == "torch" and preload.error is None
    assert registry.default in pool.loaded()
    assert pool.gate(registry.default).steps >= 1  # the warm-up forward took the gate
    assert preload.line().startswith(f"✓ {registry.default} is loaded (torch, ")
    lm = pool.get(registry.default)  # no second load
    assert pool.get(registry.default) is lm


def test_a_failed_preload_says_why(tiny_registry_path, monkeypatch):
    registry = load_registry(tiny_registry_path)

    def broken(*args, **kwargs):
        raise OSError("disk unplugged")

    pool = ModelPool(registry, "cpu", budget_bytes=1 << 30, loader=broken)
    preload = Preload(registry.default)
    preload.start(pool).join(60)
    assert preload.finished and not preload.ready
    assert "Could not load" in preload.line() and "disk unplugged" in preload.line()


@pytest.mark.parametrize("flag, env, expected", [([], None, False), (["--no-preload"], None, True),
                                                 ([], "0", True), ([], "1", False)])
def test_the_preload_switch(flag, env, expected, monkeypatch):
    import app

    if env is None:
        monkeypatch.delenv("QDEMO_PRELOAD", raising=False)
    else:
        monkeypatch.setenv("QDEMO_PRELOAD", env)
    assert app.parser().parse_args(flag).no_preload is expected
