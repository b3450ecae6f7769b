"""Loading progress moves per tensor (transformers' own bar, reported to the caller), and two loads on two
threads never report into each other's bar."""

from __future__ import annotations

import json
import struct
import threading

from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry


def _tensor_count(model_dir) -> int:
    with open(model_dir / "model.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return len([k for k in json.loads(f.read(size)) if k != "__metadata__"])


def test_load_progress_moves_per_tensor(tiny_registry_path, tiny_dir):
    spec = load_registry(tiny_registry_path).get("tiny-qwen2")
    seen = []
    load_model(spec, device="cpu", progress=lambda phase, done, total: seen.append((phase, done, total)))
    steps = [(done, total) for phase, done, total in seen if phase == "loading weights"]
    tensors = _tensor_count(tiny_dir)
    assert [d for d, _ in steps] == list(range(1, tensors + 1)) and {t for _, t in steps} == {tensors}
    assert [p for p, _, _ in seen][:2] == ["load tokenizer", "load weights"] and seen[-1] == ("load weights", 1, 1)


def test_concurrent_loads_report_to_their_own_bars(tiny_registry_path, tiny_dir):
    spec = load_registry(tiny_registry_path).get("tiny-qwen2")
    bars: dict[int, list] = {0: [], 1: []}
    start = threading.Barrier(2)

    def load(i):
        start.wait()
        load_model(spec, device="cpu", progress=lambda phase, done, total: bars[i].append(phase))

    threads = [threading.Thread(target=load, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tensors = _tensor_count(tiny_dir)
    assert [bar.count("loading weights") for bar in bars.values()] == [tensors, tensors]
    # and a load without a bar reports nothing anywhere
    load_model(spec, device="cpu")
    assert [bar.count("loading weights") for bar in bars.values()] == [tensors, tensors]


def test_the_cpu_layout_after_the_tensors_moves_the_bar_too(tiny_registry_path):
    """Issue 19 item 3: after the per-tensor bar the load went on (the CPU layout of the weights) with the bar
    standing still; it now reports each linear layer it lays out."""
    import torch

    from qdemo.models.cpu_layout import LAYOUT_PHASE

    spec = load_registry(tiny_registry_path).get("tiny-qwen2")
    seen = []
    lm = load_model(spec, device="cpu", progress=lambda phase, done, total: seen.append((phase, done, total)))
    linears = sum(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    assert [(d, t) for p, d, t in seen if p == LAYOUT_PHASE] == [(i, linears) for i in range(1, linears + 1)]
    assert seen[-1] == ("load weights", 1, 1)


def test_a_half_precision_load_reports_its_batch_probe(tiny_registry_path):
    """The probe that decides whether a row computes alike alone and in a batch runs at load: the bar names it
    (from 0 to done) before the load ends, and a float32 load has no such phase."""
    from qdemo.models.loader import ROWS_PHASE

    spec = load_registry(tiny_registry_path).get("tiny-qwen2")
    for dtype, expected in (("bfloat16", [(0, 1), (1, 1)]), ("float32", [])):
        seen = []
        load_model(spec, device="cpu", dtype=dtype, progress=lambda phase, done, total: seen.append((phase, done, total)))
        assert [(d, t) for p, d, t in seen if p == ROWS_PHASE] == expected, dtype
        assert seen[-1] == ("load weights", 1, 1)
