"""The Dockerfile without a Docker engine: parse it, lint it, and replay its build and start on this machine.

    python tools/dockerfile.py lint      # static checks (also run by tests/test_dockerfile.py)
    python tools/dockerfile.py replay    # RUN steps for real in a scratch HOME, then CMD and the HEALTHCHECK

The replay runs each RUN with the image's ENV, with /home/user mapped to a scratch directory and the machine's
python3 standing in for the base image's (its version is compared with the FROM tag). What it cannot do here
is said as it goes: `useradd` and `USER` are skipped (no root switching), and TORCH_INDEX is emptied because the
PyTorch wheel index is outside this machine's registries (pip then takes torch from PyPI's default).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE_HOME = "/home/user"


@dataclass(frozen=True)
class Instruction:
    line: int
    op: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        op, _, args = full.partition(" ")
        out.append(Instruction(start, op.upper(), args.strip()))
    return out


def env_pairs(args: str) -> dict[str, str]:
    """ENV a=1 b="two words" → {a: 1, b: two words}."""
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"ENV {args!r}: use the key=value form")
        pairs[key] = value
    return pairs


def lint(text: str, root: Path = ROOT) -> list[str]:
    """Problems found (empty when clean): hadolint-style rules plus what qdemo's image promises."""
    instructions = parse(text)
    first = instructions[0] if instructions else None
    if first is None or first.op != "FROM":
        return ["the first instruction must be FROM"]
    problems = _lint_base(first)
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.op == "ENV":
            env.update(env_pairs(ins.args))
        problems += _lint_instruction(ins, env, root)
    return problems + _lint_promises(instructions, env, root)


def _lint_base(first: Instruction) -> list[str]:
    image = first.args.split()[0]
    problems = []
    if ":" not in image or image.endswith(":latest") or not re.search(r":\d+\.\d+\.\d+", image):
        problems.append(f"line {first.line}: FROM {image} must pin an exact version (DL3006/DL3007)")
    if "slim" not in image:
        problems.append(f"line {first.line}: use a slim Python base image")
    return problems


def _lint_instruction(ins: Instruction, env: dict[str, str], root: Path) -> list[str]:
    """One instruction's own problems (`env`: the ENV set so far)."""
    if ins.op == "USER" and ins.args in ("root", "0"):
        return [f"line {ins.line}: the image must not run as root"]
    if ins.op == "RUN":
        return _lint_run(ins, env)
    if ins.op == "COPY":
        parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
        return [f"line {ins.line}: COPY source {source} does not exist" for source in parts[:-1]
                if not (root / source).exists()]
    if ins.op == "ADD":
        return [f"line {ins.line}: use COPY rather than ADD (DL3020)"]
    if ins.op == "CMD":
        try:
            json.loads(ins.args)
        except ValueError:
            return [f"line {ins.line}: CMD must use the exec (JSON) form (DL3025)"]
    return []


def _lint_run(ins: Instruction, env: dict[str, str]) -> list[str]:
    cmd, problems = ins.args, []
    if re.search(r"\bsudo\b", cmd):
        problems.append(f"line {ins.line}: no sudo in RUN (DL3004)")
    if re.search(r"\bcd\s", cmd):
        problems.append(f"line {ins.line}: use WORKDIR instead of cd (DL3003)")
    if "apt-get install" in cmd and ("--no-install-recommends" not in cmd or "rm -rf /var/lib/apt/lists" not in cmd):
        problems.append(f"line {ins.line}: apt-get install needs --no-install-recommends and list cleanup")
    for pip in re.findall(r"pip install[^&;|]*", cmd):
        if "--no-cache-dir" not in pip and env.get("PIP_NO_CACHE_DIR") != "1":
            problems.append(f"line {ins.line}: pip install without --no-cache-dir (DL3042)")
        for name in _pip_requirements(pip):
            if "==" not in name:
                problems.append(f"line {ins.line}: pip package {name} is not pinned with == (DL3013)")
    if "useradd" in cmd and "--uid 1000" not in cmd and "-u 1000" not in cmd:
        problems.append(f"line {ins.line}: the user must have uid 1000 (Spaces)")
    return problems


def _lint_promises(instructions: list[Instruction], env: dict[str, str], root: Path) -> list[str]:
    """What qdemo's image promises as a whole: a non-root user 1000, port 7860, a health check, pinned requirements
    and the default model prepared at build time."""
    ops = [i.op for i in instructions]
    problems = []
    if "USER" not in ops:
        problems.append("no USER: the image must not run as root")
    if not any("useradd" in i.args for i in instructions if i.op == "RUN"):
        problems.append("no user with uid 1000 is created")
    if "EXPOSE" not in ops or not any(i.args.split()[0] == "7860" for i in instructions if i.op == "EXPOSE"):
        problems.append("EXPOSE 7860 is missing")
    if env.get("GRADIO_SERVER_NAME") != "0.0.0.0":
        problems.append("ENV GRADIO_SERVER_NAME=0.0.0.0 is missing (the app would only listen inside the container)")
    if "HEALTHCHECK" not in ops:
        problems.append("HEALTHCHECK is missing")
    if "CMD" not in ops:
        problems.append("CMD is missing")
    for line in (root / "requirements.txt").read_text(encoding="utf-8").splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec and "==" not in spec:
            problems.append(f"requirements.txt: {spec} is not pinned with ==")
    default = _registry_default(root)
    if not any(i.op == "RUN" and f"qdemo prepare {default}" in i.args for i in instructions):
        problems.append(f"the default model {default} is not prepared at build time (python -m qdemo prepare)")
    return problems


