"""The Dockerfile's static checks (no Docker engine here). `python tools/dockerfile.py replay` runs its build
steps for real on this machine; the README records what that showed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile():
    spec = importlib.util.spec_from_file_location("dockerfile_tool", ROOT / "tools" / "dockerfile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_dockerfile_passes_its_checks(dockerfile):
    assert dockerfile.lint((ROOT / "Dockerfile").read_text(encoding="utf-8")) == []


def test_the_image_promises(dockerfile):
    instructions = dockerfile.parse((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    by_op = {}
    for ins in instructions:
        by_op.setdefault(ins.op, []).append(ins.args)
    assert by_op["FROM"][0].startswith("python:3.11") and "slim" in by_op["FROM"][0]
    assert by_op["USER"] == ["user"] and any("--uid 1000" in r for r in by_op["RUN"])
    assert by_op["EXPOSE"] == ["7860"] and by_op["CMD"] == ['["python", "app.py"]']
    env = {}
    for args in by_op["ENV"]:
        env.update(dockerfile.env_pairs(args))
    assert env["GRADIO_SERVER_NAME"] == "0.0.0.0" and env["GRADIO_SERVER_PORT"] == "7860"
    assert any("qdemo prepare qwen2.5-coder-0.5b-instruct" in r for r in by_op["RUN"])
    assert "urlopen" in by_op["HEALTHCHECK"][0]
    # The health check's URL is one the app serves.
    assert "/gradio_api/info" in by_op["HEALTHCHECK"][0]


BAD = """\
FROM python:latest
RUN apt-get install -y curl
RUN cd /app && pip install gradio torch==2.13.0
ADD . /app
CMD python app.py
"""


@pytest.mark.parametrize("problem", [
    "FROM python:latest must pin an exact version", "slim", "apt-get install needs --no-install-recommends",
    "use WORKDIR instead of cd", "pip package gradio is not pinned", "use COPY rather than ADD",
    "CMD must use the exec (JSON) form", "no USER", "EXPOSE 7860 is missing", "GRADIO_SERVER_NAME=0.0.0.0",
    "HEALTHCHECK is missing", "is not prepared at build time"])
def test_a_careless_dockerfile_is_caught(dockerfile, problem):
    assert any(problem in p for p in dockerfile.lint(BAD))


def test_health_endpoint_is_served(tiny_registry_path):
    import httpx

    from qdemo.models.registry import load_registry
    from qdemo.ui.app import build_app

    demo = build_app(load_registry(tiny_registry_path))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        assert httpx.get(demo.local_url + "gradio_api/info", timeout=10).status_code == 200
    finally:
        demo.close()
