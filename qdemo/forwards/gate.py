"""The step gate: one forward of a model at a time, in arrival order, and the guard that proves it.

Generations on one model share it through a `StepGate`: whoever asked first steps first, so concurrent users
interleave token by token instead of one long answer blocking everyone, and the device is never asked for more
than one model step at once. Every runner checks it (`guard_forwards` on torch modules, the llama.cpp runner on
each forward): an ungated forward is a bug in the caller and fails loudly.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch

from qdemo.errors import QdemoError


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
