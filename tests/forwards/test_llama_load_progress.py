"""Issue 19 item 3: the llama.cpp load reported "load weights" at 0 and then at 1, nothing between, so the page's
bar sat at 0.0 % for the whole load. llama.cpp's own progress (how far it has read the weights) now moves it.

Needs requirements-llama.txt and the real default's GGUF (real_model); skipped without them unless
QDEMO_REQUIRE_LLAMA=1."""

from __future__ import annotations

import importlib.util
import os

import pytest

from qdemo.forwards.llama_cpp import LOAD_PHASE, load_llama_model
from qdemo.models.registry import load_registry

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("QDEMO_REQUIRE_LLAMA") == "1":
        raise RuntimeError("QDEMO_REQUIRE_LLAMA=1 but llama-cpp-python is not installed")
    pytest.skip("the llama.cpp forward is not installed (pip install -r requirements-llama.txt)",
                allow_module_level=True)

pytestmark = pytest.mark.real_model


def test_the_llama_cpp_load_reports_its_progress_as_it_reads():
    spec = load_registry().get("qwen2.5-coder-0.5b-instruct")
    reports = []
    lm = load_llama_model(spec, progress=lambda phase, done, total: reports.append((phase, done, total)))
    assert lm.runner is not None
    steps = [done / total for phase, done, total in reports if phase == LOAD_PHASE]
    between = [f for f in steps if 0 < f < 1]
    assert len(between) >= 2, steps  # the bar moves during the load, not only at its two ends
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 1
