"""Loaded models shared by every session of one process, kept within a memory budget.

- Each model loads once; concurrent first requests wait for that one load.
- Before a load, the weights' size is estimated from the checkpoint's safetensors headers; while it does not fit
  the budget, the least recently used *idle* model is unloaded (a model with a generation running is leased
  and never unloaded). If it still cannot fit, the load is refused with a message that says what is in the way.
- Unloading drops every reference the pool holds, collects garbage and empties the CUDA cache.
- An out-of-memory during a load becomes a readable error; the models already loaded keep working.
- Generations on one model share it through its `StepGate` (qdemo.forwards.gate): one forward at a time, in
  arrival order, checked on every forward of the copy.

Nothing per user lives here: leases and gate tickets belong to running generations and end with them, and what a
session keeps between requests (its decode state) belongs to the services, counted here as a `MemoryTenant`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from qdemo.errors import QdemoError
from qdemo.forwards.gate import StepGate
from qdemo.forwards.llama_cpp import load_llama_model
from qdemo.forwards.torch_runner import runner_for
from qdemo.models.loader import (
    LoadedModel,
    entry_key,
    load_model,
    pick_device,
    pick_dtype,
)
from qdemo.models.registry import Registry
from qdemo.models.sources import (
    ProgressFn,
    estimate_weight_bytes,
    hub_cache_dir,
    hub_weight_bytes,
    needs_download,
    resolve,
)
from qdemo.serving.budget import default_budget


class MemoryBudgetError(QdemoError):
    """A model does not fit the memory budget, or the device ran out of memory loading it."""


class MemoryTenant(Protocol):
    """Memory kept for someone else inside the pool's budget (a chat's decode state between turns)."""

    def held_bytes(self) -> int: ...

    def shed(self, allowed: int) -> None:
        """Drop the least recently used until at most `allowed` bytes are held."""

    def forget_model(self, key: str) -> None:
        """Drop whatever is kept for the model copy `key` (it is being unloaded)."""


@dataclass
class _Entry:
    lm: LoadedModel
    bytes: int
    last_used: float
    leases: int = 0


Loader = Callable[..., LoadedModel]


class ModelPool:
    """`get(name)` → a loaded model (loading, and evicting idle ones, as needed); `lease(name)` pins it while a
    generation runs; `gate(name)` is that model's StepGate."""

    def __init__(self, registry: Registry, device: str | None = None, budget_bytes: int | None = None,
                 loader: Loader = load_model, llama_loader: Loader = load_llama_model) -> None:
        self.registry, self.device = registry, device
        self._device = pick_device(device)
        self.budget = budget_bytes if budget_bytes is not None else default_budget(self._device)
        self._loaders = {"torch": loader, "llama.cpp": llama_loader}
        self._entries: dict[str, _Entry] = {}
        self._gates: dict[str, StepGate] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._guard = threading.RLock()
        self._tenants: list[MemoryTenant] = []  # memory others keep within this budget (kept decode states)

    # --- what is loaded -------------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        with self._guard:
            return list(self._entries)

    def weight_bytes(self) -> int:
        """Weights of the loaded models."""
        with self._guard:
            return sum(e.bytes for e in self._entries.values())

    def used_bytes(self) -> int:
        """Weights of the loaded models and what the tenants keep (KV caches of chats between turns)."""
        return self.weight_bytes() + sum(t.held_bytes() for t in self._tenants)

    def admit_tenant(self, tenant: "MemoryTenant") -> None:
        """Count `tenant`'s memory in the budget: it sheds before any model is unloaded, and forgets what it keeps
        for a model that goes."""
        self._tenants.append(tenant)

    def active(self) -> dict[str, int]:
        """Running generations per loaded model."""
        with self._guard:
            return {n: e.leases for n, e in self._entries.items()}

    def gate(self, name: str) -> StepGate:
        with self._guard:
            return self._gates.setdefault(name, StepGate())

    # --- getting models ---------------------------------------------------------------------------------------
    def get(self, name: str, progress: ProgressFn | None = None, forward: str = "torch") -> LoadedModel:
        """The model on `forward` ("torch", or "llama.cpp" for a GGUF entry): each forward is its own copy, with its
        own gate and its own share of the budget."""
        spec = self.registry.get(name)  # unknown names fail here with the registry's message
        if forward not in self._loaders:
            raise ValueError(f"forward must be one of {', '.join(self._loaders)}, got {forward!r}")
        key = entry_key(name, forward)
        with self._guard:
            if key in self._entries:
                entry = self._entries[key]
                entry.last_used = time.monotonic()
                return entry.lm
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._entries:
                    return self._entries[key].lm
            self._check_download(name, spec)
            path = resolve(spec, progress)  # prepare / convert first: the estimate reads the files
            if forward == "llama.cpp":
                need = spec.source.size  # the GGUF's own blocks, memory-mapped
            else:
                need = estimate_weight_bytes(path, pick_dtype(spec.dtype, self._device))
            self._make_room(key, need)
            try:
                lm = self._loaders[forward](spec, device=self.device, progress=progress)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                self._release()
                raise MemoryBudgetError(
                    f"{name}: out of memory while loading (about {_gib(need)} of weights on {self._device}); "
                    f"the models already loaded keep working. Free memory or lower QDEMO_MAX_MEMORY. ({exc})"
                ) from None
            runner_for(lm).guard(self.gate(key), key)  # every forward of this copy must hold its gate
            with self._guard:
                self._entries[key] = _Entry(lm=lm, bytes=lm.weight_bytes or need, last_used=time.monotonic())
            return lm

    @contextlib.contextmanager
    def lease(self, name: str, progress: ProgressFn | None = None, forward: str = "torch") -> Iterator[LoadedModel]:
        """The model, pinned (never unloaded) until the block ends."""
        while True:
            lm = self.get(name, progress, forward)
            with self._guard:
                entry = self._entries.get(lm.key)
                if entry is not None and entry.lm is lm:
                    entry.leases += 1
                    break
        try:
            yield lm
        finally:
            with self._guard:
                entry.leases -= 1
                entry.last_used = time.monotonic()

    def unload(self, name: str) -> bool:
        """Unload an idle model (`name` as `loaded()` lists it); False when it is not loaded or a generation is using
        it."""
        with self._guard:
            entry = self._entries.get(name)
            if entry is None or entry.leases:
                return False
            del self._entries[name]
        for tenant in self._tenants:
            tenant.forget_model(name)
        del entry
        self._release()
        return True

    # --- internals ------------------------------------------------------------------------------------------------
    def _check_download(self, name: str, spec) -> None:
        """Before a hub download starts: a model whose weights can never fit the budget (or the cache's disk) is
        refused from the hub's file list, without fetching a byte."""
        if not needs_download(spec):
            return
        stored = hub_weight_bytes(spec)
        if not stored:
            return
        # Checkpoints are stored in 16 bits; loaded in fp32 they take twice that.
        item = torch.empty((), dtype=pick_dtype(spec.dtype, self._device)).element_size()
        need = stored * item // 2
        if need > self.budget:
            raise MemoryBudgetError(f"{name} needs about {_gib(need)} for its weights but the memory budget is "
                                    f"{_gib(self.budget)} (QDEMO_MAX_MEMORY); it was not downloaded")
        free = shutil.disk_usage(_existing_parent(hub_cache_dir())).free
        if stored > free:
            raise MemoryBudgetError(f"{name} would download {_gib(stored)} but the model cache's disk has only "
                                    f"{_gib(free)} free; it was not downloaded")

    def _make_room(self, name: str, need: int) -> None:
        if need > self.budget:
            raise MemoryBudgetError(f"{name} needs about {_gib(need)} for its weights but the memory budget is "
                                    f"{_gib(self.budget)} (QDEMO_MAX_MEMORY)")
        while True:
            for tenant in self._tenants:  # kept caches go before any model does (outside the guard: they lock)
                tenant.shed(max(0, self.budget - self.weight_bytes() - need))
            with self._guard:
                used = sum(e.bytes for e in self._entries.values())
                if used + need <= self.budget:
                    return
                idle = [(e.last_used, n) for n, e in self._entries.items() if not e.leases]
                if not idle:
                    busy = ", ".join(f"{n} ({_gib(e.bytes)})" for n, e in self._entries.items())
                    raise MemoryBudgetError(
                        f"{name} needs about {_gib(need)} but only {_gib(self.budget - used)} of the "
                        f"{_gib(self.budget)} budget is free and every loaded model is generating: {busy}. "
                        "Try again when they finish.")
                victim = min(idle)[1]
            self.unload(victim)

    def _release(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _trim_heap()


def _existing_parent(path: str | Path) -> Path:
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps a model's freed weights in per-thread arenas (loads run
    on Gradio's worker threads), so without this RSS stays up after an unload: measured on the 0.5B default,
    3.66 GB loaded → 1.80 GB unloaded → 0.46 GB after the trim."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or another libc: nothing to do
            pass


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB"
