"""Which steps survive a save: Orbax preservation policies composed as keep ∪ best ∪ last-good.

Orbax evaluates the policy when a save starts (the new step included) and deletes the losers
only after the new step commits. `LatestN(keep)` alone could then delete the last good step when
the newest ones are not known good yet (still being written, or failed `verify`); the
`NewestSealed` member keeps the newest step whose manifest was written, i.e. the last step this
layer saw committed and (with `verify=True`) read back intact.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orbax.checkpoint import checkpoint_managers as cm

from remat_kit.resume import _inspect


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What a preservation policy looks at (Orbax's PolicyCheckpointInfo is only a Protocol)."""

    step: int
    time: datetime.datetime
    metrics: Any


@dataclasses.dataclass
class NewestSealed:
    """Preserves the newest step that has a remat_kit manifest (see `_inspect.seal`)."""

    directory: Path

    def should_preserve(
        self, checkpoints: Sequence[cm.PolicyCheckpointInfo], *, context: cm.PreservationContext
    ) -> Sequence[bool]:
        newest = None
        for index in range(len(checkpoints) - 1, -1, -1):
            if _inspect.is_sealed(self.directory / str(checkpoints[index].step)):
                newest = index
                break
        return [index == newest for index in range(len(checkpoints))]


def preservation_policy(directory: Path, keep: int, keep_best: tuple[str, str] | None) -> cm.AnyPreservationPolicy:
    policies: list = [cm.LatestN(n=keep), NewestSealed(directory)]
    if keep_best is not None:
        metric, mode = keep_best
        # BestN sorts ascending and keeps the tail: "min" needs reverse=True. Steps saved without
        # the metric (e.g. a preemption save) are not candidates; LatestN governs them.
        policies.append(
            cm.BestN(
                get_metric_fn=lambda metrics: metrics[metric],
                reverse=(mode == "min"),
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return cm.AnyPreservationPolicy(policies)
