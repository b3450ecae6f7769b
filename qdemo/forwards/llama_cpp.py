"""A llama.cpp forward for GGUF registry entries, under qdemo's own processor chain.

llama.cpp (in process, through llama-cpp-python's bindings) runs the model on the GGUF's own quantized blocks and
hands qdemo the **full raw logits** of each step; the engine's chain, seeded sampler, stop rules, stage capture and
events run on them unchanged. `LlamaCppRunner` is a Runner (qdemo.forwards.runner) like the torch one: each
DecodeState owns one llama.cpp context whose sequences are the state's rows, so crop (`memory_seq_rm`), fork
(`memory_seq_cp`) and select work as on the torch path, several rows decode in one batch reading the weights once,
and a kept state is reused across turns. Weights are loaded once per process (memory-mapped) and shared by every
context.

Optional: `pip install -r requirements-llama.txt` (it builds llama.cpp from source). Without it the torch path
runs, and `available()` says why.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdemo.errors import SourceError
from qdemo.forwards.gate import UngatedForwardError
from qdemo.forwards.runner import Gate, RunnerState
from qdemo.models.loader import LoadedModel, read_checkpoint
from qdemo.models.registry import ModelSpec
from qdemo.models.sources import ProgressFn, gguf_file

MAX_ROWS = 8  # sequences per context: Compare's sides, beams, batches
# Rows that decode in one call exactly as each would alone. From 8 tokens a call ggml switches this CPU's matrix
# kernels (measured: a sweep's 8-row steps moved raw probabilities by up to 3e-2, so seeded draws parted from
# their solo runs within a few tokens; 7 rows matched 12 of 12). Work that promises solo-run equality stays below.
SOLO_EXACT_ROWS = 7
BATCH = 512  # tokens per llama_decode call (and per compute micro-batch)
FIRST_CONTEXT = 2048  # tokens of a new context (KV cells shared by its rows)
_BACKEND = threading.Lock()
_initialised = False


def available() -> str | None:
    """None when the llama.cpp forward can run here, else a one-line hint."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "the llama.cpp forward is not installed (pip install -r requirements-llama.txt; it builds llama.cpp)"
    return None


def _lib():
    import llama_cpp  # optional (requirements-llama.txt builds it): imported only once the fast path is asked for

    global _initialised
    with _BACKEND:
        if not _initialised:
            llama_cpp.llama_backend_init()
            # The bindings print every llama.cpp log line (each load and context) on stderr: errors only, unless asked.
            llama_cpp._logger.set_verbose(os.environ.get("QDEMO_LLAMA_LOG", "") == "1")
            _initialised = True
    return llama_cpp


@dataclass
class LlamaWeights:
    """A GGUF model loaded once per process (memory-mapped), shared by every context."""

    path: Path
    threads: int
    handle: Any = None
    n_vocab: int = 0
    kv_bytes_per_token: int = 0
    description: str = ""

    def load(self, progress: ProgressFn | None = None) -> "LlamaWeights":
        """The model loaded; `progress` hears llama.cpp's own count of how far it has read the weights."""
        lib = _lib()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0  # qdemo's llama.cpp forward is its CPU path; on a GPU torch runs
        params.use_extra_bufts = extra_buffers()
        reported = lib.llama_progress_callback(_progress_relay(progress))  # must outlive the load call
        if progress is not None:
            params.progress_callback = reported
        handle = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise RuntimeError(f"llama.cpp could not load {self.path.name}")
        self.handle = handle
        self._finalizer = weakref.finalize(self, lib.llama_model_free, handle)
        vocab = lib.llama_model_get_vocab(handle)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        layers = int(lib.llama_model_n_layer(handle))
        heads, kv_heads = int(lib.llama_model_n_head(handle)), int(lib.llama_model_n_head_kv(handle))
        head_dim = int(lib.llama_model_n_embd(handle)) // heads
        self.kv_bytes_per_token = 2 * layers * kv_heads * head_dim * 2  # keys and values, f16
        return self

    def close(self) -> None:
        """Free the model now (every context made from it must be closed first)."""
        if self.handle:
            self._finalizer()
            self.handle = None


