"""A sampling sweep: one context, a grid over one or two sampling axes, N seeded samples per cell, all decoded as
rows of one batch after one shared prefill (in chunks of rows; each chunk after the first reuses the prefill from
the decode state the chunk before it left), and each cell's measures (qdemo.views.sweep_measures). No Gradio here.

Sample k of the sweep has seed `seed + k`, shown with it: any sample can be run again alone and gives the same
tokens (a row of a batch equals its solo run with the same settings and seed)."""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from qdemo.core.events import DoneEvent, TokenEvent
from qdemo.sampling import SamplingParams
from qdemo.services.admission import ModelRequest, Refused, Services
from qdemo.services.kept_states import client_state
from qdemo.services.lab import local_context_ids
from qdemo.serving.limits import Client
from qdemo.views.sweep_measures import CellMeasures, Sample, cell_measures
from qdemo.views.sweep_view import SweepCell
from qdemo.views.tokens import TOP_ALTERNATIVES

AXES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
MAX_AXES, MAX_VALUES = 2, 5
DEFAULT_SAMPLES, MAX_SAMPLES = 8, 32
ROWS_PER_CHUNK = 8  # rows decoded together (the llama.cpp forward holds at most 8 sequences per context)
ENDED = ("eos", "stop_token")
GREEDY_NOTE = "The base settings are greedy; a sweep samples, so every row samples with its cell's settings."


@dataclass(frozen=True)
class Grid:
    axes: tuple[tuple[str, tuple[float, ...]], ...]  # (field, its values), one or two
    samples: int  # per cell
    seed: int  # sample k's seed is seed + k

    def cells(self) -> list[dict[str, float]]:
        names = [name for name, _ in self.axes]
        return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in self.axes))]


