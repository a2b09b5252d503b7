"""The sweep's progress file: every finished row, saved after each cell through `remat_kit.resume`.

Step k of the checkpoint directory holds the first k rows, so a row is either committed with its
step or not at all: after `kill -9` the sweep restarts from the newest committed step, with no
row lost and none twice (Orbax commits a step by renaming its temporary directory).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any


class ConfigMismatchError(ValueError):
    pass


class Progress:
    """Rows measured so far in `run_dir`, for a sweep described by `config` (a JSON dict)."""

    def __init__(self, run_dir: pathlib.Path, config: dict[str, Any], *, fresh: bool = False) -> None:
        from remat_kit import resume

        self.directory = run_dir / "progress"
        if fresh and self.directory.exists():
            shutil.rmtree(self.directory)
        # Synchronous saves: a cell takes seconds, a save a fraction of one, and a row reported
        # as saved must be on disk before the next cell starts.
        self._ckpt = resume.Resumable(self.directory, keep=2, async_save=False)
        self.config = config
        self.rows: list[dict[str, Any]] = []
        restored = self._ckpt.restore_latest()
        if restored is not None:
            step, state = restored
            saved = self._ckpt.metadata(step).get("metadata") or {}
            if saved.get("config") != config:
                self._ckpt.close()
                raise ConfigMismatchError(_mismatch(run_dir, saved.get("config") or {}, config))
            self.rows = json.loads(state["rows"])
            if len(self.rows) != step:
                raise RuntimeError(
                    f"{self.directory}: step {step} holds {len(self.rows)} rows; the progress "
                    "file is inconsistent. Start over with --fresh."
                )

    @property
    def done(self) -> set[str]:
        return {r["cell_id"] for r in self.rows}

    def add(self, row: dict[str, Any]) -> None:
        """Appends `row` and commits it before returning."""
        if row["cell_id"] in self.done:
            raise ValueError(f"cell {row['cell_id']!r} is already recorded in {self.directory}.")
        rows = [*self.rows, row]
        self._ckpt.save(len(rows), {"rows": json.dumps(rows, default=float)}, metadata={"config": self.config})
        self.rows = rows

    def checkpointer(self) -> Any:
        return self._ckpt

    def state(self) -> dict[str, str]:
        return {"rows": json.dumps(self.rows, default=float)}

    def close(self) -> None:
        self._ckpt.close()


def _mismatch(run_dir: pathlib.Path, saved: dict, wanted: dict) -> str:
    diff = [
        f"{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}"
        for k in sorted(set(saved) | set(wanted))
        if saved.get(k) != wanted.get(k)
    ]
    return (
        f"--out {run_dir} holds a sweep with other settings ({'; '.join(diff)}). Rerun with the same "
        "arguments to resume it, pass --fresh to start over there, or choose another --out."
    )