def _progress_relay(progress: ProgressFn | None):
    """llama.cpp's load callback: it passes the fraction read on and always answers "go on" (False would abort the
    load, and so would an exception escaping into C, which ctypes turns into a false answer)."""

    def relay(fraction: float, _user_data: Any) -> bool:
        try:
            if progress is not None:
                progress(LOAD_PHASE, min(max(float(fraction), 0.0), 1.0), 1)
        except Exception:  # noqa: BLE001 - a progress bar's failure must not abort the load
            pass
        return True

    return relay


class _CacheFull(Exception):
    """llama_decode found no room in the context's KV cache (it restored the cache as it was)."""


class LlamaCache:
    """One llama.cpp context: its sequences are a decode state's rows (row i → seqs[i]). It holds its weights, so
    the model outlives every context made from it; the context is freed by `close()` or when the cache goes."""

    def __init__(self, ctx: Any, n_ctx: int, rows: int, weights: "LlamaWeights") -> None:
        self.ctx, self.n_ctx, self.seqs, self.weights = ctx, n_ctx, list(range(rows)), weights
        self.retired: set[int] = set()  # sequences of rows `select` dropped, their cells kept (see select)
        self._finalizer = weakref.finalize(self, _lib().llama_free, ctx)

    def close(self) -> None:
        self._finalizer()
        self.ctx = None