def read_grid(axes: Any, samples: Any = DEFAULT_SAMPLES, seed: Any = 0) -> Grid:
    """The grid as a caller sent it ({field: [values]}), read strictly: every refusal names its field."""
    if not isinstance(axes, dict) or not 1 <= len(axes) <= MAX_AXES:
        raise Refused(f"axes must be an object of one or two sampling fields ({', '.join(AXES)}) to lists of values")
    read = []
    for name, values in axes.items():
        if name not in AXES:
            raise Refused(f"axes: {str(name)[:40]!r} is not a sweepable field; use one of {', '.join(AXES)}")
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_VALUES:
            raise Refused(f"axes {name}: give 1 to {MAX_VALUES} values in a list")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            raise Refused(f"axes {name}: every value must be a number")
        if name == "top_k" and any(float(v) != int(v) for v in values):
            raise Refused("axes top_k: every value must be a whole number (0 = off)")
        kept = tuple(int(v) if name == "top_k" else float(v) for v in values)
        if len(set(kept)) != len(kept):
            raise Refused(f"axes {name}: a value appears twice")
        for value in kept:  # its range, before any model is admitted or loaded
            try:
                SamplingParams(**{name: value})
            except ValueError as exc:
                raise Refused(f"axes {name}: {exc}") from None
        read.append((name, kept))
    for name, value, low, high in (("samples", samples, 1, MAX_SAMPLES), ("seed", seed, 0, 2 ** 62)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Refused(f"{name} must be a whole number from {low} to {high}, got {repr(value)[:40]}")
    return Grid(tuple(read), samples, seed)


@dataclass(frozen=True)
class SweepRow:
    """One finished sample: what the measures read, its token events (the token view) and its text."""

    sample: Sample
    events: list[TokenEvent]
    text: str


@dataclass
class CellResult:
    """One cell's rows, by sample index (None until that row has finished)."""

    settings: dict[str, float]
    seeds: list[int]
    rows: list[SweepRow | None] = field(default_factory=list)

    @property
    def samples(self) -> list[Sample]:
        return [r.sample for r in self.rows if r is not None]

    def measures(self) -> CellMeasures:
        return cell_measures(self.samples)


@dataclass
class SweepProgress:
    cells: list[CellResult]
    rows_done: int
    rows_total: int
    done: bool = False
    labels: dict[int, str] = field(default_factory=dict)  # on the last: each shown token id's text (token views)
    rows_per_chunk: int = ROWS_PER_CHUNK
    prompt_tokens: int = 0  # prefilled once for every row
    forward: str = ""  # how the model ran ("llama.cpp Q4_K_M", "torch bf16")
    notice: str = ""  # what the admission changed (max new tokens lowered…), and that a greedy base samples


def rows_that_fit(free_bytes: int, row_bytes: int | None, cap: int = ROWS_PER_CHUNK) -> int:
    """Rows of one chunk: as many as the memory budget left holds (each row's keys and values for the prompt and
    its answer, twice over for the step's activations and logits), at most `cap`, at least one."""
    if not row_bytes:
        return cap
    return max(1, min(cap, free_bytes // (2 * row_bytes)))


def _rows(grid: Grid, base: SamplingParams) -> list[tuple[int, int, SamplingParams]]:
    """(cell index, sample index, that sample's settings) for every sample of the sweep, in cell order."""
    rows = []
    for c, cell in enumerate(grid.cells()):
        for k in range(grid.samples):
            rows.append((c, k, base.replace(do_sample=True, seed=grid.seed + c * grid.samples + k, **cell)))
    return rows


def _sample(events: list[TokenEvent], done: DoneEvent) -> Sample:
    """A finished row as the measures read it: the raw log-probability of each token, and how many tokens a stage
    (not the raw distribution) put on top."""
    raw = tuple(math.log(max(e.stages[0].chosen_prob, 1e-45)) for e in events)
    changed = sum(e.stages[0].token_ids[:1] != e.stages[-1].token_ids[:1] for e in events)
    return Sample(tokens=tuple(e.token_id for e in events), raw_logprobs=raw, ended=done.reason in ENDED,
                  stage_changed=changed)


def sweep(services: Services, client: Client | str | None, text: Any, mode: Any, model: Any, settings: Any,
          axes: Any, samples: Any = DEFAULT_SAMPLES, seed: Any = 0, stop: threading.Event | None = None
          ) -> Iterator[SweepProgress]:
    """A caller's sweep through the same admission as every request: the grid and context read strictly, the
    model's defaults under `settings`, the caller's kept decode state for the shared prefill, the server's prompt
    and time limits (one deadline for the whole sweep)."""
    grid = read_grid(axes, samples, seed)
    with services.admit(client, ModelRequest(model, settings)) as admitted:
        backend, params = admitted.backend, admitted.params[0]
        ids = local_context_ids(services, backend, text, mode, "a sampling sweep (its measures read every stage)")
        if len(ids) > services.limits.max_prompt_tokens:
            raise Refused(f"the context has {len(ids)} tokens; this server's prompt limit is "
                          f"{services.limits.max_prompt_tokens}")
        # need_logits let only a LocalBackend through: it sizes the chunks and knows its forward's rounding
        row_bytes = backend.kv_bytes_per_token() * (len(ids) + params.max_new_tokens)
        free = services.pool.budget - services.pool.used_bytes()
        rows = rows_that_fit(free, row_bytes, backend.exact_rows(ROWS_PER_CHUNK))
        notes = (admitted.notice, "" if params.do_sample else GREEDY_NOTE, backend.batch_note())
        notice = " ".join(n for n in notes if n)
        with client_state(services.states, client, backend) as state:
            for progress in run_sweep(backend, ids, params, grid, state, stop, rows_per_chunk=rows,
                                      time_limit_s=services.limits.max_generation_seconds):
                progress.notice = notice
                yield progress


def view_cells(progress: SweepProgress) -> list[SweepCell]:
    """The cells as the Sweep view, its exports, the API and the store read them: a sample that did not run (Stop,
    the time limit) has its seed and None for its text."""
    return [SweepCell(c.settings, c.seeds, [r.text if r is not None else None for r in c.rows],
                      c.measures() if c.samples else None) for c in progress.cells]


def run_sweep(backend: Any, ids: Sequence[int], base: SamplingParams, grid: Grid, state: Any = None,
              stop: threading.Event | None = None, rows_per_chunk: int = ROWS_PER_CHUNK,
              time_limit_s: float | None = None) -> Iterator[SweepProgress]:
    """Every sample of the grid, `rows_per_chunk` rows at a time from one prefill of `ids` (a kept `state` keeps
    it between chunks), yielding progress after each finished row; the top-20 stages are captured (the
    measures read them). `time_limit_s` is one deadline for the whole sweep: the rows running then end with
    reason "time_limit" and no later chunk starts."""
    deadline = time.perf_counter() + time_limit_s if time_limit_s is not None else None
    if base.beam_search:
        raise Refused("a sweep samples: set num_beams to 1")
    rows = _rows(grid, base)
    cells = [CellResult(cell, [], [None] * grid.samples) for cell in grid.cells()]
    for c, _, p in rows:
        cells[c].seeds.append(p.seed)
    done_rows = 0
    for start in range(0, len(rows), rows_per_chunk):
        left = deadline - time.perf_counter() if deadline is not None else None
        if (stop is not None and stop.is_set()) or (left is not None and left <= 0):
            break
        chunk = rows[start:start + rows_per_chunk]
        tokens: dict[int, list[TokenEvent]] = {i: [] for i in range(len(chunk))}
        for event in backend.generate_rows(list(ids), [p for _, _, p in chunk], stop_event=stop, top_n=20,
                                           time_limit_s=left, state=state):
            if isinstance(event, TokenEvent):
                tokens[event.row].append(event)
            elif isinstance(event, DoneEvent):
                c, k, _ = chunk[event.row]
                cells[c].rows[k] = SweepRow(_sample(tokens[event.row], event), tokens[event.row], event.text)
                done_rows += 1
                yield SweepProgress(cells, done_rows, len(rows), rows_per_chunk=rows_per_chunk, prompt_tokens=len(ids),
                                    forward=backend.forward_label)
    yield SweepProgress(cells, done_rows, len(rows), done=True, labels=_labels(backend, cells),
                        rows_per_chunk=rows_per_chunk, prompt_tokens=len(ids), forward=backend.forward_label)


def _labels(backend: Any, cells: Sequence[CellResult]) -> dict[int, str]:
    """The text of every token the samples' token views show: each chosen token and the top alternatives its
    tooltips list."""
    ids = {i for c in cells for r in c.rows if r is not None for e in r.events
           for i in (e.token_id, *(t for s in e.stages for t in s.token_ids[:TOP_ALTERNATIVES]))}
    return backend.token_texts(sorted(ids))
