"""Price a selective plan's dispatch modes, and the whole-layer plans that need none.

A layer the plan keeps whole runs as written; one it recomputes whole is plain non-reentrant
checkpoint. Only a layer planned op by op runs under the replay modes (_modes.py), and there
every op of its forward and of its replay goes through Python (`_modecost.mode_cost`, timed on
the modes themselves). On a large
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

from remat_kit._core.budget import Budget
from remat_kit._core.graph import CostGraph, DeviceSpec
from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import simulate
from remat_kit._torch._device import default_device, device_of
from remat_kit._torch._graph import TorchGraph
from remat_kit._torch._modecost import (
    ColdDispatch,
    ModeCost,
    _Recorder,
    calibration_clock,
    calibration_off,
    cold_dispatch,
    mode_cost,
)
from remat_kit._torch._modes import RUN, Region, Step
from remat_kit._torch._replay import decisions_for_torch, regions, run_region
from remat_kit._torch._trace import Profile
from remat_kit._torch._trace_ops import op_kind

WARM = ColdDispatch()  # fixed costs at their calibrated, cache-warm price


def region_modes_seconds(region: Region, modes: ModeCost) -> float:
    """Time the replay modes add to one call of `region` (`ModeCost.of`)."""
    return modes.of(region)


def step_seconds(step: Step, device: DeviceSpec) -> float:
    """Time to run `step`'s op, at its op's or its kind's measured rate (as the graph's values are
    priced: a skipped dropout mask is random draws, not a copy)."""
    name = step.func.replace("::", ".")
    packet = name.rsplit(".", 1)[0] if name.count(".") >= 2 else name  # "aten.gelu.default" -> "aten.gelu"
    kind = op_kind(name, step.restore_rng or step.explicit_generator).value
    return device.named_op_seconds(packet, kind, step.flops, step.bytes_moved)


def plain_extra(region: Region, device: DeviceSpec) -> tuple[int, float]:
    """(FLOPs, seconds) a plain checkpoint of `region` recomputes beyond what the plan needs."""
    steps = region.skipped_but_run
    return sum(s.flops for s in steps), sum(step_seconds(s, device) for s in steps)


def plain_when_faster(device: DeviceSpec, modes: ModeCost, cold: ColdDispatch = WARM) -> Callable[[Region], bool]:
    """For `regions(plain=...)`: a region that keeps nothing inside runs as plain checkpoint when
    the ops it runs beyond the plan cost less than the modes would (a GPT layer's output
    projections are outside what its backward needs: plain checkpoint recomputes them, the modes
    skip them); the modes' cost at the region's cache-cold factor (`fixed_seconds`)."""
    return lambda region: (
        plain_extra(region, device)[1] <= region_modes_seconds(region, modes) * cold.factor(region_bytes(region))
    )


@dataclasses.dataclass(frozen=True)
class RegionCost:
    """What a checkpoint region costs besides the ops it recomputes (`checkpoint_region_cost`)."""

    frame_seconds: float = 0.0  # entering and leaving the region, and starting its recompute
    op_seconds: float = 0.0  # per op inside: the pack / unpack hooks of what the op saves

    def of(self, region: Region) -> float:
        return self.frame_seconds + self.op_seconds * len(region.steps)


def unvalued_seconds(region: Region, device: DeviceSpec) -> float:
    """The dispatch cost of the ops a recompute runs that own no value of the graph (views:
    priced at nothing as values, dispatched with autograd all the same)."""
    steps = region.steps[: region.last_replayed + 1]
    return device.op_overhead_seconds * sum(s.action == RUN and not (s.flops or s.bytes_moved) for s in steps)


def region_bytes(region: Region) -> float:
    """Mean bytes moved by the region's ops that move any: what runs between two of its ops'
    fixed costs (`ColdDispatch`)."""
    moved = [s.bytes_moved for s in region.steps if s.bytes_moved]
    return sum(moved) / len(moved) if moved else 0.0


def fixed_seconds(
    region: Region, device: DeviceSpec, modes_seconds: float, cost: RegionCost, cold: ColdDispatch
) -> float:
    """A region's fixed costs besides its ops' kernels (`modes_seconds` of the modes, checkpoint's
    own `cost`, the views it dispatches), each paid between ops that move `region_bytes` on
    average: at `cold`'s factor for that many bytes."""
    fixed = modes_seconds + cost.of(region) + unvalued_seconds(region, device)
    return fixed * cold.factor(region_bytes(region))


