"""Reading original-layout checkpoints and writing native ones, one tensor at a time.

A converter streams: each source tensor is mapped to zero or more output tensors and written into size-capped
safetensors shards as it goes, so a 13B checkpoint converts without holding two copies in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Progress = Callable[[str, float, float], None]
# map_tensor(name, tensor) -> [(new name, tensor), ...]; an empty list drops the tensor.
TensorMap = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]

SHARD_BYTES = 2 << 30
INDEX = "model.safetensors.index.json"


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path.parent}: no {path.name} ({what})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_optional_json(path: Path) -> dict:
    return read_json(path, "optional") if path.is_file() else {}


def weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors preferred, else PyTorch .bin (the older Baichuan releases)."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise ValueError(f"{src}: no weights (*.safetensors or pytorch_model*.bin)")


def iter_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, shard by shard. .bin shards load with weights_only (no code runs)."""
    for path in weight_files(src):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                yield name, state.pop(name)


def count_tensors(src: Path) -> int:
    total = 0
    for path in weight_files(src):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                total += len(list(f.keys()))
        else:
            total += len(torch.load(path, map_location="meta", weights_only=True, mmap=True))
    return total


class ShardWriter:
    """Collects tensors into safetensors shards of at most SHARD_BYTES and writes the index at the end."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.out, self.shard_bytes = out, shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for names in self._files):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._files)
        save_file(self._pending, str(self.out / f"part-{index:05d}.safetensors"), metadata={"format": "pt"})
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._files:
            self._flush()
        # Final names follow transformers' convention so from_pretrained finds them.
        count = len(self._files)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._files):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out / f"part-{i:05d}.safetensors").rename(self.out / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            (self.out / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))


def convert_tensors(src: Path, out: Path, map_tensor: TensorMap, progress: Optional[Progress] = None,
                    expected: Optional[set[str]] = None) -> set[str]:
    """Stream every source tensor through map_tensor into out; returns the names written. With `expected`,
    a missing or unexpected output name is an error naming it (a truncated or foreign checkpoint)."""
    total = count_tensors(src)
    writer = ShardWriter(out)
    written: set[str] = set()
    for done, (name, tensor) in enumerate(iter_tensors(src), start=1):
        for new_name, new_tensor in map_tensor(name, tensor):
            writer.add(new_name, new_tensor)
            written.add(new_name)
        if progress:
            progress("convert weights", done, total)
    writer.close()
    if expected is not None:
        missing, extra = sorted(expected - written), sorted(written - expected)
        if missing or extra:
            detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {extra[:3]}" if extra else "")
            raise ValueError(f"{src}: the converted checkpoint does not match its config: {detail.strip()}")
    return written


def split_rows(tensor: torch.Tensor, sizes: list[int], name: str) -> list[torch.Tensor]:
    """Split a fused [sum(sizes), ...] weight (or bias) along dim 0."""
    if tensor.shape[0] != sum(sizes):
        raise ValueError(f"tensor {name} has {tensor.shape[0]} rows, expected {sum(sizes)} ({sizes})")
    return [part.clone() for part in torch.split(tensor, sizes, dim=0)]


def normalise_rows(weight: torch.Tensor) -> torch.Tensor:
    """NormHead: each output row scaled to unit L2 norm (computed in fp32, stored in the weight's dtype)."""
    return torch.nn.functional.normalize(weight.float(), dim=-1).to(weight.dtype)


def layer_index(name: str, prefix: str) -> tuple[int, str] | None:
    """'transformer.h.3.attn.c_attn.weight' with prefix 'transformer.h.' → (3, 'attn.c_attn.weight')."""
    if not name.startswith(prefix):
        return None
    number, _, rest = name[len(prefix):].partition(".")
    return (int(number), rest) if number.isdigit() else None


def source_dtype(config: dict) -> torch.dtype:
    """The dtype the original checkpoint declares (torch_dtype / dtype, or Qwen's bf16/fp16 flags)."""
    name = config.get("torch_dtype") or config.get("dtype")
    if not name:
        name = "bfloat16" if config.get("bf16") else "float16" if config.get("fp16") else "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json: unknown torch_dtype {name!r}")
    return dtype