class LlamaCppRunner:
    """A Runner on llama.cpp (qdemo.forwards.runner says what each method promises)."""

    solo_exact_rows = SOLO_EXACT_ROWS
    batch_note = None

    def __init__(self, weights: LlamaWeights) -> None:
        self.weights = weights
        self.gate: Gate | None = None  # the pool's StepGate: every forward must hold it (as the torch guard checks)

    def guard(self, gate: Gate, name: str) -> None:
        self.gate = gate

    # --- contexts ----------------------------------------------------------------------------------------------
    def new_cache(self, rows: int, capacity: int) -> LlamaCache:
        # Room for a long chat from the start; a context that fills up is moved into one twice the size.
        return self._context(max(rows, 1), max(capacity, FIRST_CONTEXT))

    def _context(self, rows: int, n_ctx: int) -> LlamaCache:
        lib = _lib()
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = max(512, n_ctx) if n_ctx <= 4096 else 4096
        params.n_ubatch = min(512, params.n_batch)
        params.n_seq_max = MAX_ROWS
        params.n_threads = params.n_threads_batch = self.weights.threads
        params.kv_unified = True  # sequences share cells: a fork copies no keys or values
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.weights.handle, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        return LlamaCache(ctx, n_ctx, rows, self.weights)

    def release(self, state: RunnerState) -> None:
        if state.cache is not None:
            state.cache.close()

    def _memory(self, cache: LlamaCache):
        return _lib().llama_get_memory(cache.ctx)

    # --- the forward -------------------------------------------------------------------------------------------
    def feed(self, state: RunnerState, columns: torch.Tensor, keep: int) -> torch.Tensor:
        if self.gate is not None and not self.gate.held_here():
            raise UngatedForwardError(f"{state.model}: a llama.cpp forward ran outside its step gate")
        n = columns.shape[1]
        longest = max(state.width + n - p for p in state.pads)
        if longest > state.cache.n_ctx:  # certainly too small; a forked state's rows share their prefix's cells
            self._grow(state, max(longest + 256, 2 * state.cache.n_ctx))
        out = np.zeros((state.rows, keep, self.weights.n_vocab), dtype=np.float32)
        while True:
            entries, wanted = self._batch_entries(state, columns, keep)
            targets = iter(wanted)

            def take(ctx, index: int) -> None:
                row, slot = next(targets)
                pointer = _lib().llama_get_logits_ith(ctx, index)
                out[row, slot] = np.ctypeslib.as_array(pointer, shape=(self.weights.n_vocab,))

            try:
                self._decode(state.cache, entries, take)
                return torch.from_numpy(out)
            except _CacheFull:
                # llama.cpp restored the cache as it was before the failed batch; drop any earlier batches of this
                # forward too, then retry the whole forward in a context twice the size.
                self.crop(state, state.width)
                self._grow(state, 2 * state.cache.n_ctx)

    def _batch_entries(self, state: RunnerState, columns: torch.Tensor, keep: int):
        """(token, position, seq, wants logits) per real token (padding is not fed: llama.cpp sequences are
        separate, no mask needed), and which (row, slot) each logits output fills, in entry order."""
        n = columns.shape[1]
        tokens = columns.tolist()
        entries, wanted = [], []
        for row in range(state.rows):
            pad = state.pads[row]
            for j in range(n):
                column = state.width + j
                if state.gap <= column < state.gap + pad:
                    continue
                logits = j >= n - keep
                position = column if column < state.gap else column - pad
                entries.append((tokens[row][j], position, state.cache.seqs[row], logits))
                if logits:
                    wanted.append((row, j - (n - keep)))
        return entries, wanted

    def _decode(self, cache: LlamaCache, entries, take=None) -> None:
        """Decode the entries in batches of at most BATCH tokens; `take(ctx, i)` reads each logits output right
        after its batch (llama.cpp keeps only the last batch's logits)."""
        lib = _lib()
        for start in range(0, len(entries), BATCH):
            part = entries[start:start + BATCH]
            batch = lib.llama_batch_init(len(part), 0, 1)
            try:
                batch.n_tokens = len(part)
                for i, (token, pos, seq, logits) in enumerate(part):
                    batch.token[i] = token
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 1 if logits else 0
                code = lib.llama_decode(cache.ctx, batch)
                if code == 1:
                    raise _CacheFull()
                if code != 0:
                    raise RuntimeError(f"llama.cpp decode failed (code {code})")
                for i, entry in enumerate(part):
                    if entry[3]:
                        take(cache.ctx, i)
            finally:
                lib.llama_batch_free(batch)

    def _grow(self, state: RunnerState, n_ctx: int) -> None:
        """A bigger context for a state that outgrew its own: each sequence's keys and values are copied over
        (no recomputation), then the old context is freed."""
        lib, old = _lib(), state.cache
        fresh = self._context(len(old.seqs), n_ctx)
        for row, seq in enumerate(old.seqs):
            size = lib.llama_state_seq_get_size(old.ctx, seq)
            buffer = (ctypes.c_uint8 * size)()
            written = lib.llama_state_seq_get_data(old.ctx, buffer, size, seq)
            if written and not lib.llama_state_seq_set_data(fresh.ctx, buffer, written, fresh.seqs[row]):
                raise RuntimeError(f"{state.model}: could not move a sequence into a {n_ctx}-token llama.cpp context")
        state.cache = fresh
        old.close()

    # --- shape changes -----------------------------------------------------------------------------------------
    def crop(self, state: RunnerState, length: int) -> None:
        """Forget every row's positions from column `length` on."""
        memory = self._memory(state.cache)
        for row, seq in enumerate(state.cache.seqs):
            pad = state.pads[row]
            position = length if length <= state.gap else max(length - pad, state.gap)
            _lib().llama_memory_seq_rm(memory, seq, position, -1)

    def fork(self, state: RunnerState, rows: int) -> None:
        if rows > MAX_ROWS:
            raise ValueError(f"the llama.cpp forward takes at most {MAX_ROWS} rows, got {rows}")
        memory = self._memory(state.cache)
        source = state.cache.seqs[0]  # any id: a kept row may be the one `select` left, not sequence 0
        targets = [seq for seq in range(MAX_ROWS) if seq != source][:rows - 1]
        for seq in state.cache.retired | set(targets):  # a new batch: the last one's finished rows go now
            _lib().llama_memory_seq_rm(memory, seq, -1, -1)
        for seq in targets:
            _lib().llama_memory_seq_cp(memory, source, seq, -1, -1)
        state.cache.retired = set()
        state.cache.seqs = [source] + targets

    def select(self, state: RunnerState, rows: list[int]) -> None:
        """Row k of the result continues old row rows[k]; a row chosen twice gets a copy of its sequence.

        A dropped row's cells stay where they are (its sequence is retired, not removed): freed cells would take the
        next steps' tokens behind the kept rows' later ones, and ggml's attention reads a sequence's cells in cell
        order, so the kept rows would sum in another order than alone and drift from their solo runs (measured on a
        sweep: 9 of 16 rows equal over 48 tokens with the cells freed). Retired cells are removed when their id is
        needed again, by a fork, or with the context."""
        lib, memory, cache = _lib(), self._memory(state.cache), state.cache
        used: set[int] = set()
        new_seqs: list[int | None] = []
        for source in rows:
            seq = cache.seqs[source]
            new_seqs.append(None if seq in used else seq)
            used.add(seq)
        cache.retired |= set(cache.seqs) - used
        spare = [s for s in range(MAX_ROWS) if s not in used and s not in cache.retired]
        spare += sorted(cache.retired)  # ids never used first: reusing a retired one frees its cells
        for k, seq in enumerate(new_seqs):
            if seq is None:
                target = spare.pop(0)
                if target in cache.retired:
                    lib.llama_memory_seq_rm(memory, target, -1, -1)
                    cache.retired.discard(target)
                lib.llama_memory_seq_cp(memory, cache.seqs[rows[k]], target, -1, -1)
                new_seqs[k] = target
        cache.seqs = list(new_seqs)

    def kv_bytes(self, state: RunnerState) -> int:
        """Keys and values in use: each row's tokens (its padding is never fed) × a token's bytes. Forked rows share
        their prefix's cells (kv_unified), yet each row counts it: a row's figure is the cache it reads, and does not
        change when another row leaves; the memory actually held is `kv_allocated`."""
        held = sum(max(state.width - pad, 0) for pad in state.pads)
        return held * self.weights.kv_bytes_per_token

    def kv_allocated(self, state: RunnerState) -> int:
        """The context's whole cache, allocated up front for FIRST_CONTEXT tokens or more, used or not."""
        return state.cache.n_ctx * self.weights.kv_bytes_per_token