def predicted_seconds(
    plan: Plan,
    regions: dict[str, Region],
    device: DeviceSpec,
    modes: ModeCost,
    cost: RegionCost = RegionCost(),
    cold: ColdDispatch = WARM,
) -> float:
    """A plan's predicted extra step time as run: its recompute, what plain regions run beyond
    it, the modes' cost in the others (forward and replay), and each region's own cost. A layer
    kept whole adds nothing: it runs as written, unwrapped (`_run.install_blocks` wraps only the
    layers of a region). What `by_time` chooses by and `as_run` reports."""
    return plan.predicted_recompute_seconds + sum(
        sum(region_costs(r, device, modes, cost, cold)[1:]) for r in regions.values()
    )


def region_costs(
    region: Region, device: DeviceSpec, modes: ModeCost, cost: RegionCost, cold: ColdDispatch
) -> tuple[float, float, float, float]:
    """(FLOPs a plain region runs beyond the plan, the seconds of those ops, the region's fixed
    costs in the recompute frame, its time in the forward) as priced by `predicted_seconds`: the
    replay mode in the third, the forward mode in the fourth, both at the region's cold factor
    (`fixed_seconds`). Checkpoint's own cost (`RegionCost`: its frame, and the pack and unpack
    hooks of the forward and the backward, timed as a whole step) is counted in the third."""
    if region.plain:
        flops, seconds = plain_extra(region, device)
        return flops, seconds, fixed_seconds(region, device, 0.0, cost, cold), 0.0
    recompute = fixed_seconds(region, device, modes.replay_of(region), cost, cold)
    return 0.0, 0.0, recompute, modes.forward_of(region) * cold.factor(region_bytes(region))


def run_costs(regions: dict[str, Region], device: DeviceSpec, device_type: str) -> tuple[float, float, float, float]:
    """`region_costs` summed over `regions`, at the constants calibrated for `device_type`."""
    modes, cost = mode_cost(device_type), checkpoint_region_cost(device_type, op_overhead=device.op_overhead_seconds)
    cold = cold_dispatch(device_type)
    sums = [0.0, 0.0, 0.0, 0.0]
    for region in regions.values():
        sums = [a + b for a, b in zip(sums, region_costs(region, device, modes, cost, cold))]
    return sums[0], sums[1], sums[2], sums[3]


def as_run(plan: Plan, regions: dict[str, Region], device: DeviceSpec, device_type: str = "cpu") -> Plan:
    """`plan` with its predictions counting what its regions run beyond it.

    `predicted_recompute_flops` / `predicted_recompute_seconds`: the ops a plain region runs past
    the plan (so the FLOPs it reports are those FlopCounterMode counts), each region's own cost
    (checkpoint's frame and hooks, `checkpoint_region_cost`), the ops it runs that own no value
    (`unvalued_seconds`) and, in a selective region, the replay mode's (`ModeCost.replay_of`), those
    fixed costs at the cache-cold factor of the region's op sizes (`fixed_seconds`): the recompute
    the step pays, not only its ops' (reports/step_time_model.md).

    `predicted_extra_step_seconds`: all of that and what the selective regions' forward pays under
    `_ForwardMode` (`ModeCost.forward_of`, at the same factor): the step time the plan is predicted
    to add over no remat, the figure `by_time` chose it by (`predicted_seconds`)."""
    flops, extra, fixed, forward = run_costs(regions, device, device_type)
    seconds = plan.predicted_recompute_seconds + extra + fixed
    return dataclasses.replace(
        plan,
        predicted_recompute_flops=plan.predicted_recompute_flops + int(flops),
        predicted_recompute_seconds=seconds,
        predicted_extra_step_seconds=seconds + forward,
    )


def whole_layer_decisions(tg: TorchGraph, recomputed: set[str], graph: CostGraph | None = None) -> dict[str, Decision]:
    """Every free value of the layers named in `recomputed` RECOMPUTE, the rest SAVE (pinned kept).
    `graph`: `tg.graph` regrouped into segments (the boundaries inside a segment are free there)."""
    g = graph or tg.graph
    out = {}
    for i in g.free_values:
        v = g.values[i]
        if v.name not in tg.pinned:
            layer = tg.graph.block_names[tg.graph.values[i].block]
            out[v.name] = Decision.RECOMPUTE if layer in recomputed else Decision.SAVE
    return out


