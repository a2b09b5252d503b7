"""From a traced cost graph and a budget to per-value decisions.

Three cases, by the structure `_graph.build` found:

* a top-level `scan` over layers: one scan body runs every layer, so its plan must be the same
  in every iteration. Each option of the body's block menu (the core's op-level 0-1 programs at
  several caps) is tried in every iteration at once, the blocks outside the scan are left to
  the core's chain DP, and the least-cost combination that fits wins. Scanned layers also get
  grouped options: g layers per loop step (g dividing L, up to `segment_cap(L)`), each group one
  segment recomputed from its input carry (the core's `segment_options` of span g at starts
  b0, b0 + g, ...), which drops the L - L/g kept carries a per-layer plan cannot go below;
  `_run` runs them by regrouping the scan (as the √n layout of scanned layers does). In
  `_scanplan.py`;
* several blocks without a scan (unrolled layers): the core's `solve`, whose chain DP may also
  checkpoint up to `segment_cap(n)` consecutive blocks as one segment (their inner boundaries
  recomputed, as √n checkpointing and rotor do; `_run` runs a segment as one region). On a
  chain of small blocks the kept boundaries are the floor of one checkpoint per block, and only
  segments go below it;
* one layer its caller repeats (`per_call`: a decorated layer class or a scan body, one block):
  a fractional budget bounds what each call keeps for its backward, as a fraction of what no
  remat keeps (the activation memory of a deep stack of it, up to one layer's recompute
  transient). A byte budget bounds the single call's whole peak. A function or model of one
  block is planned as a whole step like any other (the core's `solve`).

`floor` names the least activation bytes each case reaches, so callers (the verifier, `auto`
below the model's floor) ask for it rather than catch `choose`'s `InfeasibleBudgetError`.
"""

from __future__ import annotations

import dataclasses

from remat_kit._core import chain_dp
from remat_kit._core.budget import format_bytes, parse_budget
from remat_kit._core.graph import DeviceSpec
from remat_kit._core.percall import cheapest_within
from remat_kit._core.plan import Plan
from remat_kit._core.simulate import baseline_activation_bytes
from remat_kit._core.solve import (
    Costs,
    InfeasibleBudgetError,
    block_menus,
    segment_cap,
    smallest_activation_bytes,
    solve,
)
from remat_kit._jax._device import default_device
from remat_kit._jax._graph import Traced
from remat_kit._jax._scanplan import plan_from_codes, scan_groups, scan_menus, scan_options, trials, uniform_scans

__all__ = ["Floor", "Model", "choose", "floor", "scan_groups"]  # scan_groups: the verifier's and tests' too

PIECE_SEGMENT_BLOCKS = 2  # blocks per segment on a chain of pieces (see `choose`)
FLOOR_HAIR = 1.0005  # a least-memory plan is asked this far above the floor's fraction (`Model.least_memory`)


def choose(
    traced: Traced,
    budget: object,
    *,
    solver: str | None,
    offload: bool,
    device: DeviceSpec | None = None,
    max_segment_blocks: int | None = None,
    scan_group: int | None = None,
    per_call: bool = False,
) -> Plan:
    """The plan for `traced` under `budget` (see the module doc). `max_segment_blocks` overrides
    `segment_cap` on unrolled chains (the verifier asks for coarser segments with it);
    `scan_group` g restricts scans to g layers per loop step (1: per-layer plans only);
    `per_call`: `traced` is one layer its caller repeats, and a fractional budget bounds what
    one call keeps (otherwise it bounds the whole step, one block or many).

    Raises `InfeasibleBudgetError` below `floor(...)` of the same arguments; a caller that
    needs the floor asks `floor` rather than catching this."""
    graph = traced.graph
    parsed = parse_budget(budget)
    device = device or default_device()
    scans = _scans(traced)
    if parsed.kind == "fraction" and parsed.value == 1.0:
        return Plan.from_decisions(graph, {}, budget=str(parsed), solver="none")
    if scans:
        return uniform_scans(traced, scans, parsed, budget, offload, device, scan_group)
    if _whole_step(traced, parsed.kind, per_call):
        span = _span(traced, solver, max_segment_blocks)
        return solve(graph, budget, solver=solver, offload=offload, device=device, max_segment_blocks=span)
    return _one_layer(traced, parsed, budget, offload, device)


@dataclasses.dataclass(frozen=True)
class Floor:
    """The cost model's least activation bytes under some options, and no remat's (for a
    per-call plan: what one call keeps)."""

    smallest: int
    baseline: int

    @property
    def fraction(self) -> float:
        return self.smallest / self.baseline if self.baseline else 1.0

    def admits(self, budget: object, constant_bytes: int) -> bool:
        """Whether `choose` has a plan under `budget`: its limit (the one `choose` applies) is
        at or above the floor."""
        return parse_budget(budget).limit_activation_bytes(self.baseline, constant_bytes) >= self.smallest


