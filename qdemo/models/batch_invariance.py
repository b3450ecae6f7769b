"""Half-precision CPU linears that give a row the same numbers alone as in a batch.

oneDNN's bfloat16/float16 matrix kernels on CPU take another path for a one-row product than for two rows or more,
and it rounds differently; from two rows up a row's result does not depend on the batch's size or its other rows.
So a batch's rows (a sweep's samples, Compare's sides) parted from the same rows run alone: on Qwen2.5-0.5B bf16, 2
of a sweep's 72 sampled rows equalled their solo runs, the others parting after 1-24 tokens. Here a one-row call
runs as two rows (the row twice) and keeps the first, so a row meets the same kernels alone as in any batch. On the
CPUs measured that costs nothing: the two-row bf16 product ran faster than the one-row one (896 × 4864: 0.63 against
0.92 ms).

Kernels differ by CPU, so a probe on the model's own weights decides at load: whether one-row results already
equal two-row ones (nothing to do), or two-row results stay the same in batches of 2 to 8 (pad), or neither (leave
the model as it is: the sweep then tells its user that a sample re-run alone can part).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
import torch.nn.functional as F

Verdict = Literal["alike", "padded", "varies"]
HALF = (torch.bfloat16, torch.float16)
PROBE_ROWS = 8  # the most rows a batch decodes at once (qdemo.services.sweep.ROWS_PER_CHUNK)
PROBE_SIZES = (2, 3, 5, PROBE_ROWS)


class PairedLinear(torch.nn.Linear):
    """A Linear whose one-row calls run as two rows (see the module's docstring); state dict and hooks unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return super().forward(x)
        pair = x.reshape(1, -1).repeat(2, 1)  # a real copy: a stride-0 view may take the one-row path again
        return super().forward(pair)[:1].reshape(*x.shape[:-1], self.out_features)


def make_rows_alike(model: torch.nn.Module) -> Verdict:
    """Probe the model's half-precision Linear shapes and pad their one-row calls where that makes a row's numbers
    the same alone and in a batch. Returns what the probe found ("varies": the model is left untouched)."""
    if any(hasattr(m, "qweight") for m in model.modules()):  # GPTQ's own kernels: not probed, not promised
        return "varies"
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype in HALF]
    shapes = {(tuple(m.weight.shape), m.weight.dtype, m.bias is not None): m for m in linears}
    # A thread of its own: right after probing on the loading thread, that thread's first prefill now and then
    # (1 process in ~12) computed the rotary embedding's float32 angles differently; probing apart, 30 of 30 agreed.
    with ThreadPoolExecutor(1, thread_name_prefix="qdemo-probe") as pool:
        verdicts = set(pool.map(_probe, shapes.values()))
    if not verdicts or verdicts == {"alike"}:
        return "alike"
    if "varies" in verdicts:
        return "varies"
    for module in linears:
        module.__class__ = PairedLinear
    return "padded"


@torch.inference_mode()
def _probe(module: torch.nn.Linear) -> Verdict:
    """Random rows through the module's own weight: each row alone, in a pair with itself, and in batches."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, module.in_features, generator=generator).to(module.weight.device, module.weight.dtype)
    weight, bias = module.weight, module.bias
    paired = torch.stack([F.linear(x[i].repeat(2, 1), weight, bias)[0] for i in range(PROBE_ROWS)])
    if any(not torch.equal(F.linear(x[:m], weight, bias), paired[:m]) for m in PROBE_SIZES):
        return "varies"
    alone = torch.stack([F.linear(x[i:i + 1], weight, bias)[0] for i in range(PROBE_ROWS)])
    return "alike" if torch.equal(alone, paired) else "padded"