def extra_buffers() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (weights repacked for AVX2 / AMX kernels).

    QDEMO_LLAMA_REPACK=on|off, else on unless the CPU reports AMX: llama.cpp's AMX kernels stop the whole process
    with SIGILL (`tilezero`) on virtual machines that report AMX without running its tiles, as the 2-core Sapphire
    Rapids dev VM does, even with the kernel's AMX permission granted. Without them llama.cpp reads the GGUF's blocks
    as stored (measured there: 27 tok/s, and the app keeps running)."""
    choice = os.environ.get("QDEMO_LLAMA_REPACK", "auto").strip().lower()
    if choice in ("on", "1", "true"):
        return True
    if choice in ("off", "0", "false"):
        return False
    return "amx_tile" not in _cpu_flags()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:  # not Linux: no AMX VMs to work around
        return set()


def default_threads() -> int:
    configured = os.environ.get("QDEMO_LLAMA_THREADS", "").strip()
    return int(configured) if configured else torch.get_num_threads()


LOAD_PHASE = "load weights (llama.cpp, memory-mapped)"


def load_llama_model(spec: ModelSpec, device: str | torch.device | None = None,
                     progress: ProgressFn | None = None, threads: int | None = None) -> LoadedModel:
    """The GGUF entry on llama.cpp's forward (in process): the prepared checkpoint directory gives the tokenizer
    and config, the kept GGUF the weights (memory-mapped, never dequantized)."""
    missing = available()
    if missing:
        raise SourceError(f"model {spec.name}: {missing}")
    checkpoint = read_checkpoint(spec, progress)
    gguf = gguf_file(spec, progress)
    if progress:
        progress(LOAD_PHASE, 0, 1)
    weights = LlamaWeights(gguf, threads or default_threads()).load(progress)
    if progress:
        progress(LOAD_PHASE, 1, 1)
    return LoadedModel(model=None, tokenizer=checkpoint.tokenizer, spec=spec, device=torch.device("cpu"),
                       dtype=torch.float32, family=checkpoint.family, eos_token_ids=checkpoint.eos_token_ids,
                       stop_token_ids=checkpoint.stop_token_ids, path=checkpoint.path,
                       weight_bytes=gguf.stat().st_size, max_context=checkpoint.max_context,
                       context_note=checkpoint.context_note, forward="llama.cpp", runner=LlamaCppRunner(weights),
                       config=checkpoint.config, vocab_size=weights.n_vocab)