def _pip_requirements(command: str) -> list[str]:
    """The package arguments of one `pip install …` (options, their values and shell variables left out)."""
    words = shlex.split(command.split("install", 1)[1])
    takes_value = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                   "-f", "--find-links"}
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-") and "$" not in word and "}" not in word:
            out.append(word)
    return out


def _registry_default(root: Path) -> str:
    return yaml.safe_load((root / "models.yaml").read_text(encoding="utf-8"))["default"]


def replay(root: Path = ROOT, scratch: Path | None = None, log=print) -> int:
    """Run the build's RUN/COPY steps and then CMD + HEALTHCHECK. Returns 0 when the health check passes."""
    instructions = parse((root / "Dockerfile").read_text(encoding="utf-8"))
    scratch = Path(scratch or tempfile.mkdtemp(prefix="qdemo-docker-"))
    build = _Build(root=root, home=scratch / "home" / "user", log=log)
    build.home.mkdir(parents=True, exist_ok=True)
    base = instructions[0].args.split()[0]
    wanted = re.search(r":(\d+\.\d+\.\d+)", base)
    have = ".".join(map(str, sys.version_info[:3]))
    log(f"FROM {base}: standing in with python {have}" + ("" if wanted and wanted.group(1) == have
                                                           else f" (the image has {wanted.group(1) if wanted else '?'})"))
    for ins in instructions:
        code = build.step(ins)
        if code:
            return code
    if build.cmd is None or build.health is None:
        log("no CMD or HEALTHCHECK to try")
        return 1
    return _start_and_check(build)


@dataclass
class _Build:
    """The replay's state as it walks the instructions: the image's ENV, WORKDIR, CMD and HEALTHCHECK."""

    root: Path
    home: Path  # stands in for /home/user
    log: Callable[[str], object]
    env: dict[str, str] = field(default_factory=lambda: _clean_env())
    workdir: Path | None = None
    health: list[str] | None = None
    cmd: list[str] | None = None

    def local(self, value: str) -> str:
        return value.replace(IMAGE_HOME, str(self.home))

    def step(self, ins: Instruction) -> int:
        """Replay one instruction; a failed RUN's exit code, else 0."""
        if ins.op == "ARG":
            name, _, default = ins.args.partition("=")
            self.env[name] = "" if name == "TORCH_INDEX" else default
            if name == "TORCH_INDEX":
                self.log("ARG TORCH_INDEX: emptied (the PyTorch index is not reachable here; PyPI's torch is used)")
        elif ins.op == "ENV":
            for key, value in env_pairs(ins.args).items():
                self.env[key] = self.local(value.replace("$PATH", self.env.get("PATH", "")))
        elif ins.op == "WORKDIR":
            self.workdir = Path(self.local(ins.args))
            self.workdir.mkdir(parents=True, exist_ok=True)
        elif ins.op == "COPY":
            self.copy(ins)
        elif ins.op == "USER":
            self.log(f"USER {ins.args}: skipped (runs as the current user)")
        elif ins.op == "RUN":
            return self.run(ins)
        elif ins.op == "HEALTHCHECK":
            self.health = json.loads(ins.args[ins.args.index("CMD") + 3:].strip())
        elif ins.op == "CMD":
            self.cmd = json.loads(ins.args)
        return 0

    def copy(self, ins: Instruction) -> None:
        parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
        workdir = self.workdir or self.home
        dest = Path(self.local(parts[-1])) if parts[-1].startswith("/") else workdir / parts[-1]
        for source in parts[:-1]:
            src = self.root / source
            target = dest / src.name if (parts[-1].endswith("/") or len(parts) > 2) else dest
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
        self.log(f"COPY {' '.join(parts[:-1])} → {dest}")

    def run(self, ins: Instruction) -> int:
        if "useradd" in ins.args:
            self.log("RUN useradd: skipped (needs root; the scratch HOME stands in for /home/user)")
            return 0
        self.log(f"RUN {ins.args}")
        started = time.perf_counter()
        done = subprocess.run(["bash", "-c", ins.args], cwd=self.workdir or self.home, env=self.env)
        self.log(f"    → exit {done.returncode} in {time.perf_counter() - started:.0f} s")
        return done.returncode


def _clean_env() -> dict[str, str]:
    """This machine's environment without qdemo's, Gradio's, the hub's or a virtualenv's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QDEMO_", "GRADIO_", "HF_", "VIRTUAL_ENV"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    return env


def _start_and_check(build: _Build, timeout_s: float = 180.0) -> int:
    """CMD, then the HEALTHCHECK every 2 s until it passes (0) or the app exits or the time is up (1)."""
    build.log(f"CMD {' '.join(build.cmd)} (then the HEALTHCHECK until it passes)")
    app = subprocess.Popen(build.cmd, cwd=build.workdir or build.home, env=build.env)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < timeout_s:
            if app.poll() is not None:
                build.log(f"the app exited with {app.returncode}")
                return 1
            if subprocess.run(build.health, env=build.env, capture_output=True).returncode == 0:
                build.log(f"HEALTHCHECK passed {time.perf_counter() - started:.0f} s after start")
                return 0
            time.sleep(2)
        build.log(f"HEALTHCHECK did not pass within {timeout_s:.0f} s")
        return 1
    finally:
        app.terminate()
        app.wait(30)


def main(argv: list[str]) -> int:
    if argv[:1] == ["lint"]:
        problems = lint((ROOT / "Dockerfile").read_text(encoding="utf-8"))
        print("\n".join(problems) or "Dockerfile: no problems found")
        return 1 if problems else 0
    if argv[:1] == ["replay"]:
        return replay(scratch=Path(argv[1]) if len(argv) > 1 else None)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
