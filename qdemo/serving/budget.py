"""The pool's memory budget: QDEMO_MAX_MEMORY read as a size, else a share of the device's memory."""

from __future__ import annotations

import os
import re

import psutil
import torch

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
CPU_BUDGET_FRACTION = 0.6  # of RAM: the OS, Python, activations and KV caches need the rest
CUDA_BUDGET_FRACTION = 0.85


def parse_bytes(text: str) -> int:
    """'12GiB', '8 GB', '500MiB', '1073741824' → bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"QDEMO_MAX_MEMORY must be a size such as 12GiB, 8GB or 500MiB, got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"QDEMO_MAX_MEMORY must be positive, got {text!r}")
    return int(value)


def default_budget(device: torch.device) -> int:
    """QDEMO_MAX_MEMORY when set, else a share of the device's memory."""
    configured = os.environ.get("QDEMO_MAX_MEMORY")
    if configured:
        return parse_bytes(configured)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_BUDGET_FRACTION)
    return int(psutil.virtual_memory().total * CPU_BUDGET_FRACTION)
