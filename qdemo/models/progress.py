"""Progress of long work (preparing and loading weights), reported to whoever asked for it.

`ProgressFn(phase, done, total)` is the one shape: sources and the loader call it, the UI turns it into
Gradio's progress bar. transformers draws its own tqdm bars (e.g. "Loading weights", one step per tensor);
inside `reporting(fn)` those bars also move `fn`, on this thread only, so two loads on two threads never
report into each other's bar.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from transformers.utils import logging as hf_logging

ProgressFn = Callable[[str, float, float], None]

_current = threading.local()
_installed = False


class _ReportingBar:
    """A transformers tqdm bar that also reports each step."""

    def __init__(self, bar, report: ProgressFn, desc: str, total: float | None) -> None:
        self._bar, self._report, self._desc, self._total, self._done = bar, report, desc, total, 0

    def __iter__(self):
        for item in self._bar:
            yield item
            self._step(1)

    def update(self, n: float = 1):
        self._step(n)
        return self._bar.update(n)

    def _step(self, n: float) -> None:
        self._done += n
        if self._total:
            self._report(self._desc, min(self._done, self._total), self._total)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def __getattr__(self, name: str):
        return getattr(self._bar, name)


def _hook(factory, args, kwargs):
    bar = factory(*args, **kwargs)
    report = getattr(_current, "fn", None)
    if report is None:
        return bar
    iterable = args[0] if args else kwargs.get("iterable")
    total = kwargs.get("total") or (len(iterable) if hasattr(iterable, "__len__") else None)
    return _ReportingBar(bar, report, str(kwargs.get("desc") or "working").lower(), total)


def _install() -> None:
    global _installed
    if _installed:
        return

    setter = getattr(hf_logging, "set_tqdm_hook", None)
    if setter is not None:
        previous = setter(None)

        def chained(factory, args, kwargs):
            if getattr(_current, "fn", None) is None and previous is not None:
                return previous(factory, args, kwargs)
            return _hook(factory, args, kwargs)

        setter(chained)
    _installed = True


@contextlib.contextmanager
def reporting(progress: ProgressFn | None) -> Iterator[None]:
    """transformers' progress bars inside the block also move `progress` (on this thread)."""
    if progress is None:
        yield
        return
    _install()
    outer = getattr(_current, "fn", None)
    _current.fn = progress
    try:
        yield
    finally:
        _current.fn = outer
