"""ZeroGPU: handlers are wrapped in spaces.GPU only on ZeroGPU hardware, and stay callable the same way."""

from __future__ import annotations

import inspect
import sys
import types

from qdemo.ui.zerogpu import DURATION_S, on_gpu


def handler(message: str, history: list, request=None):
    yield message.upper()


def test_no_effect_elsewhere(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert on_gpu(handler) is handler


def test_wrapped_on_zerogpu(monkeypatch):
    calls = []

    def gpu(fn, duration):
        calls.append(duration)

        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn
        return wrapper

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    wrapped = on_gpu(handler)
    assert wrapped is not handler and calls == [DURATION_S]
    assert list(wrapped("hi", [])) == ["HI"]
    assert list(inspect.signature(wrapped).parameters) == ["message", "history", "request"]  # Gradio reads it


def test_zerogpu_without_the_package_is_harmless(monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails
    assert on_gpu(handler) is handler
