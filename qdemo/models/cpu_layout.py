"""Weight layout for fast CPU decoding.

A decode step is a chain of matrix-vector products that stream every weight once. On x86 CPUs PyTorch's
kernels stream a tall weight (out_features > in_features: MLP gate/up, lm_head) markedly faster when it is
stored column-major, i.e. as the transposed view of a contiguous [in, out] tensor. Measured on the 2-core
AVX2 dev machine with Qwen2.5-0.5B fp32: transformers' greedy generate 3.5 → 4.4 tok/s, same tokens. The
module and its state-dict keys stay as they are; only the storage order changes.
"""

from __future__ import annotations

import torch


def column_major_tall_linears(model: torch.nn.Module) -> int:
    """Re-lay tall Linear weights column-major in place; returns how many were changed. Weights shared with
    another module (tied embeddings) are left alone: an embedding lookup wants rows contiguous."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[param.data_ptr()] = counts.get(param.data_ptr(), 0) + 1
    changed = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if weight.shape[0] <= weight.shape[1] or not weight.is_contiguous() or counts[weight.data_ptr()] > 1:
            continue
        weight.data = weight.data.t().contiguous().t()
        changed += 1
    return changed
