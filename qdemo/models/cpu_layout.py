"""Weight layout for fast CPU decoding.

A decode step is a chain of matrix-vector products that stream every weight once. On x86 CPUs PyTorch's
kernels stream a tall weight (out_features > in_features: MLP gate/up, lm_head) markedly faster when it is
stored column-major, i.e. as the transposed view of a contiguous [in, out] tensor. Measured on the 2-core
AVX2 dev machine with Qwen2.5-0.5B fp32: transformers' greedy generate 3.5 → 4.4 tok/s, same tokens. The
module and its state-dict keys stay as they are; only the storage order changes.
"""

from __future__ import annotations

import torch

from qdemo.models.progress import ProgressFn

LAYOUT_PHASE = "lay out the weights for this CPU"


def column_major_tall_linears(model: torch.nn.Module, progress: ProgressFn | None = None) -> int:
    """Re-lay tall Linear weights column-major in place; returns how many were changed. Weights shared with
    another module (tied embeddings) are left alone: an embedding lookup wants rows contiguous. `progress` hears
    each Linear looked at (about a second for a 0.5B model: the load's bar moves through it)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[param.data_ptr()] = counts.get(param.data_ptr(), 0) + 1
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    changed = 0
    for i, module in enumerate(linears, 1):
        weight = module.weight
        if weight.shape[0] > weight.shape[1] and weight.is_contiguous() and counts[weight.data_ptr()] == 1:
            weight.data = weight.data.t().contiguous().t()
            changed += 1
        if progress:
            progress(LAYOUT_PHASE, i, len(linears))
    return changed
