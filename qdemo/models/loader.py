"""The one place that loads a model: picks device and dtype (or the llama.cpp forward), returns a LoadedModel."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import operator
import platform
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from qdemo.errors import SourceError
from qdemo.models.batch_invariance import HALF, make_rows_alike
from qdemo.models.cpu_layout import column_major_tall_linears
from qdemo.models.families import Family, get_family
from qdemo.models.progress import reporting
from qdemo.models.registry import GgufPartsSource, ModelSpec
from qdemo.models.step_costs import StepCosts
from qdemo.models.sources import MODEL_LOADS, ProgressFn, resolve

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # None on the llama.cpp forward: it runs on the GGUF, not torch modules
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
    forward: str = "torch"  # "torch" or "llama.cpp"
    # How it runs a forward: a qdemo.forwards Runner (that layer sits above this one, so it is not named here);
    # the llama.cpp loader sets it; None means torch (qdemo.forwards.torch_runner.runner_for makes one).
    runner: object | None = None
    config: Any = None  # the checkpoint's transformers config
    vocab_size: int = 0  # rows of the logits
    step_costs: StepCosts = field(default_factory=StepCosts)  # decode forwards' recent cost, by rows
    # Whether a batch's rows compute as each row alone (qdemo.models.batch_invariance); llama.cpp: up to
    # its SOLO_EXACT_ROWS, which the sweep keeps to.
    rows_alike: bool = True

    def __post_init__(self) -> None:
        if not self.max_context:
            self.max_context = self.spec.max_context
        if self.config is None and self.model is not None:
            self.config = self.model.config
        if not self.vocab_size and self.model is not None:
            self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)

    @property
    def key(self) -> str:
        """The pool's name for this copy: the registry name, with the forward when it is not torch."""
        return entry_key(self.spec.name, self.forward)

    def check_ids(self, ids: Sequence[Any], field: str = "token ids", least: int = 1) -> list[int]:
        """`ids` as ints, each a row of this model's logits: the one check every entry point runs on token ids.
        ValueError names the field, the model, and the first bad id with its position."""
        name = self.spec.name
        try:
            tokens = [operator.index(t) for t in ids]
        except TypeError:
            raise ValueError(f"{field} of {name} must be whole numbers (token ids)") from None
        if not tokens:
            raise ValueError(f"{field} of {name} is empty: give at least {least} token(s)")
        if len(tokens) < least:
            raise ValueError(f"{field} of {name}: at least {least} tokens are needed, got {len(tokens)}")
        for position, token in enumerate(tokens):
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"{field} of {name}: token id {token} at position {position} is outside its "
                                 f"vocabulary (0..{self.vocab_size - 1})")
        return tokens

    @property
    def forward_label(self) -> str:
        """How it runs, in a few words: "llama.cpp Q4_K_M", "torch fp32"."""
        if self.forward == "llama.cpp":
            return f"llama.cpp {gguf_quant(self.spec) or 'GGUF'}"
        return "torch " + dtype_name(self.dtype)


_VOCAB_KEYS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def vocabulary_key(tokenizer: Any) -> str:
    """A digest of the tokenizer's token → id table, worked out once per tokenizer (comparing two 150k-entry
    tables takes ~0.3 s, and speculative decoding and divergence ask on every request)."""
    key = _VOCAB_KEYS.get(tokenizer)
    if key is None:
        table = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
        key = hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()
        _VOCAB_KEYS[tokenizer] = key
    return key


def same_tokenizer(a: LoadedModel, b: LoadedModel) -> bool:
    """True when the two models read token ids the same way: one checkpoint directory, or tokenizers of equal
    length and equal vocabulary (token → id)."""
    if a is b or (a.path is not None and a.path == b.path):
        return True
    return same_vocabulary(a.tokenizer, b.tokenizer)


def same_vocabulary(ta: Any, tb: Any) -> bool:
    """Two tokenizers map the same tokens to the same ids."""
    if ta is tb:
        return True
    try:
        return len(ta) == len(tb) and vocabulary_key(ta) == vocabulary_key(tb)
    except (AttributeError, TypeError):
        return False


def entry_key(name: str, forward: str) -> str:
    return name if forward == "torch" else f"{name} [{forward}]"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def gguf_quant(spec: ModelSpec) -> str | None:
    """The quantization a GGUF entry's file name states ("Q4_K_M"), or None."""
    if not isinstance(spec.source, GgufPartsSource):
        return None
    found = re.search(r"(?i)(i?q\d_[a-z0-9_]+|f16|bf16|f32)(?=\.gguf$)", spec.source.file_name)
    return found.group(1).upper() if found else None


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
    dev = pick_device(device)
    dtype = dtype_name(pick_dtype(spec.dtype, dev))
    where = "this CPU" if dev.type == "cpu" else f"this GPU ({dev})"
    if isinstance(spec.source, GgufPartsSource):
        quant = gguf_quant(spec)
        kind = f"{quant} GGUF" if quant else "GGUF"
        return f"{kind}, dequantized, torch {dtype} on {where}"
    return f"torch {dtype} on {where}"


