"""qdemo web app: `python app.py` serves it on the embedded default model (also the Hugging Face Spaces entry).

Every flag can also be set by an environment variable (shown in --help); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from qdemo.serving.limits import Limits

_LIMIT_FLAGS = {  # flag → (Limits field, help)
    "--max-input-chars": ("max_input_chars", "longest message accepted; longer ones are cut with a notice"),
    "--max-turns": ("max_turns", "history turns sent to the model; older ones are left out with a notice"),
    "--max-prompt-tokens": ("max_prompt_tokens", "prompt tokens per request, history included; older turns are "
                                                 "left out with a notice"),
    "--max-new-tokens": ("max_new_tokens", "cap on max new tokens per answer"),
    "--max-generation-seconds": ("max_generation_seconds", "wall-clock limit per answer; longer ones are cut with "
                                                           "a notice"),
    "--requests-per-minute": ("requests_per_minute", "model requests per session per minute"),
    "--requests-per-minute-per-address": ("requests_per_minute_per_address",
                                          "model requests per client address per minute, whatever its sessions"),
    "--events-per-minute": ("events_per_minute", "page events that run no model (sliders, clicks) per session "
                                                 "per minute"),
    "--concurrency": ("concurrency", "generations running at once in the whole app; others queue"),
    "--queue-size": ("queue_size", "waiting requests beyond this are refused"),
    "--max-upload-kib": ("max_upload_kib", "largest upload (a conversation to import), in KiB"),
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
    p.add_argument("--allow-downloads", action="store_true",
                   default=env("QDEMO_ALLOW_DOWNLOADS", "") in ("1", "true", "yes"),
                   help="let a request download a registry model from the hub (default: serve only models that are "
                        "embedded or cached here) [QDEMO_ALLOW_DOWNLOADS=1]")
    # On a Hugging Face Space every request arrives through the Space's proxy: without trusting it, all users would
    # share the per-address limit of the proxy's own address.
    proxies = env("QDEMO_TRUSTED_PROXIES") or ("1" if env("SPACE_ID") else "0")
    p.add_argument("--trust-proxy", type=int, default=int(proxies), metavar="N",
                   help="the app runs behind N proxies that each append the client's address to X-Forwarded-For; "
                        "rate limits then count that address (default 0: the socket peer; 1 on a Hugging Face "
                        "Space) [QDEMO_TRUSTED_PROXIES]")
    p.add_argument("--no-preload", action="store_true", default=env("QDEMO_PRELOAD", "1") in ("0", "false", "no"),
                   help="do not load the default model at start (it then loads with the first request) "
                        "[QDEMO_PRELOAD=0]")
    _store_args(p)
    p.add_argument("--arena", default=env("QDEMO_ARENA"), metavar="NAMES",
                   help="the arena's contenders, comma-separated names from models.yaml's arena: list (default: "
                        "all of them) [QDEMO_ARENA]")
    defaults = Limits()
    for flag, (field, text) in _LIMIT_FLAGS.items():
        p.add_argument(flag, type=int, default=None, dest=field,
                       help=f"{text} (default {getattr(defaults, field)}) [{Limits.ENV[field]}]")
    return p


_STORE_FLAGS = {  # flag → (the variable it sets, help)
    "--data": ("QDEMO_DATA", "folder of the run store's SQLite file (default: a Space's /data, else the user's data "
                             "folder, e.g. ~/.local/share/qdemo)"),
    "--store-url": ("QDEMO_STORE_URL", "a SQLAlchemy URL for the run store instead of the file, e.g. "
                                       "postgresql://user:pass@host/db for several replicas"),
    "--keep-days": ("QDEMO_STORE_KEEP_DAYS", "stored runs older than this many days are removed (votes stay)"),
    "--keep-rows": ("QDEMO_STORE_KEEP_ROWS", "only the newest this many stored runs are kept (votes stay)"),
}


def _store_args(p: argparse.ArgumentParser) -> None:
    for flag, (variable, text) in _STORE_FLAGS.items():
        p.add_argument(flag, default=None, dest=variable, metavar=flag.removeprefix("--").split("-")[-1].upper(),
                       help=f"{text} [{variable}]")
    p.add_argument("--no-store", action="store_const", const="off", default=None, dest="QDEMO_STORE",
                   help="keep no runs, sweeps or votes beyond this process [QDEMO_STORE=off]")


def _names(text: str | None) -> list[str] | None:
    """--arena's names; an empty value is no choice (every contender plays), as for the other variables."""
    return None if text is None or not text.strip() else [n.strip() for n in text.split(",") if n.strip()]


def _open_store(args: argparse.Namespace):
    """The run store, or why it cannot open (a PostgreSQL server out of reach, a failed migration) as a ValueError:
    the app then does not start, and says so in one line."""
    from sqlalchemy.exc import SQLAlchemyError

    from qdemo.store import open_store

    try:
        return open_store(store_settings(args))
    except SQLAlchemyError as exc:
        raise ValueError(f"the run store cannot be opened ({str(exc).splitlines()[0][:300]}); fix --store-url or "
                         "start without a store (--no-store)") from None


def store_settings(args: argparse.Namespace):
    """The run store's settings: its variables, each replaced by its flag where given."""
    from qdemo.store import StoreSettings

    env = dict(os.environ)
    env.update({k: v for k in (*(v for v, _ in _STORE_FLAGS.values()), "QDEMO_STORE")
                if (v := getattr(args, k)) is not None})
    return StoreSettings.from_env(env)


def generation_seconds_for(device: str | None) -> int:
    """The default time limit per answer, sized for the device: a 2-core CPU writes ~5 tokens a second, so a
    long answer there needs minutes; a GPU needs far less."""
    from qdemo.models.loader import pick_device

    return 180 if pick_device(device).type == "cpu" else 90


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Everything that can be wrong with the configuration is checked before anything is served.
    try:
        # Imported here, not at the top: `python app.py --help` answers without loading torch and gradio.
        from qdemo.models.registry import load_registry
        from qdemo.serving.budget import parse_bytes
        from qdemo.serving.pool import ModelPool
        from qdemo.services.preload import Preload

        limits = Limits.from_env(**{field: getattr(args, field) for field, _ in _LIMIT_FLAGS.values()})
        if args.max_generation_seconds is None and not os.environ.get(Limits.ENV["max_generation_seconds"]):
            limits = dataclasses.replace(limits, max_generation_seconds=generation_seconds_for(args.device))
        registry = load_registry(args.models)
        budget = parse_bytes(args.max_memory) if args.max_memory else None
        pool = ModelPool(registry, args.device, budget_bytes=budget)
        if args.trust_proxy < 0:
            raise ValueError(f"--trust-proxy (QDEMO_TRUSTED_PROXIES) must be 0 or more, got {args.trust_proxy}")
        registry.get(args.model or registry.default)  # an unknown --model fails before anything loads
        preload = None
        if not args.no_preload:  # the default loads while the page is built and served
            preload = Preload(args.model or registry.default)
            preload.start(pool)
        from qdemo.ui.app import build_app, launch_settings, queue_settings

        store = _open_store(args)
        demo = build_app(registry, device=args.device, default=args.model, limits=limits, pool=pool,
                         allow_downloads=args.allow_downloads, trusted_proxies=args.trust_proxy, preload=preload,
                         store=store, arena=_names(args.arena))
    except (ValueError, OSError) as exc:
        print(f"qdemo: cannot start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("qdemo").info("run store: %s", store.url if store is not None else "off (--no-store)")
    demo.queue(**queue_settings(limits)).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                **launch_settings(limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
