"""What a runner is: how one loaded model runs a forward and keeps the KV cache of a decode state.

Two implementations: `TorchRunner` (a transformers model with a DynamicCache) and `LlamaCppRunner` (llama.cpp's
forward on a GGUF, one context whose sequences are the state's rows). The decode state (qdemo.core.decode) owns the
token ids; a runner owns only the cache and keeps the invariant that it holds keys and values for exactly
`tokens[:, :width]`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class RunnerState(Protocol):
    """The part of a decode state a runner reads: its rows' tokens, padding and width, and the cache it made."""

    model: str
    cache: Any
    tokens: torch.Tensor
    pads: list[int]
    width: int
    gap: int  # the column where each row's padding (pads[row] columns) starts

    @property
    def rows(self) -> int: ...


class Gate(Protocol):
    """A step gate as a runner checks it."""

    def held_here(self) -> bool: ...


class Runner(Protocol):
    # Rows one step may decode while each row's numbers stay bit-equal to its run alone (None: any number).
    solo_exact_rows: int | None
    batch_note: str | None  # for the user, when a batch's rows may part from their solo runs anyway

    def new_cache(self, rows: int, capacity: int) -> Any:
        """An empty cache for `rows` rows, room for about `capacity` tokens."""

    def feed(self, state: RunnerState, columns: torch.Tensor, keep: int) -> torch.Tensor:
        """Run `columns` [B, n] after the state's width; fp32 logits of the last `keep` positions [B, keep, V]."""

    def crop(self, state: RunnerState, length: int) -> None:
        """Forget every position from column `length` on."""

    def fork(self, state: RunnerState, rows: int) -> None:
        """One row's cache → `rows` copies."""

    def select(self, state: RunnerState, rows: list[int]) -> None:
        """Keep these rows, in this order (a row chosen twice is copied)."""

    def kv_bytes(self, state: RunnerState) -> int:
        """Bytes of keys and values in use: each row's tokens × the bytes one token's keys and values take, summed
        over the rows (a prefix forked rows share counts in each row that reads it, so a row's share of the figure
        does not change when another row leaves)."""

    def kv_allocated(self, state: RunnerState) -> int:
        """Bytes the cache occupies in memory, in use or not (llama.cpp: its whole context)."""

    def release(self, state: RunnerState) -> None:
        """Free the cache now."""

    def guard(self, gate: Gate, name: str) -> None:
        """From now on refuse any forward that does not hold `gate` (the pool's promise, checked)."""
