"""`python -m qdemo bench`: the engine (stage capture on) against transformers' generate, side by side.

Both decode the same prompt greedily for exactly N tokens, alternating in one process; medians of
the runs are compared. A mat-vec probe on the model's dtype measures memory bandwidth, and
weights ÷ bandwidth bounds how fast any decoder can go on this machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from qdemo.core.engine import collect, generate
from qdemo.core.metrics import now
from qdemo.models.loader import LoadedModel, load_model
from qdemo.models.prompting import build_prompt
from qdemo.models.registry import load_registry
from qdemo.sampling import SamplingParams


class _TimingStreamer:
    """Records when generate() hands out the prompt and each new token."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value) -> None:
        self.times.append(now(self.device))

    def end(self) -> None:
        pass


def engine_run(lm: LoadedModel, ids: list[int], tokens: int, top_n: int = 20, params: SamplingParams | None = None
               ) -> dict[str, float]:
    """One engine run of exactly `tokens` tokens (greedy unless `params` says how to sample)."""
    params = (params or SamplingParams(do_sample=False)).replace(max_new_tokens=tokens)
    t0 = time.perf_counter()
    done = collect(generate(lm, input_ids=ids, params=params, top_n=top_n, ignore_eos=True))["done"]
    wall = time.perf_counter() - t0
    assert done.stats.new_tokens == tokens, done
    return {"decode_tok_s": done.stats.decode_tokens_per_s, "ttft_s": done.stats.ttft_seconds,
            "e2e_tok_s": tokens / wall}


def hf_run(lm: LoadedModel, ids: list[int], tokens: int) -> dict[str, float]:
    input_ids = torch.tensor([ids], device=lm.device)
    streamer = _TimingStreamer(lm.device)
    t0 = now(lm.device)
    out = lm.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=tokens, min_new_tokens=tokens, streamer=streamer,
                            pad_token_id=lm.tokenizer.pad_token_id)
    wall = now(lm.device) - t0
    assert out.shape[1] - len(ids) == tokens
    first, last = streamer.times[1], streamer.times[-1]  # times[0] is the prompt
    return {"decode_tok_s": (tokens - 1) / (last - first), "ttft_s": first - t0, "e2e_tok_s": tokens / wall}


def bandwidth_probe(dtype: torch.dtype, device: torch.device, mib: int = 512, repeats: int = 8) -> float:
    """Bytes/s streamed by a matrix-vector product (the decode step's dominant op) larger than any cache;
    the better of row- and column-major storage, as the loader may use either (qdemo.models.cpu_layout)."""
    cols = 4096
    rows = (mib << 20) // (cols * torch.empty((), dtype=dtype).element_size())
    weight = torch.randn(rows, cols, dtype=dtype, device=device)
    x = torch.randn(1, cols, dtype=dtype, device=device)
    best = 0.0
    for w in (weight, weight.t().contiguous().t()):
        times = []
        with torch.inference_mode():
            torch.nn.functional.linear(x, w)
            for _ in range(repeats):
                t0 = now(device)
                torch.nn.functional.linear(x, w)
                times.append(now(device) - t0)
        best = max(best, w.numel() * w.element_size() / statistics.median(times))
        del w
    return best


def decode_step_bytes(lm: LoadedModel) -> int:
    """Weight bytes one decode step streams: everything but an untied input embedding, of which it
    reads a single row."""
    embed = lm.model.get_input_embeddings().weight
    head = lm.model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == embed.data_ptr():
        return lm.weight_bytes
    return lm.weight_bytes - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()


def run_bench(name: str, tokens: int = 64, runs: int = 3, registry_path: str | None = None, device=None,
              dtype=None, prompt: str = "Write a Python function that checks whether a number is prime.",
              lm: LoadedModel | None = None) -> dict[str, Any]:
    if tokens < 2 or runs < 1:
        raise ValueError(f"bench needs --tokens >= 2 and --runs >= 1, got {tokens} and {runs}")
    if lm is None:
        lm = load_model(load_registry(registry_path).get(name), device=device, dtype=dtype)
    ids = build_prompt(lm.tokenizer, [{"role": "user", "content": prompt}], lm.max_context, tokens,
                       lm.spec.system_prompt, lm.spec.name, lm.family.build_prompt).ids
    engine_run(lm, ids, 4)  # warm-up both paths (allocator, kernels, lazy imports)
    hf_run(lm, ids, 4)
    engine, hf = [], []
    for r in range(runs):  # alternate which goes first so drift hits both alike
        pair = [(engine, engine_run), (hf, hf_run)]
        for bucket, fn in (pair if r % 2 == 0 else pair[::-1]):
            bucket.append(fn(lm, ids, tokens))

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    bandwidth = bandwidth_probe(lm.dtype, lm.device)
    step_bytes = decode_step_bytes(lm)
    limit = bandwidth / step_bytes
    engine_tok_s, hf_tok_s = med(engine, "decode_tok_s"), med(hf, "decode_tok_s")
    return {
        "model": lm.spec.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "prompt_tokens": len(ids), "tokens": tokens, "runs": runs,
        "engine_tok_s": engine_tok_s, "hf_tok_s": hf_tok_s, "ratio": engine_tok_s / hf_tok_s,
        "engine_e2e_tok_s": med(engine, "e2e_tok_s"), "hf_e2e_tok_s": med(hf, "e2e_tok_s"),
        "e2e_ratio": med(engine, "e2e_tok_s") / med(hf, "e2e_tok_s"),
        "engine_ttft_s": med(engine, "ttft_s"), "hf_ttft_s": med(hf, "ttft_s"),
        "bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": lm.weight_bytes, "step_bytes": step_bytes,
        "limit_tok_s": limit,
        "engine_vs_limit": engine_tok_s / limit,
        "engine_runs_tok_s": [r["decode_tok_s"] for r in engine], "hf_runs_tok_s": [r["decode_tok_s"] for r in hf],
    }


def format_table(r: dict[str, Any]) -> str:
    rows = [
        ("model", f"{r['model']} ({r['device']}, {r['dtype']}, {r['threads']} threads)"),
        ("prompt / new tokens", f"{r['prompt_tokens']} / {r['tokens']} (greedy, median of {r['runs']})"),
        ("engine decode (stages on)", f"{r['engine_tok_s']:.2f} tok/s  runs {_fmt(r['engine_runs_tok_s'])}"),
        ("HF generate decode", f"{r['hf_tok_s']:.2f} tok/s  runs {_fmt(r['hf_runs_tok_s'])}"),
        ("ratio engine / HF", f"{r['ratio']:.3f}  (end to end {r['e2e_ratio']:.3f})"),
        ("TTFT engine / HF", f"{r['engine_ttft_s']:.3f} s / {r['hf_ttft_s']:.3f} s"),
        ("bandwidth (mat-vec)", f"{r['bandwidth_gb_s']:.1f} GB/s"),
        ("weights / read per step", f"{r['weight_bytes'] / 2**20:.0f} MiB / {r['step_bytes'] / 2**20:.0f} MiB"),
        ("bandwidth limit", f"{r['limit_tok_s']:.2f} tok/s"),
        ("engine / limit", f"{r['engine_vs_limit']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"
