"""Timing and memory readings for the engine. Cheap enough to take every step."""

from __future__ import annotations

import time

import psutil
import torch

from qdemo.core.events import MemorySample

_PROCESS = psutil.Process()


def sync(device: torch.device) -> None:
    """Wait for queued device work so a timer measures it, not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def memory_sample(device: torch.device) -> MemorySample:
    if device.type == "cuda":
        return MemorySample(
            device="cuda",
            cuda_allocated=torch.cuda.memory_allocated(device),
            cuda_reserved=torch.cuda.memory_reserved(device),
            cuda_peak=torch.cuda.max_memory_allocated(device),
        )
    return MemorySample(device="cpu", rss_bytes=_PROCESS.memory_info().rss)
