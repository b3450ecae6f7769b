"""Splitting a GPTQ-quantized fused linear layer (Qwen v1's c_attn) into its output parts, exactly.

GPTQ ("gptq" checkpoint format, as AutoGPTQ wrote Qwen-7B-Chat-Int4) stores a Linear(in, out) as
- `qweight` int32 [in * bits / 32, out]: packed along the input dim, so each output column is whole;
- `qzeros` int32 [groups, out * bits / 32]: packed along the output dim, 32 / bits columns per int32;
- `scales` [groups, out] and `bias` [out]: plain per-column values;
- `g_idx` int32 [in]: each input row's group, the same for every output column.
Splitting the outputs is therefore a column slice of everything, with `qzeros` sliced in whole int32 words, which
needs every part to be a multiple of 32 / bits columns (4096 and 128 are; a tiny test model picks sizes that are).
No value is dequantized or repacked, so the split layers compute exactly what the fused one did.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

PACKABLE_BITS = (2, 4, 8)  # 3-bit GPTQ packs across int32 boundaries and cannot be sliced per column
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def split_gptq_linear(tensors: Mapping[str, torch.Tensor], sizes: Sequence[int], bits: int
                      ) -> list[dict[str, torch.Tensor]]:
    """One dict of GPTQ tensors (qweight, qzeros, scales, g_idx, and bias when present) per output part."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"GPTQ bits={bits} cannot be split per output column (supported: {PACKABLE_BITS})")
    missing = [p for p in _PARTS if p not in tensors]
    if missing:
        raise ValueError(f"GPTQ layer is missing {', '.join(missing)}")
    per_word = 32 // bits
    qweight, qzeros, scales, g_idx = (tensors[p] for p in _PARTS)
    out = sum(sizes)
    checks = {"qweight": (qweight.shape[-1], out), "scales": (scales.shape[-1], out),
              "qzeros": (qzeros.shape[-1] * per_word, out)}
    if "bias" in tensors:
        checks["bias"] = (tensors["bias"].shape[-1], out)
    for name, (have, want) in checks.items():
        if have != want:
            raise ValueError(f"GPTQ {name} covers {have} output columns, expected {want} ({' + '.join(map(str, sizes))})")
    if qweight.shape[0] * per_word != g_idx.shape[0]:
        raise ValueError(f"GPTQ qweight packs {qweight.shape[0] * per_word} input rows but g_idx has {g_idx.shape[0]}")
    pieces: list[dict[str, torch.Tensor]] = []
    start = 0
    for size in sizes:
        if size % per_word or start % per_word:
            raise ValueError(f"GPTQ {bits}-bit qzeros pack {per_word} columns per int32; a part of {size} columns "
                             f"at column {start} does not fall on a word boundary")
        stop = start + size
        piece = {"qweight": qweight[:, start:stop].contiguous(),
                 "qzeros": qzeros[:, start // per_word:stop // per_word].contiguous(),
                 "scales": scales[:, start:stop].contiguous(),
                 "g_idx": g_idx.clone()}
        if "bias" in tensors:
            piece["bias"] = tensors["bias"][start:stop].contiguous()
        pieces.append(piece)
        start = stop
    return pieces
