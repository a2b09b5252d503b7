"""Argument checks of `Resumable` and what each step records besides the state."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def check_directory(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory={directory!r} must be a str or os.PathLike path to a directory.")
    path = Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"directory={str(directory)!r} is a file, not a directory; checkpoints are step "
            "subdirectories. Pass a directory path (it is created if missing)."
        )
    return path


def positive_int(name: str, value: Any, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an int >= 1" if allow_none else "an int >= 1"
        raise ValueError(f"{name}={value!r} is not allowed; pass {allowed}.")
    return value


def check_keep_best(keep_best: Any) -> tuple[str, str] | None:
    if keep_best is None:
        return None
    if (
        not isinstance(keep_best, (tuple, list))
        or len(keep_best) != 2
        or not isinstance(keep_best[0], str)
        or keep_best[1] not in ("min", "max")
    ):
        raise ValueError(
            f"keep_best={keep_best!r} is not allowed; pass (metric_name, 'min' | 'max'), "
            "e.g. keep_best=('val_loss', 'min'), or None."
        )
    return keep_best[0], keep_best[1]


def check_metrics(metrics: Any) -> dict[str, float | int] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics={metrics!r} must be a dict of metric name -> number, or None.")
    clean = {}
    for name, value in metrics.items():
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            try:
                value = value.item()  # one-element numpy / jax / torch values
            except (ValueError, RuntimeError):
                pass  # more than one element: rejected below
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metrics[{name!r}]={value!r}: metric names must be str, values numbers.")
        clean[name] = value
    return clean


def versions() -> dict[str, str]:
    import sys
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for module, dist in (
        ("jax", "jax"),
        ("torch", "torch"),
        ("numpy", "numpy"),
        ("orbax", "orbax-checkpoint"),
        ("flax", "flax"),
        ("remat_kit", "remat_kit"),
    ):
        if module in sys.modules or module in ("numpy", "orbax"):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    return versions


def check_metadata(metadata: Any) -> dict[str, Any] | None:
    if metadata is None:
        return None
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"metadata={metadata!r} must be a JSON-serializable dict (str keys; dict, list, "
            f"str, number, bool, None values): {error}"
        ) from error
    return dict(metadata)


def step_meta(step: int, metrics: Any, metadata: Any, keep_best: tuple[str, str] | None, fmt: str) -> dict[str, Any]:
    """The JSON item saved with every step (besides the state's spec)."""
    return {
        "format": fmt,
        "step": step,
        "metrics": metrics,
        "metadata": metadata,
        "keep_best": list(keep_best) if keep_best else None,
        "versions": versions(),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }


def orbax_metrics(metrics: dict[str, Any] | None, keep_best: tuple[str, str] | None) -> dict[str, Any] | None:
    """The metrics Orbax ranks steps by: only the keep_best one, and never a NaN (it must not rank best)."""
    if not keep_best or not metrics or keep_best[0] not in metrics:
        return None
    return metrics if math.isfinite(metrics[keep_best[0]]) else None
