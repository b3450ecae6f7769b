"""The torch runner: a transformers model's forwards with a DynamicCache."""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
from transformers import DynamicCache

from qdemo.forwards.gate import guard_forwards
from qdemo.forwards.runner import Gate, Runner, RunnerState
from qdemo.models.loader import LoadedModel


HALF_BATCH_NOTE = ("On torch {dtype} this machine's kernels round a batch's rows a little unlike a row alone, so a "
                   "sample re-run alone from its seed (in Chat) can part from the sweep's after a few tokens; the "
                   "sweep itself re-runs the same. The llama.cpp forward or float32 re-run each sample alone as the "
                   "sweep drew it.")


class TorchRunner:
    """A transformers model's forwards with a DynamicCache (the torch path)."""

    # No cap: in float32 a batch's rows give their solo runs' tokens (measured on the 0.5B model: 8 of 8, raw
    # probabilities within 4e-6), and half precision pads one-row products where that makes rows alike
    # (qdemo.models.batch_invariance). Where it cannot, a cap of one row would give up the batch's whole gain, so
    # the sweep says so instead (batch_note).
    solo_exact_rows: int | None = None

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.cache_kw = _cache_kwarg(lm.model)  # read once: inspecting the signature per forward costs ~25 µs

    @property
    def batch_note(self) -> str | None:
        return None if self.lm.rows_alike else HALF_BATCH_NOTE.format(dtype=str(self.lm.dtype).removeprefix("torch."))

    def new_cache(self, rows: int, capacity: int) -> Any:
        return DynamicCache(config=self.lm.model.config)

    @torch.inference_mode()
    def feed(self, state: RunnerState, columns: torch.Tensor, keep: int) -> torch.Tensor:
        n = columns.shape[1]
        kwargs = {self.cache_kw: state.cache}
        if any(state.pads):
            mask = padding_mask(state.pads, state.width + n, columns.device, state.gap)
            # Positions count real tokens only, so a left-padded row starts at 0 (padding gets 1, as generate does).
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, state.width:]
        else:  # unpadded rows: an all-ones mask, and the model counts positions from its cache as generate does
            mask = _ones(state.rows, state.width + n, columns.device)
        out = self.lm.model(input_ids=columns, attention_mask=mask, use_cache=True, logits_to_keep=keep, **kwargs)
        # fp32 copy as generate() makes, so processors see the same numbers.
        return out.logits[:, -keep:, :].to(copy=True, dtype=torch.float32)

    def crop(self, state: RunnerState, length: int) -> None:
        state.cache.crop(length - state.width)

    def fork(self, state: RunnerState, rows: int) -> None:
        state.cache.batch_repeat_interleave(rows)

    def select(self, state: RunnerState, rows: list[int]) -> None:
        state.cache.batch_select_indices(torch.tensor(rows, dtype=torch.long, device=state.tokens.device))

    def kv_bytes(self, state: RunnerState) -> int:
        return kv_cache_bytes(state.cache)  # the tensors hold exactly the rows' columns (forks are copies)

    def kv_allocated(self, state: RunnerState) -> int:
        return kv_cache_bytes(state.cache)

    def release(self, state: RunnerState) -> None:
        pass  # the tensors go with the last reference

    def guard(self, gate: Gate, name: str) -> None:
        guard_forwards(self.lm.model, gate, name)


def runner_for(lm: LoadedModel) -> Runner:
    """The model's runner: the one its loader attached (llama.cpp), else a torch runner over its modules (made per
    call and cheap: a copy of the LoadedModel with other modules, as tests make, gets its own)."""
    return cast(Runner, lm.runner) if lm.runner is not None else TorchRunner(lm)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers Cache (0 for anything else)."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():  # a transformers Cache has layers; other caches count 0
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def padding_mask(pads: list[int], width: int, device: torch.device, gap: int = 0) -> torch.Tensor:
    """[B, width] attention mask: 0 on each row's padding (columns gap .. gap + pad), 1 elsewhere."""
    columns = torch.arange(width, device=device)[None, :]
    ends = gap + torch.tensor(pads, device=device)[:, None]
    return ((columns < gap) | (columns >= ends)).long()


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.2x names the argument `cache`; earlier releases call it `past_key_values`.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_ONES: dict[tuple[int, str], torch.Tensor] = {}


def _ones(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """A [rows, width] all-ones mask, sliced from a buffer grown as needed (no allocation per decode step)."""
    key = (rows, str(device))
    buffer = _ONES.get(key)
    if buffer is None or buffer.shape[1] < width:
        buffer = _ONES[key] = torch.ones((rows, max(width, 2 * (buffer.shape[1] if buffer is not None else 1024))),
                                         dtype=torch.long, device=device)
    return buffer[:, :width]
