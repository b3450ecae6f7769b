"""Loaded models shared by every session of one process, kept within a memory budget.

- Each model loads once; concurrent first requests wait for that one load.
- Before a load, the weights' size is estimated from the checkpoint's safetensors headers; while it does not fit
  the budget, the least recently used *idle* model is unloaded (a model with a generation running is leased
  and never unloaded). If it still cannot fit, the load is refused with a message that says what is in the way.
- Unloading drops every reference the pool holds, collects garbage and empties the CUDA cache.
- An out-of-memory during a load becomes a readable error; the models already loaded keep working.
- Generations on one model share it through a `StepGate`: one forward pass at a time, in arrival order, so
  concurrent users interleave token by token instead of one long answer blocking everyone, and the device is
  never asked for more than one model step at once.

Nothing per user lives here: leases and gate tickets belong to running generations and end with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from qdemo.errors import QdemoError
from qdemo.models.loader import LoadedModel, entry_key, load_llama_model, load_model, pick_device, pick_dtype
from qdemo.models.registry import Registry
from qdemo.models.sources import ProgressFn, hub_cache_dir, hub_weight_bytes, needs_download, resolve

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
STATE_IDLE_S = 900.0  # a kept decode state unused this long is dropped
CPU_BUDGET_FRACTION = 0.6  # of RAM: the OS, Python, activations and KV caches need the rest
CUDA_BUDGET_FRACTION = 0.85


class MemoryBudgetError(QdemoError):
    """A model does not fit the memory budget, or the device ran out of memory loading it."""


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
    import psutil

    return int(psutil.virtual_memory().total * CPU_BUDGET_FRACTION)


def estimate_weight_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the weights will take once loaded in `dtype`: floating tensors at dtype's size, others (GPTQ's
    packed ints) as stored. Read from the safetensors headers only; 0 when the checkpoint has none."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shard in sorted(Path(path).glob("*.safetensors")):
        with open(shard, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            stored = info["dtype"]
            total += count * (item if stored.startswith(("F", "BF")) else _SAFETENSORS_BYTES.get(stored, 4))
    return total


class UngatedForwardError(QdemoError):
    """A forward of a pooled model ran without holding that model's step gate (a bug in the caller)."""


class StepGate:
    """A FIFO lock around one model step: whoever asked first steps first. Re-entrant for the thread that holds
    it, so a gated helper may call another gated helper."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # next ticket to hand out
        self._serving = 0  # ticket allowed to run
        self._holder: int | None = None  # thread running the current step
        self.steps = 0  # steps run through the gate (tests count forwards against it)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._holder == me:  # nested: already inside this thread's step
            yield
            return
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
            self._holder = me
            self.steps += 1
        try:
            yield
        finally:
            with self._cond:
                self._holder = None
                self._serving += 1
                self._cond.notify_all()

    def held_here(self) -> bool:
        """True when the calling thread is inside a step of this gate."""
        return self._holder == threading.get_ident()

    @property
    def waiting(self) -> int:
        """Steps queued behind the running one."""
        with self._cond:
            return max(0, self._next - self._serving - 1)


def guard_forwards(model: torch.nn.Module, gate: StepGate, name: str) -> Callable[[], None]:
    """Refuse any forward of `model` that does not hold `gate`: the pool's promise that one model never runs two
    steps at once, checked where it matters instead of trusted. The check sits on the token embedding, which
    every forward passes through (the full model, its inner decoder, generate's steps). Returns a function that
    removes the guard."""

    def check(module: torch.nn.Module, args: tuple) -> None:
        if not gate.held_here():
            raise UngatedForwardError(f"{name}: a model forward ran outside its step gate")

    handle = model.get_input_embeddings().register_forward_pre_hook(check)
    return handle.remove


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
        # Decode states sessions keep between turns (multi-turn KV reuse): key -> (model, state, last used).
        # key → (model, state, last used, KV bytes). A kept state does not change while kept (take_state hands it
        # out and removes it), so its bytes are counted once, not on every eviction check.
        self._states: "OrderedDict[str, tuple[str, Any, float, int]]" = OrderedDict()
        self.state_idle_s = STATE_IDLE_S

    # --- what is loaded -------------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        with self._guard:
            return list(self._entries)

    def used_bytes(self) -> int:
        """Weights of the loaded models and the KV caches sessions keep."""
        with self._guard:
            return sum(e.bytes for e in self._entries.values()) + self.kept_bytes()

    # --- decode states kept between turns ------------------------------------------------------------------------
    def keep_state(self, key: str, state: Any) -> bool:
        """Keep a session's decode state for its next turn, counted in the memory budget. Least recently used
        states go first when the budget is short; False when this one cannot be kept (its model is gone, or it
        alone does not fit)."""
        with self._guard:
            self._expire_states()
            self._states.pop(key, None)
            if state is None or getattr(state, "broken", False) or state.model not in self._entries:
                return False
            self._states[key] = (state.model, state, time.monotonic(), state.kv_bytes())
            weights = sum(e.bytes for e in self._entries.values())
            while self._states and weights + self.kept_bytes() > self.budget:
                dropped, _ = self._states.popitem(last=False)
                if dropped == key:
                    return False
            return True

    def take_state(self, key: str, model: str) -> Any | None:
        """The session's kept state for `model`, handed over (no longer counted or evictable) until kept again;
        None when there is none (a state of another model is dropped)."""
        with self._guard:
            self._expire_states()
            item = self._states.pop(key, None)
            return item[1] if item is not None and item[0] == model else None

    def drop_states(self, key: str | None = None, model: str | None = None) -> int:
        """Forget kept states (a session's, a model's, or all); returns how many went."""
        with self._guard:
            gone = [k for k, (m, *_) in self._states.items()
                    if (key is None or k == key) and (model is None or m == model)]
            for k in gone:
                del self._states[k]
            return len(gone)

    def kept_bytes(self) -> int:
        with self._guard:
            return sum(item[3] for item in self._states.values())

    def kept_states(self) -> dict[str, str]:
        """key -> model of every kept state."""
        with self._guard:
            return {k: m for k, (m, *_) in self._states.items()}

    def _expire_states(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, _, used, _) in self._states.items() if now - used > self.state_idle_s]:
            del self._states[k]

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
            if lm.runner is not None:
                lm.runner.gate = self.gate(key)  # the llama.cpp runner checks it on every forward
            else:
                guard_forwards(lm.model, self.gate(key), key)
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

    @contextlib.contextmanager
    def backend(self, name: str, progress: ProgressFn | None = None, forward: str = "torch"
                ) -> Iterator["LocalBackend"]:
        """The model leased for one request, behind its gated path."""
        from qdemo.serving.local import LocalBackend

        with self.lease(name, progress, forward) as lm:
            yield LocalBackend(lm, self.gate(lm.key))

    def unload(self, name: str) -> bool:
        """Unload an idle model (`name` as `loaded()` lists it); False when it is not loaded or a generation is using
        it."""
        with self._guard:
            entry = self._entries.get(name)
            if entry is None or entry.leases:
                return False
            del self._entries[name]
            self.drop_states(model=name)
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
            with self._guard:
                while self._states and self.used_bytes() + need > self.budget:
                    self._states.popitem(last=False)  # kept caches go before any model does
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
