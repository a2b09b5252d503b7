"""Shared test setup.

Framework test files are collected only when their framework is installed, so they import it at
the top like any other module (no `pytest.importorskip` ahead of their imports); pytest's header
says what was left out. `import remat_kit` itself works without either framework, which
tests/test_import.py checks. Helper modules next to the tests (`jax_helpers`, `torch_helpers`)
import by name: pytest puts this directory on sys.path (default `prepend` import mode).
"""

from __future__ import annotations

import importlib.util
import os

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
