"""Loaded models shared by all sessions of one app process (models are read-only; per-user state is not here)."""

from __future__ import annotations

import threading
from typing import Callable

from qdemo.loader import LoadedModel, load_model
from qdemo.registry import Registry

Progress = Callable[[str, float, float], None]


class ModelCache:
    """Loads each registry model once, on first use; concurrent first requests wait for one load."""

    def __init__(self, registry: Registry, device: str | None = None) -> None:
        self.registry, self.device = registry, device
        self._models: dict[str, LoadedModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, name: str, progress: Progress | None = None) -> LoadedModel:
        spec = self.registry.get(name)  # unknown names fail here with the registry's message
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._models:
                self._models[name] = load_model(spec, device=self.device, progress=progress)
            return self._models[name]
