"""The one place that calls `from_pretrained`: picks device and dtype, returns a ready LoadedModel."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qdemo.cpu_layout import column_major_tall_linears
from qdemo.errors import SourceError
from qdemo.families import Family, get_family
from qdemo.progress import reporting
from qdemo.registry import ModelSpec
from qdemo.sources import ProgressFn, resolve

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    family: Family
    eos_token_ids: frozenset[int]  # ending here reports reason "eos"
    stop_token_ids: frozenset[int]  # the family's other stop tokens: reason "stop_token"
    path: Path | None = None
    weight_bytes: int = field(default=0)
    max_context: int = 0  # tokens the model may see: models.yaml's max_context, capped by the checkpoint's config
    context_note: str = ""  # why max_context is below what models.yaml asks, when it is

    def __post_init__(self) -> None:
        if not self.max_context:
            self.max_context = self.spec.max_context


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} was asked for but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 arithmetic instructions (AVX512-BF16 / AMX on x86, BF16 on Arm)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        # macOS on Apple silicon M2 and later has bf16; older hosts fall back to fp32.
        return platform.system() == "Darwin" and platform.machine() == "arm64"
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_dtype(requested: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA with bf16 support else fp16; on CPU bf16 only where it is native, else fp32
    (emulated bf16 is slower than fp32 there)."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested and requested != "auto":
        try:
            return _DTYPES[requested]
        except KeyError:
            raise ValueError(f"dtype must be auto or one of {', '.join(_DTYPES)}, got {requested!r}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def describe_run(spec: ModelSpec, device: str | torch.device | None = None) -> str:
    """How the model runs here, in words: "Q4_K_M GGUF, dequantized, fp32 on this CPU"."""
    from qdemo.registry import GgufPartsSource

    dev = pick_device(device)
    dtype = str(pick_dtype(spec.dtype, dev)).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
    where = "this CPU" if dev.type == "cpu" else f"this GPU ({dev})"
    if isinstance(spec.source, GgufPartsSource):
        quant = re.search(r"(?i)(i?q\d_[a-z0-9_]+|f16|bf16|f32)(?=\.gguf$)", spec.source.file_name)
        kind = f"{quant.group(1).upper()} GGUF" if quant else "GGUF"
        return f"{kind}, dequantized, {dtype} on {where}"
    return f"{dtype} on {where}"


def load_model(
    spec: ModelSpec, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    progress: ProgressFn | None = None, attn_implementation: str = "sdpa",
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    family = get_family(spec.family)
    if family.position_encoding == "alibi":
        import qdemo.families.alibi_model  # noqa: F401  registers qdemo's ALiBi model class with transformers
    path = resolve(spec, progress)
    dev = pick_device(device)
    dt = pick_dtype(dtype if dtype is not None else spec.dtype, dev)
    _check_quantized(spec, path, dev)
    if progress:
        progress("load tokenizer", 0, 1)
    try:
        tokenizer = _load_tokenizer(path, converted=family.convert is not None, trust=spec.trust_remote_code)
        if progress:
            progress("load weights", 0, 1)
        # Remote code runs only for an entry that asks for it with a pinned commit (checked by the registry).
        with reporting(progress):  # transformers' per-tensor bar moves the user's progress bar
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn_implementation,
                                                         trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"model {spec.name}: cannot load the checkpoint ({type(exc).__name__}: "
                          f"{_without_paths(str(exc), path)})") from None

    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if dev.type == "cpu" and dt == torch.float32:  # measured faster there; bf16/fp16 CPU kernels not measured
        column_major_tall_linears(model)
    if progress:
        progress("load weights", 1, 1)
    eos = _eos_ids(model, tokenizer)
    stops = {tid for tid in (_token_id(tokenizer, t) for t in family.stop_tokens) if tid is not None} - eos
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_context, note = context_limit(spec, model.config)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=dev, dtype=dt, family=family,
                       eos_token_ids=frozenset(eos), stop_token_ids=frozenset(stops), path=path,
                       weight_bytes=weight_bytes, max_context=max_context, context_note=note)


def context_limit(spec: ModelSpec, config) -> tuple[int, str]:
    """models.yaml's max_context, capped at the checkpoint's own position limit. Past it a model computes
    something qdemo does not show (Qwen v1 switches on dynamic NTK and logn scaling beyond `seq_length`; RoPE
    models extrapolate), so the cap holds whatever models.yaml says, and the model card says why."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0 or spec.max_context <= limit:
        return spec.max_context, ""
    return limit, (f"{spec.name}: models.yaml asks for max_context {spec.max_context:,} but the checkpoint's config "
                   f"allows {limit:,} positions (max_position_embeddings, from seq_length for Qwen v1); beyond it "
                   f"the original model changes its attention (e.g. dynamic NTK and logn scaling), which qdemo does "
                   f"not compute, so the context is capped at {limit:,}.")


def _without_paths(text: str, path: Path) -> str:
    """An error message without the server's directories (users of a public Space should not see them)."""
    return text.replace(str(path), "<checkpoint>")


def _load_tokenizer(path: Path, converted: bool, trust: bool = False):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if converted:
        # qdemo wrote this tokenizer.json itself; AutoTokenizer would pick a model-specific class from config.json
        # (Qwen2Tokenizer for converted Qwen v1) that rebuilds the BPE and can merge differently.
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)


def _check_quantized(spec: ModelSpec, path: Path, device: torch.device) -> None:
    """GPTQ checkpoints need optimum + gptqmodel (requirements-gptq.txt); say so before transformers does."""
    import json

    try:
        quant = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return
    if not quant or quant.get("quant_method") != "gptq":
        return
    import importlib.util

    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    if missing:
        where = "" if device.type == "cuda" else (" Its fast kernels need a CUDA GPU; on a CPU gptqmodel's torch "
                                                  "kernel runs, slowly.")
        raise SourceError(f"model {spec.name} is GPTQ-quantized ({quant.get('bits', 4)}-bit) and needs "
                          f"{' and '.join(missing)}: pip install -r requirements-gptq.txt.{where}")


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    # An unknown token maps to unk (whatever that is); only a round trip proves the token exists.
    if tid is None or tokenizer.convert_ids_to_tokens(int(tid)) != token:
        return None
    return int(tid)