def load_model(
    spec: ModelSpec, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    progress: ProgressFn | None = None, attn_implementation: str = "sdpa",
) -> LoadedModel:
    family = get_family(spec.family)
    if family.position_encoding == "alibi":
        # Registers qdemo's ALiBi model class with transformers; heavy (built on transformers' model classes,
        # ~1.9 s to import), so only a Baichuan-13B load pays for it.
        from qdemo.models.families import alibi_model  # noqa: F401  heavy: see above
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
        with MODEL_LOADS, reporting(progress):  # one load at a time; its per-tensor bar moves the user's bar
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn_implementation,
                                                         trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"model {spec.name}: cannot load the checkpoint ({type(exc).__name__}: "
                          f"{_without_paths(str(exc), path)})") from None

    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if dev.type == "cpu" and dt == torch.float32:  # measured faster there; bf16/fp16 CPU kernels not measured
        column_major_tall_linears(model, progress)
    rows_alike = True  # float32: a batch's rows give their solo runs' tokens (qdemo.forwards.torch_runner)
    if dt in HALF:
        if progress:
            progress(ROWS_PHASE, 0, 1)
        rows_alike = make_rows_alike(model) != "varies"
        if progress:
            progress(ROWS_PHASE, 1, 1)
    if progress:
        progress("load weights", 1, 1)
    eos = _eos_ids(getattr(model, "generation_config", None), tokenizer)
    stops = {tid for tid in (_token_id(tokenizer, t) for t in family.stop_tokens) if tid is not None} - eos
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_context, note = context_limit(spec, model.config)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=dev, dtype=dt, family=family,
                       eos_token_ids=frozenset(eos), stop_token_ids=frozenset(stops), path=path,
                       weight_bytes=weight_bytes, max_context=max_context, context_note=note,
                       rows_alike=rows_alike)


ROWS_PHASE = "check that a row computes alike alone and in a batch"


@dataclass(frozen=True)
class Checkpoint:
    """What a prepared checkpoint says besides its weights: enough for another forward (llama.cpp) to build a
    LoadedModel around its own runner."""

    path: Path
    tokenizer: Any
    config: Any
    family: Family
    eos_token_ids: frozenset[int]
    stop_token_ids: frozenset[int]
    max_context: int
    context_note: str


def read_checkpoint(spec: ModelSpec, progress: ProgressFn | None = None) -> Checkpoint:
    """The entry's tokenizer, config and stop tokens (its files prepared first when needed); no weights."""
    family = get_family(spec.family)
    path = resolve(spec, progress)
    if progress:
        progress("load tokenizer", 0, 1)
    try:
        tokenizer = _load_tokenizer(path, converted=family.convert is not None)
        config = AutoConfig.from_pretrained(path)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:
            generation = None
    except (OSError, ValueError) as exc:
        raise SourceError(f"model {spec.name}: cannot read the tokenizer ({type(exc).__name__}: "
                          f"{_without_paths(str(exc), path)})") from None
    eos = _eos_ids(generation, tokenizer)
    stops = {tid for tid in (_token_id(tokenizer, t) for t in family.stop_tokens) if tid is not None} - eos
    max_context, note = context_limit(spec, config)
    return Checkpoint(path=path, tokenizer=tokenizer, config=config, family=family, eos_token_ids=frozenset(eos),
                      stop_token_ids=frozenset(stops), max_context=max_context, context_note=note)


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


def load_tokenizer(spec: ModelSpec, progress=None):
    """A local entry's tokenizer alone (a remote entry borrows it to render tokens; no weights are loaded). The
    entry's files are prepared first if needed, as for a load."""
    path = resolve(spec, progress)
    return _load_tokenizer(path, get_family(spec.family).convert is not None, spec.trust_remote_code)


def _load_tokenizer(path: Path, converted: bool, trust: bool = False):
    if converted:
        # qdemo wrote this tokenizer.json itself; AutoTokenizer would pick a model-specific class from config.json
        # (Qwen2Tokenizer for converted Qwen v1) that rebuilds the BPE and can merge differently.
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)


def _check_quantized(spec: ModelSpec, path: Path, device: torch.device) -> None:
    """GPTQ checkpoints need optimum + gptqmodel (requirements-gptq.txt); say so before transformers does."""
    try:
        quant = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return
    if not quant or quant.get("quant_method") != "gptq":
        return
    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    if missing:
        where = "" if device.type == "cuda" else (" Its fast kernels need a CUDA GPU; on a CPU gptqmodel's torch "
                                                  "kernel runs, slowly.")
        raise SourceError(f"model {spec.name} is GPTQ-quantized ({quant.get('bits', 4)}-bit) and needs "
                          f"{' and '.join(missing)}: pip install -r requirements-gptq.txt.{where}")


def _eos_ids(generation_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(generation_config, "eos_token_id", None)
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
