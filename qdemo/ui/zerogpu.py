"""Hugging Face ZeroGPU: GPU work must run inside functions decorated with `spaces.GPU`, which attach a GPU for
the call. Elsewhere (no `SPACES_ZERO_GPU` in the environment, or no `spaces` package) handlers stay as they are."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)
DURATION_S = 120  # longest expected generation; ZeroGPU queues shorter requests first


def on_gpu(fn: F) -> F:
    if "SPACES_ZERO_GPU" not in os.environ:
        return fn
    try:
        import spaces  # Hugging Face ZeroGPU only: the package exists on those Spaces alone
    except ImportError:
        return fn
    return spaces.GPU(fn, duration=DURATION_S)
