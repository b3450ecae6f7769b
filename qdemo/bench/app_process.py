"""`python app.py` in a process of its own, for the benchmarks that time what a user of the app gets."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from qdemo.bench.llama_server import free_port


def root() -> str:
    """The repository root (app.py's folder)."""
    return str(Path(__file__).resolve().parents[2])


@contextlib.contextmanager
def running_app(registry_path: str | None, forward: str, timeout_s: float = 300.0
                ) -> Iterator[tuple[str, Any, float]]:
    """The app on a free port until the block ends: (its URL, its process, seconds until it answered)."""
    port = free_port()
    env = {**os.environ, "QDEMO_FORWARD": forward, "PYTHONPATH": root()}
    if registry_path:
        env["QDEMO_MODELS"] = registry_path
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(Path(root()) / "app.py"), "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                if process.poll() is not None or time.perf_counter() - t0 > timeout_s:
                    log.seek(0)
                    raise RuntimeError("the app did not start: " + log.read().decode(errors="replace")[-2000:])
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=1):
                        break
                time.sleep(0.05)
            yield url, process, time.perf_counter() - t0
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(15)
            if process.poll() is None:
                process.kill()