def _spread(num: int, k: int) -> list[int]:
    """`k` of `range(num)` spaced evenly (every other one for half of them)."""
    return [(j * num) // k for j in range(k)] if k else []


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


def _segments(block_names: tuple[str, ...], chosen: list[list[str]]) -> tuple[tuple[str, ...], ...]:
    """The graph's blocks with each group of `chosen` (consecutive layers) as one segment."""
    first = {group[0]: tuple(group) for group in chosen if len(group) > 1}
    out: list[tuple[str, ...]] = []
    skip = 0
    for name in block_names:
        if skip:
            skip -= 1
            continue
        group = first.get(name, (name,))
        out.append(group)
        skip = len(group) - 1
    return tuple(out)


def fastest_whole_layer_plan(
    tg: TorchGraph,
    make: Callable[[set[str], tuple[tuple[str, ...], ...]], Plan],
    limit: int,
    price: Callable[[Plan], float],
    max_span: int = 1,
) -> Plan | None:
    """The whole-layer plan with the least predicted time (`price`) whose activation bytes fit
    `limit` (None: none fits). Layers are recomputed in groups of `span` consecutive layers
    (1..`max_span`), each group one checkpoint region (Chen et al.'s segments: fewer regions,
    each paying checkpoint's own cost once); the groups recomputed are the first k or k spread
    evenly, for each pattern the least k that fits (bisection: more groups recomputed never holds
    more). `make(layers, segments)` is the plan recomputing `layers` whole, as the replay runs it."""
    names = tg.graph.block_names
    layers = [s.name for s in tg.segments if s.module is not None and s.name in names]
    if not layers:
        return None
    best, best_seconds = None, float("inf")
    for span in range(1, max(1, max_span) + 1):
        groups = [layers[i : i + span] for i in range(0, len(layers), span)]
        # A segment spans consecutive blocks of the graph: nothing may run between its layers.
        if any(names.index(g[-1]) - names.index(g[0]) != len(g) - 1 for g in groups):
            continue
        if span > 1 and len(groups) < 2:
            continue
        for pattern in (lambda k: list(range(k)), lambda k: _spread(len(groups), k)):
            lo, hi, found = 1, len(groups), None
            while lo <= hi:
                k = (lo + hi) // 2
                chosen = [groups[j] for j in pattern(k)]
                plan = make({n for g in chosen for n in g}, _segments(names, chosen))
                if plan.predicted_activation_bytes <= limit:
                    found, hi = plan, k - 1
                else:
                    lo = k + 1
            if found is not None and (seconds := price(found)) < best_seconds:
                best, best_seconds = found, seconds
    return best


class _Block(torch.nn.Module):
    """A pre-norm transformer block (attention with dropout, a GELU MLP), run at tiny widths by
    `checkpoint_region_cost`: the Python, module calls, autograd and checkpoint hooks of a real
    layer, whose ops then cost next to nothing. (A chain of tiny `tanh` calls priced a GPT layer's
    region at well under what its recompute spent outside its ops: reports/step_time_model.md.)"""

    def __init__(self, d: int, heads: int, device: torch.device) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d, device=device), torch.nn.LayerNorm(d, device=device)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d, device=device), torch.nn.Linear(d, d, device=device)
        self.fc, self.out = torch.nn.Linear(d, 4 * d, device=device), torch.nn.Linear(4 * d, d, device=device)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (h.view(b, t, self.heads, -1).transpose(1, 2) for h in self.qkv(self.ln1(x)).split(d, -1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.out(torch.nn.functional.gelu(self.fc(self.ln2(x)))))


@functools.cache
def checkpoint_region_cost(
    device_type: str = "cpu", repeats: int = 7, op_overhead: float = 0.0, inner: int = 5
) -> RegionCost:
    """What one plain non-reentrant checkpoint region costs beyond its ops as the device prices
    them (`op_overhead` each: `DeviceSpec.op_overhead_seconds`), least of `repeats` of a region
    trained through the plan's own region runner (`_replay.run_region`: checkpoint with its RNG
    state, the runner's Python and dynamo guard) minus without.

    The frame is timed on a region of one op (the recompute's start and early stop, the runner),
    each call right after a training step of a tiny transformer block, as a plan's regions run:
    between two calls of a region's frame a step runs a layer's forward or backward, which evicts
    checkpoint's Python and the dispatcher's state from the caches. Timed back to back it read
    a fraction of what it costs in a step, and a plan of one region per layer was chosen over one
    region over two layers that steps faster (reports/torch/tiny_peers.md). The per-op part on
    regions of one and of two tiny transformer blocks (`_Block`: module calls, attention, dropout,
    what a layer's recompute runs besides its ops), net of the frame timed as they were (back to
    back). (Both parts fitted from the two blocks alone moved by 10x between runs on a loaded
    machine, although their sum for a layer did not.) On a small model a region's frame is a
    layer's worth of time (issue 12: sqrt(n)'s few regions stepped faster than `auto`'s many).

    Nothing when calibration is off (``REMAT_KIT_CALIBRATE=0``)."""

    if calibration_off(device_type):
        return RegionCost()
    device, clock, sync = calibration_clock(device_type)
    x = torch.linspace(-1, 1, 4 * 16, device=device).reshape(1, 4, 16).requires_grad_()
    plain = Region("calibration", "calibration", (), plain=True)  # run as a plan's plain region is

    def extra(fn: Callable[[torch.Tensor], torch.Tensor], between: Callable[[], Any] | None = None) -> float:
        """Least time of a training step of `fn` with checkpoint minus without, timed in turn;
        `between`, untimed, before each step."""
        with_ckpt, without = [], []
        for _ in range(repeats + 1):  # the first one warms up
            for out, call in ((with_ckpt, lambda: run_region(plain, fn, (x,), {})), (without, lambda: fn(x))):
                spent = 0.0
                for _ in range(inner):
                    if between is not None:
                        between()
                        sync()
                    start = clock()
                    call().sum().backward()
                    sync()
                    spent += clock() - start
                out.append(spent / inner)
        return min(with_ckpt[1:]) - min(without[1:])  # the least disturbed by other processes

    def num_ops(fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
        recorder = _Recorder()
        with recorder:
            fn(x)
        return len(recorder.ops)

    # The blocks' initialisation and dropout masks draw random numbers: the caller's random stream
    # is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        blocks = torch.nn.Sequential(*(_Block(16, 2, device) for _ in range(2)))
        layer_input = torch.linspace(-1, 1, 4 * 4 * 16, device=device).reshape(4, 4, 16).requires_grad_()
        frame = max(0.0, extra(torch.tanh, lambda: blocks[0](layer_input).sum().backward()) - op_overhead)
        warm_frame = max(0.0, extra(torch.tanh) - op_overhead)
        one, two = blocks[:1], blocks
        spent = extra(one) + extra(two) - 2 * warm_frame
        per_op = max(0.0, spent / (num_ops(one) + num_ops(two)) - op_overhead)
    return RegionCost(frame_seconds=frame, op_seconds=per_op)


def by_time(
    module: torch.nn.Module, tg: TorchGraph, prof: Profile, plan: Plan, limit: int, parsed: Budget, span: int
) -> Plan:
    """`plan`, or the fastest plan of whole layers (alone or several to a checkpoint region) that
    fits `limit` where that is predicted faster once the replay modes' per-op cost and each
    checkpoint region's own cost are counted. Regions span at most `span` layers (1 under
    torch.compile, where a region over several layers runs eagerly: a graph break)."""
    # With a profile written out from a few layers, each layer's first call is checked against
    # it whatever the plan (`_run._checked_once`, `_replay.kept_layer_checks`): no reason to
    # keep the solver's plan there.
    device, device_type = default_device(module), device_of(module).type
    modes = mode_cost(device_type)
    cost = checkpoint_region_cost(device_type, op_overhead=device.op_overhead_seconds)
    cold = cold_dispatch(device_type)
    if modes == ModeCost() and cost == RegionCost():  # running a plan priced at nothing: the solver's is fastest
        return plan
    choose = plain_when_faster(device, modes, cold)

    def price(p: Plan) -> float:
        return predicted_seconds(p, regions(tg, p, prof, choose), device, modes, cost, cold)

    selective = price(plan)
    if selective <= cheapest_layer_seconds(tg, device) + cost.frame_seconds:  # no whole-layer plan is faster
        return plan
    grouped: dict[tuple, CostGraph] = {}

    def make(layers: set[str], segments: tuple[tuple[str, ...], ...]) -> Plan:
        if segments != tg.graph.segments and segments not in grouped:
            grouped[segments] = tg.graph.regroup(segments)
        graph = grouped.get(segments, tg.graph)
        raw = Plan.from_decisions(graph, whole_layer_decisions(tg, layers, graph))
        return Plan.from_decisions(
            graph, decisions_for_torch(tg, raw, prof), budget=str(parsed), solver="whole layers", device=device
        )

    layered = fastest_whole_layer_plan(tg, make, limit, price, max_span=span)
    if layered is None or set(simulate(tg.graph, layered).recomputed) & tg.pinned:
        return plan
    return layered if price(layered) < selective else plan


def fast_regions(module: torch.nn.Module, tg: TorchGraph, plan: Plan, prof: Profile, device: Any) -> dict:
    """The plan's checkpoint regions, plain checkpoint where that is faster than the replay.

    With a profile written out from a few layers (`prof.replicated_from`) a plain region still
    runs under the replay's check on its first call (`_run._checked_once`).
    """
    device_type = device_of(module).type
    return regions(tg, plan, prof, plain_when_faster(device, mode_cost(device_type), cold_dispatch(device_type)))
