"""Which forward runs a model: the fast path where it can run, torch otherwise, the user's and operator's choice,
and the weight panels on the torch copy. No llama.cpp needed: availability is patched."""

from __future__ import annotations

import pytest

from qdemo.forwards import llama_cpp as llama_forward
from qdemo.forwards.choice import pick_forward, ref, split_ref
from qdemo.models.registry import GgufPartsSource, LocalSource, ModelSpec
from qdemo.sampling import SamplingParams


def spec(gguf: bool) -> ModelSpec:
    source = (GgufPartsSource(packages=("p",), file_name="m-q4_k_m.gguf", size=1, sha256="0" * 64) if gguf
              else LocalSource(path="/nowhere"))
    return ModelSpec(name="m", display_name="m", family="qwen2", max_context=64,
                     sampling=SamplingParams(max_new_tokens=8), source=source)


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.setattr(llama_forward, "available", lambda: None)
    monkeypatch.delenv("QDEMO_FORWARD", raising=False)


@pytest.fixture
def missing(monkeypatch):
    monkeypatch.setattr(llama_forward, "available", lambda: "not installed (pip install -r requirements-llama.txt)")
    monkeypatch.delenv("QDEMO_FORWARD", raising=False)


def test_gguf_on_a_cpu_takes_llama_cpp_when_installed(installed):
    assert pick_forward(spec(True), "cpu").forward == "llama.cpp"
    assert pick_forward(spec(True), "cuda").forward == "torch"  # on a GPU torch stays the path
    assert pick_forward(spec(False), "cpu").forward == "torch"
    assert pick_forward(spec(True), "cpu", "torch").forward == "torch"


def test_without_the_package_torch_runs_with_a_hint(missing):
    choice = pick_forward(spec(True), "cpu")
    assert choice.forward == "torch" and "requirements-llama.txt" in choice.note
    with pytest.raises(ValueError, match="requirements-llama.txt"):
        pick_forward(spec(True), "cpu", "llama.cpp")


def test_llama_cpp_asked_for_a_checkpoint_without_gguf_names_it(installed):
    with pytest.raises(ValueError, match="m is not a GGUF entry"):
        pick_forward(spec(False), "cpu", "llama.cpp")


def test_operator_default_and_bad_values(installed, monkeypatch):
    monkeypatch.setenv("QDEMO_FORWARD", "torch")
    assert pick_forward(spec(True), "cpu").forward == "torch"
    monkeypatch.setenv("QDEMO_FORWARD", "fast please")
    with pytest.raises(ValueError, match="QDEMO_FORWARD must be one of auto, llama.cpp, torch"):
        pick_forward(spec(True), "cpu")


def test_model_refs_round_trip():
    assert split_ref("qwen [torch]") == ("qwen", "torch")
    assert split_ref("qwen [llama.cpp]") == ("qwen", "llama.cpp")
    assert split_ref("qwen") == ("qwen", None)
    assert split_ref("qwen [gpu]") == ("qwen [gpu]", None)  # not a forward: the name stays whole (and is unknown)
    assert ref("qwen", "auto") == "qwen" and ref("qwen", "torch") == "qwen [torch]"


def test_admission_resolves_the_forward_and_weight_panels_take_torch(tmp_path, installed, monkeypatch):
    from qdemo.models.registry import parse_registry
    from qdemo.services.admission import Refused, Services
    from qdemo.serving.pool import ModelPool

    data = {"default": "g", "models": [
        {"name": "g", "family": "qwen2", "max_context": 64, "sampling": {"max_new_tokens": 8},
         "source": {"gguf": {"packages": ["p"], "file_name": "g-q4_k_m.gguf", "size": 1, "sha256": "0" * 64}}},
        {"name": "l", "family": "qwen2", "max_context": 64, "sampling": {"max_new_tokens": 8},
         "source": {"local": {"path": str(tmp_path)}}}]}
    registry = parse_registry(data, tmp_path)
    services = Services(registry=registry, pool=ModelPool(registry, "cpu", budget_bytes=1 << 30), default_model="g",
                        allow_downloads=True)
    assert services.model_ref("g") == ("g", "llama.cpp")
    assert services.model_ref("g [torch]") == ("g", "torch")
    assert services.model_ref("g", weights=True) == ("g", "torch")
    assert services.model_ref("l") == ("l", "torch")
    with pytest.raises(Refused, match="l is not a GGUF entry"):
        services.model_ref("l [llama.cpp]")
    with pytest.raises(Refused, match="unknown model"):
        services.model_ref("g [gpu]")
    assert services.forward_choices("g") == ["auto", "llama.cpp", "torch"] and services.forward_choices("l") == []
    # the line under the dropdown says which forward runs (the fake entry's packages count as installed)
    from qdemo.models.sources import Readiness
    from qdemo.services import admission

    monkeypatch.setattr(admission, "readiness", lambda spec: Readiness(True, "embedded"))
    assert "llama.cpp Q4_K_M" in services.model_info("g") and "torch" in services.model_info("g", "torch")


def test_the_pickers_show_where_a_model_has_a_choice(tiny_registry_path, installed):
    """On the real registry (its default is a GGUF entry) every tab that runs a model offers the forward; on a
    registry of checkpoints the pickers stay hidden. Building the app loads no model."""
    from qdemo.models.registry import load_registry
    from qdemo.ui.app import build_app

    def pickers(registry_path):
        demo = build_app(load_registry(registry_path))
        return {b.elem_id: b for b in demo.blocks.values()
                if getattr(b, "elem_id", None) in {"chat-forward", "compare-forward-a", "compare-forward-b",
                                                   "lab-forward"}}

    real = pickers(None)
    assert len(real) == 4 and all(p.visible and p.value == "auto" for p in real.values())
    assert [c[1] for c in real["chat-forward"].choices] == ["auto", "llama.cpp", "torch"]
    tiny = pickers(tiny_registry_path)
    assert len(tiny) == 4 and not any(p.visible for p in tiny.values())


def test_llama_cpp_extra_buffers_are_off_where_the_cpu_reports_amx(monkeypatch):
    monkeypatch.delenv("QDEMO_LLAMA_REPACK", raising=False)
    monkeypatch.setattr(llama_forward, "_cpu_flags", lambda: {"avx2", "avx512f", "amx_tile", "amx_int8"})
    assert llama_forward.extra_buffers() is False  # llama.cpp's AMX kernels SIGILL on VMs that report AMX
    monkeypatch.setattr(llama_forward, "_cpu_flags", lambda: {"avx2", "fma"})
    assert llama_forward.extra_buffers() is True
    monkeypatch.setenv("QDEMO_LLAMA_REPACK", "off")
    assert llama_forward.extra_buffers() is False
    monkeypatch.setattr(llama_forward, "_cpu_flags", lambda: {"amx_tile"})
    monkeypatch.setenv("QDEMO_LLAMA_REPACK", "on")
    assert llama_forward.extra_buffers() is True