def floor(
    traced: Traced,
    kind: str,
    *,
    solver: str | None,
    offload: bool,
    device: DeviceSpec | None = None,
    max_segment_blocks: int | None = None,
    scan_group: int | None = None,
    per_call: bool = False,
) -> Floor:
    """The least activation bytes `choose` reaches with the same options under a budget of
    `kind` ("fraction" or "bytes"): the smallest budget it plans for, computed from the same
    menus and spans `choose` uses (the chain DP's floor, `min_peak`; the scan combinations'
    least; one layer's least-kept option), so that a caller asks for it instead of catching
    `choose`'s error. Exact as a feasibility test except where the DP thins its states
    (`chain_dp._thin`), where `choose` may still miss a plan at the floor and raises."""
    graph = traced.graph
    device = device or default_device()
    scans = _scans(traced)
    baseline = baseline_activation_bytes(graph)
    if scans:
        costs = Costs(graph, device)
        menus = scan_menus(graph, costs, offload, scans)
        per_scan = [scan_options(traced, s, costs, menus, offload, scan_group, None) for s in scans]
        return Floor(min(chain_dp.min_peak(t) for t in trials(graph, menus, per_scan)), baseline)
    if _whole_step(traced, kind, per_call):
        span = _span(traced, solver, max_segment_blocks)
        smallest = smallest_activation_bytes(graph, offload=offload, device=device, max_segment_blocks=span)
        return Floor(smallest, baseline)
    kept = [o.kept_bytes for o in _layer_menu(graph, device, offload)]
    return Floor(min(kept, default=0), max(kept, default=0))


@dataclasses.dataclass
class Model:
    """The cost model of one traced program under fixed options, as the verifier asks it: the
    plan under a budget, the floor under which it has none, the least-memory plan. Knobs:
    `max_segment_blocks`, `scan_group` (see `choose`)."""

    traced: Traced
    solver: str | None
    offload: bool
    device: DeviceSpec | None = None
    per_call: bool = False
    floors: dict = dataclasses.field(default_factory=dict, repr=False)  # (kind, knobs) -> Floor

    def plan(self, budget: object, **knobs: int | None) -> Plan:
        return choose(
            self.traced,
            budget,
            solver=self.solver,
            offload=self.offload,
            device=self.device,
            per_call=self.per_call,
            **knobs,
        )

    def floor(self, kind: str = "fraction", **knobs: int | None) -> Floor:
        key = (kind, tuple(sorted(knobs.items())))
        if key not in self.floors:
            self.floors[key] = floor(
                self.traced,
                kind,
                solver=self.solver,
                offload=self.offload,
                device=self.device,
                per_call=self.per_call,
                **knobs,
            )
        return self.floors[key]

    def least_memory(self, **knobs: int | None) -> Plan:
        """The cheapest plan at the model's floor under `knobs` (a hair above it: a fraction of
        the floor's bytes rounds down to below them)."""
        return self.plan(min(1.0, self.floor(**knobs).fraction * FLOOR_HAIR), **knobs)


def _scans(traced: Traced) -> list:
    """Scans over two or more layers of the top-level chain: those `choose` plans uniformly."""
    return [s for s in traced.scans.values() if len(s.blocks) > 1 and min(s.blocks) >= 0]


def _whole_step(traced: Traced, kind: str, per_call: bool) -> bool:
    """Whether an unscanned program is planned by the core's `solve` (else as one repeated layer)."""
    return traced.graph.num_blocks >= 2 or kind == "bytes" or not per_call


def _span(traced: Traced, solver: str | None, max_segment_blocks: int | None) -> int:
    """Blocks per segment the core's DP may use on an unscanned chain."""
    graph = traced.graph
    if solver not in (None, "dp") or traced.scans:
        return 1
    if max_segment_blocks is not None:
        return max(1, min(max_segment_blocks, graph.num_blocks))
    if traced.pieces:
        # Pieces are already ~√n ops each, so one checkpoint per piece is the √n layout;
        # longer segments of distinct pieces would each be simulated on their own (no
        # shared options, as identical layers have) for little memory.
        return min(segment_cap(graph.num_blocks), PIECE_SEGMENT_BLOCKS)
    return segment_cap(graph.num_blocks)


def _layer_menu(graph, device: DeviceSpec, offload: bool) -> list:
    """One layer's block menu (its options, keep-all among them)."""
    return block_menus(graph, Costs(graph, device), offload)[0] if graph.num_blocks else []


def _one_layer(traced: Traced, parsed, raw, offload: bool, device: DeviceSpec) -> Plan:
    graph = traced.graph
    menu = _layer_menu(graph, device, offload)
    keep_all = max((o.kept_bytes for o in menu), default=0)
    if keep_all == 0:
        return Plan.from_decisions(graph, {}, budget=str(parsed), solver="none")
    best = cheapest_within(menu, parsed, keep_all)
    if best is None:
        smallest = min(o.kept_bytes for o in menu)
        raise InfeasibleBudgetError.below(
            raw,
            smallest_activation_bytes=smallest,
            baseline_activation_bytes=keep_all,
            per_call=True,
            where=" for this layer",
            why=f"even full recompute keeps {format_bytes(smallest)} of the {format_bytes(keep_all)} no remat keeps "
            "per call (its inputs and outputs)",
            remedies=[] if offload else ["pass offload=True"],
        )
    return plan_from_codes(traced, dict(best.codes), parsed, f"auto:layer:{best.label}")
