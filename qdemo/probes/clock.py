"""A probe's clock, read between its chunks, units or layers: the one way every probe ends early (the user's Stop,
the server's time limit, a caller gone) and says how far it got."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from qdemo.core.decode import ShouldStop
from qdemo.errors import Cut, Interrupted


def check_clock(should_stop: ShouldStop | None, at: Cut, what: str) -> None:
    """Raise Interrupted (with `at`'s count) when the clock says stop: for work that is all or nothing."""
    reason = should_stop() if should_stop is not None else None
    if reason:
        raise Interrupted(Cut(reason, at.done, at.total, at.unit), what)


@contextmanager
def layer_clock(layers: Sequence[torch.nn.Module], should_stop: ShouldStop | None, what: str) -> Iterator[None]:
    """While inside: `should_stop` is read before each decoder layer, and a stop ends the forward there (Interrupted:
    a forward cut half way has nothing to show). The hooks are gone on leaving."""
    if should_stop is None:
        yield
        return

    def check(index: int) -> Callable[..., None]:
        return lambda module, args: check_clock(should_stop, Cut("", index, len(layers), "layers"), what)

    handles = [layer.register_forward_pre_hook(check(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

