"""qdemo web app: `python app.py` serves it on the embedded default model (also the Hugging Face Spaces entry)."""

from __future__ import annotations

import argparse
import os

from qdemo.registry import load_registry
from qdemo.ui.app import build_app


def main() -> None:
    parser = argparse.ArgumentParser(description="qdemo: see how Qwen and Baichuan models think")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--models", default=os.environ.get("QDEMO_MODELS"), help="models.yaml (default: bundled)")
    parser.add_argument("--model", default=os.environ.get("QDEMO_DEFAULT_MODEL"), help="model to chat with")
    parser.add_argument("--device", default=os.environ.get("QDEMO_DEVICE"), help="cpu, cuda, cuda:1 …")
    args = parser.parse_args()
    demo = build_app(load_registry(args.models), device=args.device, default=args.model)
    demo.queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
