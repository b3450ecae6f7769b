"""Logit lens: what each layer's residual stream would predict if the model stopped there.

Every decoder layer's output (and, on request, the residual stream after its attention sublayer) is projected
through the model's own final norm and lm_head — the same two modules that turn the last layer into logits, so
the last row of the grid is the model's own distribution (the oracle the tests hold it to). The residuals are
taken with forward hooks during chunked forwards of a throwaway decode state, one chunk per turn at the step
gate; the hooks exist only inside that turn, so other users' steps on the same model never see them.

Rows: "embed" (the token embeddings), then per layer i "L{i} attn" (after attention, optional) and "L{i}" (after
the MLP, the layer's output). Columns: the positions whose next token is inspected.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from qdemo.core.decode import DecodeState, ShouldStop, _forward, resumed
from qdemo.errors import Cut, Interrupted
from qdemo.models.loader import LoadedModel

StepLock = Callable[[], ContextManager[None]]
EMBED = "embed"


@dataclass(frozen=True)
class LensGrid:
    """A layers × positions grid of lens distributions (top-k per cell) for one sequence."""

    model: str
    rows: tuple[str, ...]  # "embed", ["L0 attn"], "L0", …; the last row is the model's own output
    positions: tuple[int, ...]  # sequence index of each column's last input token
    targets: tuple[int, ...]  # the token that followed each position (-1: the sequence ends there)
    top_ids: np.ndarray  # int64 [rows, columns, k]
    top_probs: np.ndarray  # float32 [rows, columns, k]
    target_probs: np.ndarray  # float32 [rows, columns]: the lens probability of the token that followed
    layer_rows: tuple[int, ...]  # indices of the rows that are whole-layer outputs (commitment is read there)
    cut: Cut | None = None  # the lens ended early (Stop, the time limit): the columns it finished

    @property
    def top1(self) -> np.ndarray:
        return self.top_ids[:, :, 0]

    def commitment(self, column: int) -> int | None:
        """The first layer-output row whose top-1 is the token that followed (None: never, e.g. a sampled token
        the model did not rank first)."""
        target = self.targets[column]
        for r in self.layer_rows:
            if int(self.top_ids[r, column, 0]) == target:
                return r
        return None

    def stays_from(self, column: int) -> int | None:
        """The first layer-output row from which the token that followed stays top-1 to the end."""
        target, start = self.targets[column], None
        for r in self.layer_rows:
            if int(self.top_ids[r, column, 0]) == target:
                start = r if start is None else start
            else:
                start = None
        return start

    def cell(self, row: int, column: int, texts: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
        """The cell's top-k: rank, id, text, probability."""
        texts = texts or {}
        return [{"rank": k + 1, "id": int(i), "token": texts.get(int(i), str(int(i))), "prob": float(p)}
                for k, (i, p) in enumerate(zip(self.top_ids[row, column], self.top_probs[row, column]))]

    def to_frame(self, texts: Mapping[int, str] | None = None):
        """One row per cell: layer row, position, top-1 and its probability, the target's probability."""
        texts = texts or {}
        records = []
        for c, pos in enumerate(self.positions):
            commit, stays = self.commitment(c), self.stays_from(c)
            for r, name in enumerate(self.rows):
                top = int(self.top_ids[r, c, 0])
                records.append({"row": name, "position": pos, "target_id": self.targets[c],
                                "target": texts.get(self.targets[c], ""), "top1_id": top,
                                "top1": texts.get(top, str(top)), "top1_prob": float(self.top_probs[r, c, 0]),
                                "target_prob": float(self.target_probs[r, c]),
                                "commitment": self.rows[commit] if commit is not None else "",
                                "stays_from": self.rows[stays] if stays is not None else ""})
        return pd.DataFrame.from_records(records)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rows": list(self.rows), "positions": list(self.positions),
                "targets": list(self.targets), "top_ids": self.top_ids.tolist(),
                "top_probs": np.round(self.top_probs.astype(np.float64), 6).tolist(),
                # JSON has no NaN: a column whose sequence ends there has no following token (None)
                "target_probs": [[None if np.isnan(v) else round(float(v), 6) for v in row]
                                 for row in self.target_probs],
                "commitment": [self.rows[c] if (c := self.commitment(i)) is not None else None
                               for i in range(len(self.positions))],
                "stays_from": [self.rows[c] if (c := self.stays_from(i)) is not None else None
                               for i in range(len(self.positions))],
                "cut": asdict(self.cut) if self.cut else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def _parts(lm: LoadedModel) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module, torch.nn.Module]:
    model = lm.model
    if model is None:
        raise ValueError(f"model {lm.spec.name}: the logit lens needs the torch weights (this copy runs on "
                         f"{lm.forward_label})")
    inner = getattr(model, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    head = model.get_output_embeddings()
    if layers is None or norm is None or head is None:
        raise ValueError(f"model {lm.spec.name}: no model.layers / model.norm / lm_head (not a Llama-like model)")
    return inner.get_input_embeddings(), layers, norm, head


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Recorder:
    """Hooks that copy the residual stream at the wanted columns of one chunk (rows in grid order)."""

    def __init__(self, embed: torch.nn.Module, layers: torch.nn.ModuleList, sublayers: bool) -> None:
        self.modules = (embed, layers)
        self.sublayers = sublayers
        self.columns: torch.Tensor | None = None  # chunk-local indices to keep
        self.kept: dict[str, torch.Tensor] = {}
        self._layer_in: torch.Tensor | None = None

    def _keep(self, name: str, hidden: torch.Tensor) -> None:
        self.kept[name] = hidden[0].index_select(0, self.columns).float()

    def attach(self) -> list[Any]:
        embed, layers = self.modules
        handles = [embed.register_forward_hook(lambda m, a, out: self._keep(EMBED, _hidden(out)))]
        for i, layer in enumerate(layers):
            if self.sublayers:
                handles.append(layer.register_forward_pre_hook(self._take_input, with_kwargs=True))
                handles.append(layer.self_attn.register_forward_hook(
                    lambda m, a, out, i=i: self._keep(f"L{i} attn", self._layer_in + _hidden(out))))
            handles.append(layer.register_forward_hook(lambda m, a, out, i=i: self._keep(f"L{i}", _hidden(out))))
        return handles

    def _take_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._layer_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


PROJECT_BLOCK = 512  # vectors per lm_head GEMM: big enough to read the head's weights once per block, not per row


def _project(kept: dict[str, torch.Tensor], names: Sequence[str], head: torch.nn.Module, norm: torch.nn.Module,
             targets: torch.Tensor, out: tuple[np.ndarray, np.ndarray, np.ndarray], cols: slice, k: int,
             should_stop: ShouldStop | None = None) -> str | None:
    """Every row's kept residuals through norm and lm_head, rows stacked into blocks of PROJECT_BLOCK vectors (the
    head is the size of several layers: one pass per row would read it once per row). Returns why it stopped
    before the last block (`should_stop` is read between blocks), or None when every row is projected."""
    top_ids, top_probs, target_probs = out
    per_row = cols.stop - cols.start
    rows_per_block = max(1, PROJECT_BLOCK // per_row)
    for first in range(0, len(names), rows_per_block):
        reason = should_stop() if should_stop is not None and first else None
        if reason:
            return reason
        block = names[first:first + rows_per_block]
        stacked = torch.cat([kept[name] for name in block]).to(head.weight.dtype)
        probs = torch.softmax(head(norm(stacked)).float(), dim=-1)
        values, indices = torch.topk(probs, k, dim=-1)
        hit = probs.gather(1, targets.to(probs.device).repeat(len(block))[:, None])[:, 0]
        shape = (len(block), per_row)
        top_ids[first:first + len(block), cols] = indices.cpu().numpy().reshape(*shape, k)
        top_probs[first:first + len(block), cols] = values.cpu().numpy().reshape(*shape, k)
        target_probs[first:first + len(block), cols] = hit.cpu().numpy().reshape(shape)
        del probs
    return None


def row_names(layers: int, sublayers: bool) -> tuple[str, ...]:
    names = [EMBED]
    for i in range(layers):
        names += [f"L{i} attn", f"L{i}"] if sublayers else [f"L{i}"]
    return tuple(names)


@torch.inference_mode()
def logit_lens(lm: LoadedModel, ids: Sequence[int], positions: Sequence[int], lock: StepLock = nullcontext,
               sublayers: bool = False, top: int = 10, chunk: int = 256, *, should_stop: ShouldStop | None = None,
               state: DecodeState | None = None) -> LensGrid:
    """The lens grid of `ids` at `positions` (sequence indices; each column shows what follows that token).
    One forward of the sequence (chunked at the gate); each row is projected right after its chunk, so memory
    holds [rows, columns, hidden] and one [columns, vocab] block at a time. `should_stop` is read before every
    chunk and projection block: when it says stop, the grid holds the columns of the chunks finished (`cut` says
    how many), or Interrupted is raised when there are none. A kept one-row `state` supplies the tokens before the
    first position that it already holds (and then holds the ids up to the last position)."""
    ids = [int(t) for t in ids]
    wanted = sorted({int(p) for p in positions})
    if not ids:
        raise ValueError(f"model {lm.spec.name}: the logit lens needs at least one token")
    if not wanted:
        raise ValueError(f"model {lm.spec.name}: pick at least one position for the logit lens")
    if wanted[0] < 0 or wanted[-1] >= len(ids):
        raise ValueError(f"model {lm.spec.name}: lens positions must be in 0..{len(ids) - 1}, got {wanted[-1]}")
    embed, layers, norm, head = _parts(lm)
    names = row_names(len(layers), sublayers)
    targets = [ids[p + 1] if p + 1 < len(ids) else -1 for p in wanted]
    k = max(1, min(int(top), lm.vocab_size))
    out = (np.zeros((len(names), len(wanted), k), dtype=np.int64),
           np.zeros((len(names), len(wanted), k), dtype=np.float32),
           np.zeros((len(names), len(wanted)), dtype=np.float32))
    run = _LensRun(lm, _Recorder(embed, layers, sublayers), names, (head, norm), out, k, lock, should_stop)
    done, reason = run.chunks(ids, wanted, targets, chunk, state)
    cut = Cut(reason, done, len(wanted), "columns") if reason else None
    if cut and not done:
        raise Interrupted(cut, f"model {lm.spec.name}: the logit lens")
    top_ids, top_probs, target_probs = (a[:, :done] for a in out)
    wanted, targets = wanted[:done], targets[:done]
    target_probs[:, [i for i, t in enumerate(targets) if t < 0]] = np.nan
    layer_rows = tuple(i for i, n in enumerate(names) if n != EMBED and not n.endswith(" attn"))
    return LensGrid(model=lm.spec.name, rows=names, positions=tuple(wanted), targets=tuple(targets),
                    top_ids=top_ids, top_probs=top_probs, target_probs=target_probs, layer_rows=layer_rows,
                    cut=cut)


@dataclass
class _LensRun:
    """One lens pass: chunked forwards of a throwaway decode state, each chunk's columns projected in its turn."""

    lm: LoadedModel
    recorder: _Recorder
    names: tuple[str, ...]
    modules: tuple[torch.nn.Module, torch.nn.Module]  # lm_head, final norm
    out: tuple[np.ndarray, np.ndarray, np.ndarray]
    k: int
    lock: StepLock
    should_stop: ShouldStop | None

    def chunks(self, ids: list[int], wanted: list[int], targets: list[int], chunk: int,
               kept: DecodeState | None = None) -> tuple[int, str | None]:
        """(columns finished, why it ended early or None)."""
        target_index = torch.tensor([max(t, 0) for t in targets], dtype=torch.long)
        state, held = resumed(self.lm, kept, ids, wanted[0])
        done = 0
        try:
            block = torch.tensor([ids], dtype=torch.long, device=state.tokens.device)
            end_at = wanted[-1] + 1  # nothing after the last wanted position is needed
            for begin in range(held, end_at, chunk):
                reason = self.should_stop() if self.should_stop is not None else None
                if reason:
                    return done, reason
                end = min(end_at, begin + chunk)
                here = [p for p in wanted if begin <= p < end]
                reason = self._chunk(state, block[:, begin:end], [p - begin for p in here],
                                     target_index[done:done + len(here)], slice(done, done + len(here)))
                if reason:  # stopped inside the chunk's projection: its columns are incomplete
                    return done, reason
                done += len(here)
        finally:
            if state is not kept:
                state.release()
        return done, None

    def _chunk(self, state: Any, columns: torch.Tensor, here: list[int], targets: torch.Tensor, cols: slice
               ) -> str | None:
        recorder = self.recorder
        recorder.columns = torch.tensor(here or [0], dtype=torch.long, device=state.tokens.device)
        recorder.kept = {}
        with self.lock():
            handles = recorder.attach()
            try:
                _forward(self.lm, state, columns, keep=1)
            finally:
                for h in handles:
                    h.remove()
            if here:  # project while holding the turn: it reads the same weights as a step
                head, norm = self.modules
                return _project(recorder.kept, self.names, head, norm, targets, self.out, cols, self.k,
                                self.should_stop)
        return None
