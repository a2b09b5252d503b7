"""Measured device constants, cached: what `auto` prices recompute with by default.

The adapters measure (a matmul, a copy, a chain of tiny ops, on the device the model runs on:
`remat_kit/_torch/_device.py`, `remat_kit/_jax/_device.py`); this module turns the figures
into a `DeviceSpec` and caches it in the process and on disk, keyed by device kind and framework
version, so a process pays the microbenchmark once per machine, not once per `auto`.

Environment:

* ``REMAT_KIT_CALIBRATE=0``: no measurement; the uncalibrated ``DeviceSpec()`` constants (plans
  then do not depend on timings: reproducible across machines).
* ``REMAT_KIT_CALIBRATE=fresh``: measure once in this process, ignoring and not writing the disk
  cache (a benchmark that wants the constants of the load it runs under).
* ``REMAT_KIT_CACHE_DIR``: where the disk cache lives (default ``$XDG_CACHE_HOME/remat_kit`` or
  ``~/.cache/remat_kit``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping

from remat_kit._core.device import DeviceSpec

ENV_CALIBRATE = "REMAT_KIT_CALIBRATE"
ENV_CACHE_DIR = "REMAT_KIT_CACHE_DIR"
STEPS_PER_DECADE = 16  # measured rates are rounded to 10^(1/16) (~15%) steps: see `quantize`
# Bumped when what is measured changes, so a cache written by an older version (without the
# per-kind rates, say) is measured again rather than read back incomplete.
CACHE_VERSION = 2
_IN_PROCESS: dict[str, DeviceSpec] = {}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What an adapter's microbenchmark measured (seconds: the least of a few runs)."""

    matmul_flops: float
    matmul_seconds: float
    copy_bytes: float
    copy_seconds: float
    op_overhead_seconds: float  # one tiny op, end to end: dispatch / launch
    # (op kind, bytes read and written, seconds) of one representative op per kind that a copy's
    # rate misprices (random draws, softmax): see DeviceSpec.op_bandwidth
    op_timings: tuple[tuple[str, float, float], ...] = ()

    def spec(self, name: str) -> DeviceSpec:
        return quantize(
            DeviceSpec.calibrated(
                name,
                matmul_flops=self.matmul_flops,
                matmul_seconds=self.matmul_seconds,
                copy_bytes=self.copy_bytes,
                copy_seconds=self.copy_seconds,
                op_overhead_seconds=max(self.op_overhead_seconds, 0.0),
                op_timings=self.op_timings,
            )
        )


def quantize(spec: DeviceSpec) -> DeviceSpec:
    """Round each rate to a 10^(1/16) step, so that timing noise between runs on one machine
    rarely changes a plan (a plan flips only where a rate crosses a step)."""

    def step(x: float) -> float:
        return 10 ** (round(math.log10(x) * STEPS_PER_DECADE) / STEPS_PER_DECADE) if x > 0 else 0.0

    return dataclasses.replace(
        spec,
        peak_flops=step(spec.peak_flops),
        memory_bandwidth=step(spec.memory_bandwidth),
        host_bandwidth=step(spec.host_bandwidth),
        op_overhead_seconds=step(spec.op_overhead_seconds),
        op_bandwidth=tuple((kind, step(rate)) for kind, rate in spec.op_bandwidth),
    )


def cache_dir() -> pathlib.Path:
    root = os.environ.get(ENV_CACHE_DIR)
    if root:
        return pathlib.Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "remat_kit"


def cache_path(key: str) -> pathlib.Path:
    """Where the disk cache keeps the constants measured for `key`."""
    return cache_dir() / f"device-v{CACHE_VERSION}-{re.sub(r'[^A-Za-z0-9_.+-]+', '_', key)}.json"


def calibrated_spec(key: str, measure: Callable[[], Measurement]) -> DeviceSpec:
    """The DeviceSpec for `key` (device kind + framework version + threads): from this process's
    cache, else the disk cache, else `measure()` (then cached in both)."""
    mode = os.environ.get(ENV_CALIBRATE, "").strip().lower() or "1"
    if mode in ("0", "false", "no", "off"):
        return DeviceSpec()
    if mode not in ("1", "true", "yes", "on", "fresh"):
        raise ValueError(f"{ENV_CALIBRATE}={mode!r}: pass 0 (no measurement), 1 (measure once, cached) or 'fresh'.")
    if key in _IN_PROCESS:
        return _IN_PROCESS[key]
    path = cache_path(key)
    spec = _read(path) if mode != "fresh" else None
    if spec is None:
        spec = measure().spec(key)
        if mode != "fresh":
            _write(path, spec)
    _IN_PROCESS[key] = spec
    return spec


def _read(path: pathlib.Path) -> DeviceSpec | None:
    try:
        data = json.loads(path.read_text())
        return DeviceSpec(**data) if isinstance(data, Mapping) else None
    except (OSError, ValueError, TypeError):
        return None  # absent, unreadable or from another version of DeviceSpec: measure again


def _write(path: pathlib.Path, spec: DeviceSpec) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(spec)))
        tmp.replace(path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home: the in-process cache still holds it
