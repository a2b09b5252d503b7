"""Price a selective plan's dispatch modes, and the whole-layer plans that need none.

A layer the plan keeps whole runs as written; one it recomputes whole is plain non-reentrant
checkpoint. Only a layer planned op by op runs under the replay modes (_modes.py), and there
every op of its forward and of its replay goes through Python (`mode_op_seconds`). On a large
layer that is noise beside the ops; on a small one it is most of the step (issue 12: the sweep's
tiny models stepped at 2-2.9x of no remat under `auto`, slower than checkpointing every layer).
The solver prices recompute only, so the choice between its plan and the best plan of whole
layers that fits the same budget is made here, by predicted time: recompute (the device's
calibrated roofline and per-op cost) plus the modes' cost per op, or, for a region run as plain
checkpoint, the ops it recomputes beyond what the backward needs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from remat_kit._core.graph import DeviceSpec
from remat_kit._core.plan import Decision, Plan
from remat_kit._torch._graph import TorchGraph
from remat_kit._torch._modes import Region


def region_modes_seconds(region: Region, op_seconds: float) -> float:
    """Time the replay modes add to one call of `region`: its forward ops and the ops its replay
    dispatches (up to the last one not skipped: checkpoint stops the recompute there)."""
    return (len(region.steps) + region.last_replayed + 1) * op_seconds


def plain_extra(region: Region, device: DeviceSpec) -> tuple[int, float]:
    """(FLOPs, seconds) a plain checkpoint of `region` recomputes beyond what the plan needs."""
    steps = region.skipped_but_run
    return sum(s.flops for s in steps), sum(device.op_seconds(s.flops, s.bytes_moved) for s in steps)


def plain_when_faster(device: DeviceSpec, op_seconds: float) -> Callable[[Region], bool]:
    """For `regions(plain=...)`: a region that keeps nothing inside runs as plain checkpoint when
    the ops it runs beyond the plan cost less than the modes would (a GPT layer's output
    projections are outside what its backward needs: plain checkpoint recomputes them, the modes
    skip them)."""
    return lambda region: plain_extra(region, device)[1] <= region_modes_seconds(region, op_seconds)


def predicted_seconds(plan: Plan, regions: dict[str, Region], device: DeviceSpec, op_seconds: float) -> float:
    """A plan's predicted extra step time as run: its recompute, what plain regions run beyond
    it, and the modes' cost in the others."""
    extra = sum(plain_extra(r, device)[1] if r.plain else region_modes_seconds(r, op_seconds) for r in regions.values())
    return plan.predicted_recompute_seconds + extra


def as_run(plan: Plan, regions: dict[str, Region], device: DeviceSpec) -> Plan:
    """`plan` with its recompute FLOPs and time counting what its plain regions run beyond it (so
    the FLOPs it reports are those FlopCounterMode counts)."""
    flops = seconds = 0.0
    for region in regions.values():
        if region.plain:
            f, t = plain_extra(region, device)
            flops, seconds = flops + f, seconds + t
    return dataclasses.replace(
        plan,
        predicted_recompute_flops=plan.predicted_recompute_flops + int(flops),
        predicted_recompute_seconds=plan.predicted_recompute_seconds + seconds,
    )


def whole_layer_decisions(tg: TorchGraph, recomputed: set[str]) -> dict[str, Decision]:
    """Every free value of the layers named in `recomputed` RECOMPUTE, the rest SAVE (pinned kept)."""
    g = tg.graph
    out = {}
    for i in g.free_values:
        v = g.values[i]
        if v.name not in tg.pinned:
            out[v.name] = Decision.RECOMPUTE if g.block_names[v.block] in recomputed else Decision.SAVE
    return out


