"""Start the processes of a multi-process resume test and collect them, a hang failing the test
instead of stalling CI (one copy for tests/test_resume_distributed.py and test_resume_examples.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def start(argvs: list[list[str]], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """One process per argv (`python` prepended when it starts with a .py path), run from the
    repository root with stdout and stderr together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **(env or {})}
    return [
        subprocess.Popen(
            [sys.executable, *argv] if str(argv[0]).endswith(".py") else argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for argv in argvs
    ]


def finish(procs: list[subprocess.Popen], timeout_s: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """(exit code, output) of each process; all are killed and the test fails past `timeout_s`."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout_s)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        partial = [proc.communicate()[0][-2000:] for proc in procs]
        pytest.fail(f"{procs[0].args} did not finish within {timeout_s} s (a hang in a collective?): {partial}")
    return results


def run_ok(argvs: list[list[str]], env: dict[str, str] | None = None, timeout_s: float = TIMEOUT_S) -> list[str]:
    """Runs the processes to the end; each must exit 0. Returns their outputs."""
    results = finish(start(argvs, env), timeout_s)
    for code, out in results:
        assert code == 0, out[-4000:]
    return [out for _, out in results]
