"""qdemo web app: `python app.py` serves it on the embedded default model (also the Hugging Face Spaces entry).

Every flag can also be set by an environment variable (shown in --help); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import sys

from qdemo.limits import Limits

_LIMIT_FLAGS = {  # flag → (Limits field, help)
    "--max-input-chars": ("max_input_chars", "longest message accepted; longer ones are cut with a notice"),
    "--max-turns": ("max_turns", "history turns sent to the model; older ones are left out with a notice"),
    "--max-new-tokens": ("max_new_tokens", "cap on max new tokens per answer"),
    "--requests-per-minute": ("requests_per_minute", "requests per session per minute"),
    "--concurrency": ("concurrency", "generations running at once in the whole app; others queue"),
    "--queue-size": ("queue_size", "waiting requests beyond this are refused"),
}


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python app.py", description="qdemo: see how Qwen and Baichuan models think")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface) [GRADIO_SERVER_NAME]")
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                   help="port (default 7860) [GRADIO_SERVER_PORT]")
    p.add_argument("--models", default=env("QDEMO_MODELS"),
                   help="models.yaml to serve (default: the bundled one) [QDEMO_MODELS]")
    p.add_argument("--model", default=env("QDEMO_DEFAULT_MODEL"),
                   help="the model selected when a page opens (default: the registry's default) [QDEMO_DEFAULT_MODEL]")
    p.add_argument("--device", default=env("QDEMO_DEVICE"), help="cpu, cuda, cuda:1 … (default: auto) [QDEMO_DEVICE]")
    p.add_argument("--max-memory", default=env("QDEMO_MAX_MEMORY"),
                   help="memory budget for loaded models, e.g. 12GiB (default: 60%% of RAM, 85%% of a GPU); the "
                        "least recently used idle model is unloaded to make room [QDEMO_MAX_MEMORY]")
    p.add_argument("--share", action="store_true", default=env("QDEMO_SHARE", "") in ("1", "true", "yes"),
                   help="also open a public gradio.live link [QDEMO_SHARE=1]")
    defaults = Limits()
    for flag, (field, text) in _LIMIT_FLAGS.items():
        p.add_argument(flag, type=int, default=None, dest=field,
                       help=f"{text} (default {getattr(defaults, field)}) [{Limits.ENV[field]}]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Everything that can be wrong with the configuration is checked before anything is served.
    try:
        from qdemo.pool import ModelPool, parse_bytes
        from qdemo.registry import load_registry
        from qdemo.ui.app import build_app, queue_settings

        limits = Limits.from_env(**{field: getattr(args, field) for field, _ in _LIMIT_FLAGS.values()})
        registry = load_registry(args.models)
        budget = parse_bytes(args.max_memory) if args.max_memory else None
        pool = ModelPool(registry, args.device, budget_bytes=budget)
        demo = build_app(registry, device=args.device, default=args.model, limits=limits, pool=pool)
    except (ValueError, OSError) as exc:
        print(f"qdemo: cannot start: {exc}", file=sys.stderr)
        return 2
    demo.queue(**queue_settings(limits)).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
