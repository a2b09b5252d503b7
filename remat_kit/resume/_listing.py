"""`list_steps` and the `ls` table: what `python -m remat_kit.resume ls DIR` prints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from remat_kit.resume import _inspect
from remat_kit.resume._errors import CorruptCheckpointError
from remat_kit.resume._inspect import StepInfo


def list_steps(directory: str | os.PathLike[str], *, verify: bool = False) -> list[StepInfo]:
    """Every step under `directory` (oldest first) with status, size, files, time, metrics, best.

    Read-only: nothing is removed or sealed. `verify=True` also reads every array back and
    compares CRC32s (reads the whole checkpoint); otherwise files are checked against the manifest.
    """
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"directory={str(directory)!r} does not exist; pass a checkpoint directory.")
    if not path.is_dir():
        raise NotADirectoryError(f"directory={str(directory)!r} is a file; pass the checkpoint directory.")
    deep_check = None
    if verify:
        from remat_kit.resume._reading import read_step

        def deep_check(step: int) -> str:
            try:
                read_step(path / str(step), step)
            except CorruptCheckpointError as error:
                return error.reason
            return ""

    return _inspect.scan(path, deep_check=deep_check)


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _metrics_text(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def format_table(infos: list[StepInfo]) -> str:
    rows = [("STEP", "STATUS", "SIZE", "FILES", "CREATED (UTC)", "BEST", "METRICS")]
    for info in infos:
        created = info.created.strftime("%Y-%m-%d %H:%M:%S") if info.created else "?"
        status = info.status if info.status == "complete" else f"{info.status}: {info.reason}"
        rows.append(
            (
                str(info.step),
                status,
                _size(info.size_bytes),
                str(info.num_files),
                created,
                "*" if info.is_best else "",
                _metrics_text(info.metrics),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def to_json(infos: list[StepInfo]) -> str:
    return json.dumps(
        [
            {
                "step": i.step,
                "path": str(i.path),
                "status": i.status,
                "reason": i.reason,
                "size_bytes": i.size_bytes,
                "num_files": i.num_files,
                "created": i.created.isoformat() if i.created else None,
                "metrics": i.metrics,
                "sealed": i.sealed,
                "is_best": i.is_best,
            }
            for i in infos
        ],
        indent=2,
    )
