"""A persistent on-disk cache of verified plans, so a second run of the same program compiles
nothing beyond the user's own step.

Verification compiles the step (see `_verify.py`), which on a large model costs as much as the
training step's own compile; its verdict depends only on the program, its per-device shapes and
shardings, the budget and options, jax / jaxlib and its `jax_remat3` setting, the device kind and
remat_kit's own code. Those are the key (a SHA-256 over their text); the value is the verified plan
(`Plan.to_json`) or the `InfeasibleBudgetError` the budget got, and, keyed without the budget, no
remat's compiled figures, so a second budget on the same program skips that compile too.

Where: `plans/` under remat_kit's cache directory (`$REMAT_KIT_CACHE_DIR`, else
`$XDG_CACHE_HOME/remat_kit`, else `~/.cache/remat_kit`; the device calibration lives there too).
`REMAT_KIT_PLAN_CACHE=0` (or `off`, `false`, `no`) turns it off: every run verifies again.
Entries are written atomically (a temporary file, then `os.replace`), so concurrent processes
may share a directory; an entry that does not parse, or that holds a plan for another graph, is
ignored and overwritten: a cache can cost a compile, never a wrong plan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from remat_kit._core.plan import Plan
from remat_kit._core.solve import InfeasibleBudgetError

ENV_DIR = "REMAT_KIT_CACHE_DIR"  # shared with the core's device calibration (`_core/calibration.py`)
ENV_SWITCH = "REMAT_KIT_PLAN_CACHE"
SCHEMA = 2  # 2: an infeasible verdict is stored as `InfeasibleBudgetError.to_json` (1 held its message)
_OFF = {"0", "off", "false", "no"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # reprs of callables in equation params differ per process


def cache_dir() -> Path | None:
    """The directory plans are kept in, or None when the cache is off (see the module doc)."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
        return None
    root = os.environ.get(ENV_DIR)
    if root:
        return Path(root).expanduser() / "plans"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "remat_kit" / "plans"


def program_key(traced: Any, specs: Sequence[Any], **options: Any) -> str | None:
    """The key of one program under `options` (budget, solver, ...): None when the cache is off."""
    if cache_dir() is None:
        return None
    h = hashlib.sha256()
    for part in (
        f"schema {SCHEMA}",
        _environment(),
        transform_flags(),
        traced.graph.fingerprint(),
        _ops_text(traced.fn),
        repr(sorted(options.items())),
    ):
        h.update(part.encode())
        h.update(b"\0")
    for s in specs:
        h.update(f"{tuple(s.shape)}|{s.dtype}|{getattr(s, 'sharding', None)}\n".encode())
    return h.hexdigest()


def load_plan(key: str | None, graph: Any, budget: object) -> Plan | InfeasibleBudgetError | None:
    """The verdict stored under `key`: a plan for `graph`, the error the budget got (its message
    echoing `budget` as this call wrote it: the key holds the parsed budget, so ``0.5`` and
    ``'50%'`` share an entry), or None."""
    data = _read(key)
    if data is None:
        return None
    try:
        if "error" in data:
            return InfeasibleBudgetError.from_json(data["error"], budget)
        plan = Plan.from_json(data["plan"])
        plan.check_graph(graph)
        for name, _ in plan.decisions:  # KeyError on a name the graph lacks
            graph.index(name)
        return plan
    except (KeyError, TypeError, ValueError):  # another schema or graph: recompute, overwrite
        return None


def store_plan(key: str | None, verdict: Plan | InfeasibleBudgetError) -> None:
    if isinstance(verdict, InfeasibleBudgetError):
        _write(key, {"error": verdict.to_json()})
    else:
        _write(key, {"plan": verdict.to_json()})


def load_figures(key: str | None) -> tuple[int, int, int | None] | None:
    """No remat's compiled temp bytes, the constant bytes beside them and its residual bytes
    (`_verify.none_figures`; None where not read)."""
    data = _read(key)
    try:
        if data is None:
            return None
        kept = data.get("none_residual_bytes")
        return int(data["none_temp_bytes"]), int(data["constant_bytes"]), None if kept is None else int(kept)
    except (KeyError, TypeError, ValueError):
        return None


def store_figures(key: str | None, figures: tuple[int, int, int | None]) -> None:
    kept = figures[2]
    _write(
        key,
        {
            "none_temp_bytes": int(figures[0]),
            "constant_bytes": int(figures[1]),
            "none_residual_bytes": None if kept is None else int(kept),
        },
    )


def _read(key: str | None) -> dict | None:
    root = cache_dir()
    if key is None or root is None:
        return None
    try:
        with open(root / f"{key}.json", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):  # missing, unreadable or torn: a miss
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def _write(key: str | None, payload: dict) -> None:
    root = cache_dir()
    if key is None or root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"schema": SCHEMA, **payload}, f)
        os.replace(tmp, root / f"{key}.json")
    except OSError:  # a read-only or full disk costs the next run a compile, nothing more
        try:
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        except (OSError, NameError):
            pass


def transform_flags() -> str:
    """jax's settings that change what a checkpoint compiles to, read at each call (a process may
    switch them): `jax_remat3` saves values through another path, whose compiled memory differs
    (`_run.saved_values_are_pinned`), so a verdict under one says nothing about the other."""
    return f"jax_remat3={bool(getattr(jax.config, 'jax_remat3', False))}"


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """jax, jaxlib, the device kind and remat_kit's own code: a plan verified under one of them
    says nothing about another (a planner edit changes the plan a budget gets)."""
    import jaxlib

    dev = jax.devices()[0]
    return "|".join(
        [
            jax.__version__,
            getattr(jaxlib, "__version__", "?"),
            dev.platform,
            str(getattr(dev, "device_kind", "")),
            str(jax.device_count()),
            _code_hash(),
            os.environ.get("XLA_FLAGS", ""),
        ]
    )


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    pkg = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in ("_core", "_jax"):
        for path in sorted((pkg / sub).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _ops_text(fn: Any) -> str:
    """The equations as jax prints them (primitive, parameters, avals), addresses stripped; the
    cost graph's fingerprint adds names and wiring. Constants by aval only: a plan depends on
    what is computed and on shapes, not on the values closed over."""
    lines = [f"in {fn.avals[v]}" for v in fn.invars]
    lines += [f"const {fn.avals[v]}" for v in sorted(fn.consts)]
    lines += [_ADDRESS.sub("", str(op.eqn)) for op in fn.ops]
    return "\n".join(lines)
