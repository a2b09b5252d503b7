"""Shared test setup.

Framework test files are collected only when their framework is installed, so they import it at
the top like any other module (no `pytest.importorskip` ahead of their imports); pytest's header
says what was left out. `import remat_kit` itself works without either framework, which
tests/test_import.py checks. Helper modules next to the tests (`jax_helpers`, `torch_helpers`,
`hf_tiny`) import by name: pytest puts this directory on sys.path (default `prepend`
import mode); shared fixtures are here (`sweep_run`).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# auto's on-disk plan cache (remat_kit/_jax/_plancache.py) would carry verdicts from one test, or
# one run, to the next (a test that patches the measure would poison the real program's entry);
# tests/test_jax_first_call.py turns it on, in a temporary directory, where it is the subject.
os.environ["REMAT_KIT_PLAN_CACHE"] = "0"
# auto prices recompute with constants measured on the machine (remat_kit/_core/calibration.py);
# measured rates move with the load of the moment, and a test that expects one plan must not
# depend on them. tests/test_device_time.py and the fast-path tests turn calibration on or price
# it explicitly, where it is the subject.
os.environ.setdefault("REMAT_KIT_CALIBRATE", "0")

# Test files by name -> what they import at module level (the `jax` / `torch` extras in pyproject).
REQUIRES: dict[str, tuple[str, ...]] = {
    "test_jax_*.py": ("jax", "flax", "optax"),
    "test_torch_*.py": ("torch",),
    "test_resume_*.py": ("jax", "orbax.checkpoint"),
    "test_sweep_resume.py": ("jax", "orbax.checkpoint"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


MISSING = {pattern: [m for m in modules if not _installed(m)] for pattern, modules in REQUIRES.items()}
collect_ignore_glob = [pattern for pattern, missing in MISSING.items() if missing]


def pytest_report_header(config: object) -> list[str]:
    return [
        f"not collected: tests/{pattern} ({', '.join(missing)} not installed)"
        for pattern, missing in MISSING.items()
        if missing
    ]


def pytest_collection_modifyitems(config: object, items: list[pytest.Item]) -> None:
    """Tests marked slow first, each group's order kept. xdist's `loadgroup` hands out groups in
    collection order as workers free up, so a long group collected last (a conformance model's
    cells: 1-3 minutes each on CI's 2-core VM) ran on one worker while the other sat idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def sweep_run() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `python -m benchmarks.sweep` on the JAX MLP cells (tests/test_compare.py,
    tests/test_sweep_resume.py): `sweep_run(out, *extra, strategies=..., steps=..., warmup=...,
    fault="", wait=True, timeout=180)` returns the process; waited for, its stdout and stderr
    together are `.output`. `fault` is the harness's REMAT_SWEEP_FAULT. A sweep still running
    when the session ends (a test that failed before it ended one) is killed."""
    started: list[subprocess.Popen] = []

    def run(
        out: pathlib.Path,
        *extra: str,
        strategies: Sequence[str],
        steps: int,
        warmup: int,
        fault: str = "",
        wait: bool = True,
        timeout: float = 180,
    ) -> subprocess.Popen:
        cells = ["--frameworks", "jax", "--models", "mlp", "--strategies", *strategies]
        cmd = [sys.executable, "-m", "benchmarks.sweep", "--out", str(out), *cells]
        cmd += ["--steps", str(steps), "--warmup", str(warmup), *extra]
        env = {**os.environ, "REMAT_SWEEP_FAULT": fault}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        if wait:
            proc.output = proc.communicate(timeout=timeout)[0]  # type: ignore[attr-defined]
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