def _spread(layers: list[str], k: int) -> set[str]:
    """`k` of `layers` spaced evenly (every other layer for half of them)."""
    return {layers[(j * len(layers)) // k] for j in range(k)} if k else set()


def cheapest_layer_seconds(tg: TorchGraph, device: DeviceSpec) -> float:
    """Predicted time to recompute the cheapest layer whole: what any plan of whole layers that
    frees memory pays at least (so a selective plan predicted below it needs no search)."""
    g = tg.graph
    layers = {s.name for s in tg.segments if s.module is not None}
    costs = [
        sum(device.op_seconds(g.values[i].flops, g.values[i].bytes_moved) for i in g.block_members[b])
        for b, name in enumerate(g.block_names)
        if name in layers
    ]
    return min(costs, default=0.0)


def fastest_whole_layer_plan(
    tg: TorchGraph, make: Callable[[dict[str, Decision]], Plan], limit: int, device: DeviceSpec
) -> Plan | None:
    """The whole-layer plan with the least predicted recompute time whose activation bytes fit
    `limit` (None: none fits). Candidates: the first k layers recomputed, or k spread evenly; for
    each pattern the least k that fits (found by bisection: more layers recomputed never holds
    more). `make` turns decisions into a plan as the replay runs it."""
    layers = [s.name for s in tg.segments if s.module is not None and s.name in tg.graph.block_names]
    if not layers:
        return None
    best: Plan | None = None
    for pattern in (lambda k: set(layers[:k]), lambda k: _spread(layers, k)):
        lo, hi, found = 1, len(layers), None
        while lo <= hi:
            k = (lo + hi) // 2
            plan = make(whole_layer_decisions(tg, pattern(k)))
            if plan.predicted_activation_bytes <= limit:
                found, hi = plan, k - 1
            else:
                lo = k + 1
        if found is not None and (best is None or found.predicted_recompute_seconds < best.predicted_recompute_seconds):
            best = found
    return best


class _Passthrough(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.num_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.num_ops += 1
        return func(*args, **(kwargs or {}))


@functools.cache
def mode_op_seconds(device_type: str = "cpu", repeats: int = 7) -> float:
    """What one op pays for running under a TorchDispatchMode, per op: a small layer's ops (norm,
    linear, GELU, attention-like softmax, dropout, views; autograd recording) on tiny tensors,
    timed with and without a pass-through mode (medians of `repeats`). A selective region pays it
    for every op of its forward and of its replay; a plain checkpoint never does.

    0 when calibration is off (``REMAT_KIT_CALIBRATE=0``: plans then price recompute alone)."""
    import os
    import statistics
    import time

    import torch.nn.functional as F

    if os.environ.get("REMAT_KIT_CALIBRATE", "1").strip().lower() in ("0", "false", "no", "off"):
        return 0.0
    if device_type == "meta":  # a model planned from shapes only: no device to measure
        return 0.0
    device = torch.device(device_type) if device_type != "cuda" else torch.device("cuda", torch.cuda.current_device())
    # Constant inputs: calibration draws no random numbers of its own (its dropout draws are
    # undone by the caller's fork_rng).
    x = torch.linspace(-1, 1, 64, device=device).reshape(2, 4, 8).requires_grad_()
    w = torch.linspace(-1, 1, 64, device=device).reshape(8, 8).requires_grad_()

    def layer() -> float:
        start = time.perf_counter()
        for _ in range(10):
            h = F.linear(F.layer_norm(x, (8,)), w).view(2, 4, 2, 4).transpose(1, 2).reshape(2, 4, 8)
            h = F.dropout(F.gelu((h @ h.transpose(1, 2)).softmax(-1) @ h), 0.1)
        return time.perf_counter() - start

    def timed(mode: Any) -> float:
        times = []
        for _ in range(repeats + 1):  # the first one warms up
            if mode is None:
                times.append(layer())
            else:
                with mode:
                    times.append(layer())
        return statistics.median(times[1:])

    counter = _Passthrough()
    with_mode = timed(counter)
    without = timed(None)
    return max(0.0, (with_mode - without) / max(1, counter.num_ops // (repeats + 1)))
