"""Weight sources: GGUF parts are verified before anything is parsed or cached; caches are atomic."""

from __future__ import annotations

import hashlib
import sys

import pytest

from qdemo.errors import SourceError
from qdemo.models import sources
from qdemo.models.registry import GgufPartsSource, HubSource, LocalSource, ModelSpec
from qdemo.sampling import SamplingParams


def make_packages(root, name: str, chunks: list[bytes]) -> list[str]:
    """Fake data packages laid out like the real ones: <pkg>/data/partNN.bin (plus code never run)."""
    names = []
    for i, chunk in enumerate(chunks, start=1):
        package = f"{name}_part{i}"
        data = root / package / "data"
        data.mkdir(parents=True)
        (root / package / "__init__.py").write_text("raise RuntimeError('package code must not run')\n")
        (data / f"part{i:02d}.bin").write_bytes(chunk)
        names.append(package.replace("_", "-"))
    return names


def gguf_spec(packages, payload: bytes, sha256: str | None = None, size: int | None = None) -> ModelSpec:
    return ModelSpec(
        name="fake", display_name="fake", family="qwen2", max_context=64, sampling=SamplingParams(max_new_tokens=8),
        source=GgufPartsSource(packages=tuple(packages), file_name="fake.gguf",
                               size=size if size is not None else len(payload),
                               sha256=sha256 or hashlib.sha256(payload).hexdigest()),
    )


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for mod in [m for m in sys.modules if m.startswith("qdfake")]:
        del sys.modules[mod]


def cache_is_empty() -> bool:
    models = sources.cache_root() / "models"
    return not models.exists() or not any(models.iterdir())


def test_parts_located_in_order_without_running_package_code(fake_site):
    chunks = [b"GGUF-one|", b"two|", b"three"]
    spec = gguf_spec(make_packages(fake_site, "qdfake_a", chunks), b"".join(chunks))
    parts = sources.locate_parts(spec)
    assert [p.read_bytes() for p in parts] == chunks
    assert not any(m.startswith("qdfake_a") for m in sys.modules)


def test_sha256_mismatch_is_clear_and_caches_nothing(fake_site):
    chunks = [b"A" * 1000, b"B" * 500]
    spec = gguf_spec(make_packages(fake_site, "qdfake_b", chunks), b"".join(chunks), sha256="0" * 64)
    with pytest.raises(SourceError, match="model fake: sha256 of the assembled file is .* expected 0{64}"):
        sources.resolve(spec)
    assert cache_is_empty()
    assert sources.cache_state(spec) == "not prepared"


def test_size_mismatch_is_caught_before_hashing(fake_site):
    chunks = [b"A" * 10]
    spec = gguf_spec(make_packages(fake_site, "qdfake_c", chunks), b"".join(chunks), size=11)
    with pytest.raises(SourceError, match="hold 10 bytes, expected 11"):
        sources.resolve(spec)
    assert cache_is_empty()


def test_missing_package(fake_site):
    spec = gguf_spec(["qdfake-not-installed"], b"x")
    with pytest.raises(SourceError, match="package 'qdfake-not-installed' is not installed"):
        sources.resolve(spec)
    assert sources.cache_state(spec) == "packages missing"


def test_interrupted_conversion_leaves_no_half_cache(fake_site, monkeypatch):
    chunks = [b"GGUF" + b"\0" * 64]
    spec = gguf_spec(make_packages(fake_site, "qdfake_d", chunks), b"".join(chunks))
    seen = []

    def interrupted(gguf_path, out, progress):
        out.mkdir()
        (out / "config.json").write_text("{}")
        seen.append(gguf_path.read_bytes())
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_dequantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sources.resolve(spec)
    assert seen == chunks  # verified bytes reached the converter
    assert cache_is_empty() and sources.cache_state(spec) == "not prepared"


def test_completed_conversion_is_reused(fake_site, monkeypatch):
    chunks = [b"GGUF" + b"\1" * 64]
    spec = gguf_spec(make_packages(fake_site, "qdfake_e", chunks), b"".join(chunks))
    calls = []
    progress = []

    def convert(gguf_path, out, progress_fn):
        calls.append(1)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_dequantize", convert)
    first = sources.resolve(spec, lambda *a: progress.append(a))
    second = sources.resolve(spec)
    assert first == second and calls == [1]
    assert (first / sources.MARKER).is_file() and not (first / "fake.gguf").exists()
    assert sources.cache_state(spec) == "prepared"
    assert progress[-1] == ("assemble + sha256", len(chunks[0]), len(chunks[0]))
    # nothing but the finished entry is left in the cache folder
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_garbage_gguf_with_right_checksum_fails_cleanly(fake_site):
    payload = b"not a gguf file at all"
    spec = gguf_spec(make_packages(fake_site, "qdfake_f", [payload]), payload)
    with pytest.raises(Exception):
        sources.resolve(spec)
    assert cache_is_empty()


def test_hub_offline_without_cache_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(name="hubby", display_name="h", family="qwen2", max_context=64,
                     sampling=SamplingParams(max_new_tokens=8),
                     source=HubSource(repo_id="Qwen/Qwen2.5-0.5B-Instruct", revision="main"))
    with pytest.raises(SourceError, match="hubby: Qwen/Qwen2.5-0.5B-Instruct@main is not in the Hugging Face "
                                          "cache .*HF_HUB_OFFLINE"):
        sources.resolve(spec)
    assert sources.cache_state(spec) == "not downloaded"


def test_local_without_config(tmp_path):
    spec = ModelSpec(name="loco", display_name="l", family="qwen2", max_context=64,
                     sampling=SamplingParams(max_new_tokens=8), source=LocalSource(path=tmp_path))
    with pytest.raises(SourceError, match="loco: local path .* has no config.json"):
        sources.resolve(spec)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "x"))
    assert sources.cache_root() == tmp_path / "x"
    monkeypatch.delenv("QDEMO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_root() == tmp_path / "xdg" / "qdemo"


def test_the_verified_gguf_is_kept_for_the_llama_cpp_forward(fake_site, monkeypatch):
    """Prepared once, the GGUF stays (the llama.cpp forward maps it) and is trusted while unchanged; a changed file
    is assembled and checked again."""
    chunks = [b"GGUF" + b"\2" * 40, b"tail"]
    payload = b"".join(chunks)
    spec = gguf_spec(make_packages(fake_site, "qdfake_g", chunks), payload)
    monkeypatch.setattr(sources, "_dequantize", lambda gguf_path, out, progress: out.mkdir())
    sources.resolve(spec)
    kept = sources.gguf_path(spec)
    assert kept.read_bytes() == payload
    phases = []
    assert sources.gguf_file(spec, lambda *a: phases.append(a)) == kept and phases == []
    kept.write_bytes(b"GGUF" + b"\0" * (len(payload) - 4))  # same size, other bytes (and a new mtime)
    assert sources.gguf_file(spec, lambda *a: phases.append(a)) == kept
    assert kept.read_bytes() == payload and phases[-1][0] == "assemble + sha256"


def test_gguf_file_of_a_checkpoint_entry_names_it(tmp_path):
    spec = ModelSpec(name="plain", display_name="plain", family="qwen2", max_context=64,
                     sampling=SamplingParams(max_new_tokens=8), source=LocalSource(path=tmp_path))
    with pytest.raises(SourceError, match="model plain is not a GGUF entry"):
        sources.gguf_file(spec)
