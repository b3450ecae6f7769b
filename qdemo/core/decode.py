"""A decode state that outlives a call, and the step primitives that work on it.

`DecodeState` holds B rows of token ids and the KV cache computed for exactly those tokens. A caller may keep it
between calls (the next chat turn prefills only what is new), `crop` it back to a shorter prefix (Undo, edit,
Regenerate, a rejected speculative draft), `fork` one row into several (one prefill, two Compare sides), and
`select` rows (drop finished ones, reorder beams).

The primitives, small and single-purpose as in gpt-fast's generate.py:
- `prefill(lm, state, rows, lock, chunk)`: append each row's new tokens (left-padded when a fresh batch has
  prompts of different lengths), a chunk per turn at the step gate; returns the next-token logits of every row.
- `decode_step(lm, state, tokens, lock)`: one token per row; returns the next logits.
- `choose(logits, rows, top_n)`: each row's processor chain, seeded generator and stage summaries.
- `position_logits(lm, ids, lock)`: teacher-forced logits at every position (the one path scoring uses).

The state's invariant, kept by every primitive: the cache holds K/V for `tokens[:, :width]`, nothing else. A forward
that fails half way leaves the state `broken` (some layers updated, some not); callers drop it then.
Nothing here knows about chats, prompts or Gradio: it works on token ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch

from qdemo.core.events import StageTopN
from qdemo.core.support import draw, run_on_support
from qdemo.core.support_summary import summarise_chained
from qdemo.forwards.runner import Runner
from qdemo.forwards.torch_runner import runner_for
from qdemo.models.loader import LoadedModel

StepLock = Callable[[], ContextManager[Any]]
# A run's clock, read between chunks, units or layers: "stopped" (the user's Stop, a caller gone), "time_limit", or
# None to go on (qdemo.core.emit.Deadline.reason is one).
ShouldStop = Callable[[], str | None]
_GROW = 256  # token columns added when the buffers fill up


@dataclass
class DecodeState:
    """B rows of token ids and the KV cache of exactly those tokens, padded to one width: row i's padding is the
    columns [gap, gap + pads[i]) — at the left (gap 0) for prompts of different lengths, or after a prefix the rows
    share (a batch forked from one prefill)."""

    model: str  # the model whose cache this is: a state never crosses models
    cache: Any  # the runner's cache: a transformers DynamicCache, or a llama.cpp context's sequences
    tokens: torch.Tensor  # [B, capacity] long; row i's tokens: tokens[i, :gap] then tokens[i, gap + pads[i]:width]
    pads: list[int]  # padding per row
    runner: Runner  # how this model runs a forward and keeps its cache (TorchRunner, LlamaCppRunner)
    width: int = 0  # columns in use (the cache's sequence length)
    broken: bool = False  # a forward failed half way: the cache no longer matches the tokens
    gap: int = 0  # the column where every row's padding starts
    # (the prompt, the logits after it) of the last forked prefill: a later fork of that prompt (the next chunk of a
    # sweep, the same Compare again) feeds nothing. Feeding its last token again would compute it in a batch of
    # another size, which some kernels round differently, and the rows would part from their solo runs.
    tail: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        return len(self.pads)

    def row_ids(self, row: int = 0) -> list[int]:
        return self.row_tensor(row)[0].tolist()

    def row_tensor(self, row: int) -> torch.Tensor:
        """[1, n] the row's tokens, its padding left out."""
        pad = self.pads[row]
        if not pad:
            return self.tokens[row:row + 1, :self.width]
        if not self.gap:
            return self.tokens[row:row + 1, pad:self.width]
        ends = self.gap + pad
        return torch.cat([self.tokens[row:row + 1, :self.gap], self.tokens[row:row + 1, ends:self.width]], dim=1)

    def kv_bytes(self) -> int:
        """Keys and values in use: the rows' tokens × a token's bytes (see Runner.kv_bytes)."""
        return self.runner.kv_bytes(self) if self.cache is not None else 0

    def kv_allocated(self) -> int:
        """Bytes the cache occupies in memory, in use or not (what a kept state costs the pool's budget)."""
        return self.runner.kv_allocated(self) if self.cache is not None else 0

    def release(self) -> None:
        """Free the cache now (the state is done with)."""
        if self.cache is not None:
            self.runner.release(self)
            self.cache = None

    # --- shape changes -------------------------------------------------------------------------------------
    def crop(self, length: int) -> None:
        """Keep the first `length` columns of one row (a padded row: only columns before its padding): the cache
        forgets the rest."""
        if self.rows != 1 or (self.pads[0] and length > self.gap):
            raise ValueError("crop needs one row, cut before its padding")
        if not 0 <= length <= self.width:
            raise ValueError(f"crop to {length} tokens, but the state holds {self.width}")
        if length < self.width:
            self.runner.crop(self, length)
            self.width = length
        if self.tail is not None and length < len(self.tail[0]):
            self.tail = None
        if length <= self.gap or self.pads[0]:
            self.gap, self.pads = 0, [0]

    def tail_of(self, ids: Sequence[int]) -> torch.Tensor | None:
        """The logits after `ids` when this state's last forked prefill was `ids` and row 0 still holds them."""
        if self.tail is None or self.tail[0] != tuple(ids) or self.rows != 1 or self.width < len(ids):
            return None
        return self.tail[1] if common_prefix(self.row_ids(0), ids) == len(ids) else None

    def keep_prefix(self, ids: Sequence[int], upto: int) -> int:
        """Crop a one-row state to its longest common prefix with ids[:upto]; returns how many tokens it kept
        (those need not be fed again)."""
        held = min(common_prefix(self.row_ids(0), ids), upto) if self.width else 0
        self.crop(held)
        return held

    def settle(self) -> None:
        """Make the state one unpadded row that a session can keep: the first row, cut before its padding (a
        batch forked from a shared prefix keeps that prefix)."""
        if self.rows > 1:
            self.select([0])
        if self.pads[0]:
            self.crop(self.gap)

    def fork(self, rows: int) -> None:
        """One row → `rows` identical rows (one prefill shared by several continuations)."""
        if self.rows != 1:
            raise ValueError(f"fork needs one row, the state has {self.rows}")
        if rows > 1:
            self.runner.fork(self, rows)
            self.tokens = self.tokens.repeat(rows, 1)
            self.pads = self.pads * rows

    def select(self, rows: Sequence[int]) -> None:
        """Keep these rows, in this order (finished rows dropped; beams reordered)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.tokens.device)
        if self.width:
            self.runner.select(self, list(rows))
        self.tokens = self.tokens.index_select(0, index)
        self.pads = [self.pads[i] for i in rows]

    def _reserve(self, extra: int) -> None:
        need = self.width + extra
        if need > self.tokens.shape[1]:
            grown = torch.zeros((self.rows, need + _GROW), dtype=torch.long, device=self.tokens.device)
            grown[:, :self.width] = self.tokens[:, :self.width]
            self.tokens = grown


def new_state(lm: LoadedModel, rows: int = 1, capacity: int = _GROW) -> DecodeState:
    runner = runner_for(lm)
    return DecodeState(model=lm.key, cache=runner.new_cache(rows, capacity),
                       tokens=torch.zeros((rows, capacity), dtype=torch.long, device=lm.device), pads=[0] * rows,
                       runner=runner)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# --- forwards -------------------------------------------------------------------------------------------------

def _forward(lm: LoadedModel, state: DecodeState, columns: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """Run `columns` [B, n] after the state's width through its runner; returns fp32 logits of the last `keep`
    positions [B, keep, V] and advances the state."""
    n = columns.shape[1]
    try:
        logits = state.runner.feed(state, columns, keep)
    except BaseException:
        state.broken = True
        raise
    # A kept state moves between the engine, the lens and scoring (some run under inference mode): its buffers are
    # always written in inference mode, so none of them refuses the next in-place write.
    with torch.inference_mode():
        state._reserve(n)
        state.tokens[:, state.width:state.width + n] = columns
    state.width += n
    return logits


def prefill(lm: LoadedModel, state: DecodeState, rows: Sequence[Sequence[int]], lock: StepLock, chunk: int,
            should_stop: Callable[[], str | None] | None = None) -> tuple[torch.Tensor | None, str | None]:
    """Append each row's tokens, `chunk` columns per turn at the gate. Rows of different lengths are padded before
    their tokens: at the left of a fresh state, or after the prefix an unpadded used state holds (its `gap`); a
    padded used state takes the same number of new tokens per row. Returns (the next-token logits [B, V], None),
    or (None, reason) when `should_stop` said so between chunks."""
    if len(rows) != state.rows:
        raise ValueError(f"prefill got {len(rows)} rows for a state of {state.rows}")
    lengths = {len(r) for r in rows}
    if 0 in lengths:
        raise ValueError("prefill needs at least one token per row")
    if any(state.pads) and len(lengths) != 1:
        raise ValueError("a padded state takes the same number of new tokens in every row")
    longest = max(lengths)
    block = torch.zeros((state.rows, longest), dtype=torch.long, device=state.tokens.device)
    if len(lengths) > 1:
        state.gap = state.width
    for i, row in enumerate(rows):
        block[i, longest - len(row):] = torch.tensor(list(row), dtype=torch.long)
        if len(lengths) > 1:
            state.pads[i] = longest - len(row)
    # On a fresh state the padding columns are prefilled too (masked), with the first chunk.
    logits = None
    for start in range(0, longest, chunk):
        with lock():
            logits = _forward(lm, state, block[:, start:start + chunk])[:, -1, :]
        if should_stop is not None and start + chunk < longest:
            reason = should_stop()
            if reason:
                return None, reason
    return logits, None


def decode_step(lm: LoadedModel, state: DecodeState, tokens: Sequence[int], lock: StepLock) -> torch.Tensor:
    """Feed one token per row; returns the next-token logits [B, V]."""
    column = torch.tensor([[int(t)] for t in tokens], dtype=torch.long, device=state.tokens.device)
    with lock():
        began = time.perf_counter()
        logits = _forward(lm, state, column)[:, -1, :]
        if lm.device.type == "cpu":  # elsewhere the forward returns before the device is done: nothing to time
            lm.step_costs.add(state.rows, time.perf_counter() - began)
        return logits


def verify(lm: LoadedModel, state: DecodeState, tokens: Sequence[int], lock: StepLock) -> torch.Tensor:
    """Feed several tokens to one row in one forward (speculative verification); returns the logits after each
    of them [len(tokens), V]."""
    block = torch.tensor([list(tokens)], dtype=torch.long, device=state.tokens.device)
    with lock():
        return _forward(lm, state, block, keep=len(tokens))[0]


# --- choosing -------------------------------------------------------------------------------------------------

@dataclass
class RowChooser:
    """How one row picks its next token: its processor chain (transformers' classes, by name) and its seeded
    generator; greedy rows take the argmax after the chain, as generate(do_sample=False) does. `exact_draw`: draw
    as transformers does (multinomial over the full vocabulary, token for token the same under the same seed)
    instead of among the surviving tokens."""

    stages: list
    greedy: bool
    generator: torch.Generator | None = None
    top_n: int = 20
    exact_draw: bool = False


@torch.inference_mode()
def choose(logits: torch.Tensor, state: DecodeState, choosers: Sequence[RowChooser]
           ) -> list[tuple[int, tuple[StageTopN, ...]]]:
    """Each row's token and stage summaries, from logits [B, V]. The repetition penalty sees the row's own tokens;
    the filters narrow the tokens later stages and the draw look at (qdemo.core.support). Only each stage's top-N
    and the chosen token's probabilities leave the device."""
    out = []
    for row, chooser in enumerate(choosers):
        seq = state.row_tensor(row)
        keep = chooser.top_n > 0
        chained = run_on_support(logits[row:row + 1], seq, chooser.stages, keep=keep)
        if chooser.greedy:
            index = torch.argmax(chained.scores, dim=-1)
            token = index if chained.support is None else chained.support[index]
        else:
            token = draw(chained, chooser.generator, exact=chooser.exact_draw)
        if not keep:
            out.append((int(token.item()), ()))
        else:
            out.append(summarise_chained(chained, token, chooser.top_n))
    return out


# --- teacher-forced logits ---------------------------------------------------------------------------------

def resumed(lm: LoadedModel, kept: DecodeState | None, ids: Sequence[int], upto: int, capacity: int = _GROW
            ) -> tuple[DecodeState, int]:
    """A state to feed `ids` into, and how many of them it already holds: a kept one-row state cropped to its
    longest common prefix with ids[:upto], else a fresh one (0). The caller releases a fresh state, not a kept one."""
    if kept is None:
        return new_state(lm, 1, capacity), 0
    if kept.rows != 1 or kept.model != lm.key or kept.broken:
        raise ValueError(f"a kept decode state must be one unbroken row of {lm.spec.name}")
    return kept, kept.keep_prefix(ids, upto)


def position_logits(lm: LoadedModel, ids: Sequence[int], lock: StepLock, chunk: int = 32, *, start: int = 0,
                    state: DecodeState | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Teacher-forced fp32 logits at every position of one sequence, a chunk at a time: yields (s, logits [n, V])
    where row j is the distribution over the token after ids[s + j] (the last row: after the whole sequence).
    One forward of at most `chunk` tokens per turn at the gate; positions before `start` are fed as context only
    (their logits are not kept), and a kept one-row `state` supplies those it already holds (it then holds `ids`).
    Never holds [len(ids), V] at once; a fresh state is released at the end, also when the consumer stops early."""
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("position_logits needs at least one token")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if not 0 <= start < len(ids):
        raise ValueError(f"start must be in [0, {len(ids) - 1}], got {start}")
    return _position_chunks(lm, ids, lock, chunk, start, state)  # checked now; the state is made on the first chunk


def _position_chunks(lm: LoadedModel, ids: list[int], lock: StepLock, chunk: int, start: int,
                     kept: DecodeState | None) -> Iterator[tuple[int, torch.Tensor]]:
    state, held = resumed(lm, kept, ids, start, max(len(ids), _GROW))
    try:
        block = torch.tensor([ids], dtype=torch.long, device=state.tokens.device)
        for begin in range(held, len(ids), chunk):
            end = min(len(ids), begin + chunk)
            first = max(begin, start)
            keep = end - first if end > start else 1  # context-only chunks keep one row (0 would mean all)
            with lock():
                logits = _forward(lm, state, block[:, begin:end], keep=keep)
            if end > start:
                yield first, logits[0]
    finally:
        if state is not kept:
            state.release()


def last_logits(lm: LoadedModel, ids: Sequence[int], lock: StepLock, chunk: int = 512,
                state: DecodeState | None = None) -> torch.Tensor:
    """fp32 [V] logits for the token after `ids`, prefilled a chunk per turn at the gate: into a kept one-row
    `state` after its longest common prefix with `ids` (the state then holds `ids`), else into a throwaway one
    (the path for a runner without torch modules)."""
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("last_logits needs at least one token")
    used, reused = resumed(lm, state, ids, len(ids) - 1)
    try:
        logits, _ = prefill(lm, used, [ids[reused:]], lock, chunk)
    finally:
        if used is not state:
            used.release()
    return logits[0].clone()
