"""From measured compiles to the plan that lands just under the budget, in as few compiles as
the compiler allows.

The cost model's fraction of no remat is not the compiled one: XLA fuses cheap elementwise work
into the backward and never stores some residuals the model counts, and adds buffers of its own.
Measured on the bench's scanned GPT (`reports/jax/first_call.md`), the compiled fraction runs
above the model's by 0.03-0.10, differently per plan. So the search calibrates a line through
no remat's point: compiled fraction ≈ 1 - slope·(1 - model fraction). No remat's compile gives
the first slope (the model's no-remat bytes over the compiled ones: what the model thinks it can
free against what XLA holds); each measured plan replaces it with the slope through its own
point. The model is asked for the fraction that the line maps to `AIM` under the budget, and the
answer is kept when it compiles within `TOLERANCE` under it. Once a plan that fits and one that
misses bracket the target, the next ask is on the chord between them, so a plan the line
mispredicts is not asked for twice.

Below the model's floor, the floor plan and coarser layouts are measured (`floor_plans`), since
XLA often compiles those below the model's figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from remat_kit._core import presets
from remat_kit._core.plan import Plan
from remat_kit._core.solve import InfeasibleBudgetError
from remat_kit._jax._graph import Traced
from remat_kit._jax._plan import scan_groups

MAX_ROUNDS = 3  # plan compiles per budget, past no remat's
AIM = 0.02  # of no remat: where under the budget the line aims
TOLERANCE = 0.05  # of no remat: a fitting plan this close under the budget is kept
MIN_BRACKET = 0.01  # model targets closer than this between fit and miss: stop asking


@dataclasses.dataclass
class Search:
    """One budget's search: what to measure, against what, and what was measured."""

    measure: Callable[[Plan], int]  # compiled temp bytes of a plan
    model_fraction: Callable[[Plan], float]
    replan: Callable[..., Plan]  # replan(model fraction, max_segment_blocks=None, scan_group=None)
    none_bytes: int
    goal_bytes: int
    slope: float = 1.0
    tried: dict = dataclasses.field(default_factory=dict)  # (decisions, segments) -> measured bytes
    floor_error: InfeasibleBudgetError | None = None  # the model's floor, once a target fell below it

    def measured(self, p: Plan) -> int:
        k = (p.decisions, p.segments)
        if k not in self.tried:
            self.tried[k] = self.measure(p)
        return self.tried[k]

    def target(self) -> float:
        """The model fraction the calibrated line maps to `AIM` under the goal."""
        aim = (self.goal_bytes - AIM * self.none_bytes) / max(self.none_bytes, 1)
        return 1.0 - (1.0 - aim) / max(self.slope, 1e-6)

    def recalibrate(self, plan: Plan, measured: int) -> None:
        f_model, f_measured = self.model_fraction(plan), measured / max(self.none_bytes, 1)
        if f_model < 1.0 - 1e-6 and f_measured < 1.0:
            self.slope = (1.0 - f_measured) / (1.0 - f_model)

    def plan_at(self, target: float) -> Plan | None:
        """The model's plan at `target`, or its floor plan where the target is below the floor."""
        if self.floor_error is not None and target < self.floor_error.smallest_fraction:
            return at_floor(self.replan, self.floor_error)
        try:
            return self.replan(target)
        except InfeasibleBudgetError as e:
            self.floor_error = e
            try:
                return at_floor(self.replan, e)
            except InfeasibleBudgetError:
                return None


def fit(search: Search, start: Plan | None) -> Plan | None:
    """The cheapest plan measured to fit within the rounds (see the module doc), or None.

    `start` (the model's plan at a byte budget or a layer's) is asked first where the line has no
    target; without it, the model's least-memory plan."""
    fitting: Plan | None = None
    fit_at, miss_at = None, None  # (model, measured fraction) of the closest fit and miss
    low_bytes = search.goal_bytes - TOLERANCE * search.none_bytes
    first = search.target()
    current = search.plan_at(first) if first > 0 else start or search.plan_at(1e-9)
    current = current or start
    if current is None:
        return None
    for _ in range(MAX_ROUNDS):
        measured = search.measured(current)
        point = (search.model_fraction(current), measured / max(search.none_bytes, 1))
        if measured <= search.goal_bytes:
            if fitting is None or current.predicted_recompute_seconds < fitting.predicted_recompute_seconds:
                fitting = current
            if measured >= low_bytes:
                break
            fit_at = point if fit_at is None or point[0] > fit_at[0] else fit_at
        else:
            miss_at = point if miss_at is None or point[0] < miss_at[0] else miss_at
        search.recalibrate(current, measured)
        target = _between(search, fit_at, miss_at)
        if target is None or target <= 0:  # bracketed, or a byte budget below the constants alone
            break
        nxt = search.plan_at(target)
        if nxt is None or (nxt.decisions, nxt.segments) in search.tried:
            break
        current = nxt
    return fitting


def _between(search: Search, fit_at: tuple | None, miss_at: tuple | None) -> float | None:
    """The next model target: on the calibrated line until a fit and a miss bracket it, then on the
    chord between them (the compiled fraction is neither linear nor monotone in the model's, so the
    bracket, not the line, has the last word). None once the bracket is too narrow to split."""
    aim = (search.goal_bytes - AIM * search.none_bytes) / max(search.none_bytes, 1)
    lo = fit_at[0] if fit_at else 0.0
    hi = miss_at[0] if miss_at else 1.0
    if hi - lo < MIN_BRACKET:
        return None
    if fit_at and miss_at and miss_at[1] > fit_at[1]:
        target = lo + (aim - fit_at[1]) / (miss_at[1] - fit_at[1]) * (hi - lo)
    else:
        target = search.target()
    return target if lo < target < hi else (lo + hi) / 2


def floor_plans(traced: Traced, replan: Callable[..., Plan]) -> list[Plan]:
    """The model's least-memory plan, then the coarser ones XLA may compile smaller; measured
    when no plan the rounds tried fits."""
    floor = least_memory(replan)
    out = [] if floor is None else [floor]
    if not traced.scans and traced.graph.num_blocks >= 3:  # unrolled chains: `choose` plans segments
        out += _coarser(traced, replan)
    elif any(scan_groups(len(info.blocks)) for info in traced.scans.values()):
        out += _regrouped(traced, replan)
    return out


def _regrouped(traced: Traced, replan: Callable[..., Plan]) -> list[Plan]:
    """Scans' counterpart of `_coarser`: the model's least-memory plan with g layers per loop step,
    for every group size g the scans take, then with one plan per layer. The cost model prices a
    group's recompute transient above the carries it drops, but XLA's scan keeps per-iteration
    buffers the model does not see (measured, 8 scanned MLP layers: 2 layers per step under one
    checkpoint 0.12 of no remat, one checkpoint per layer 0.26), so these are measured, not ranked."""
    sizes = sorted({g for info in traced.scans.values() for g in scan_groups(len(info.blocks))})
    return [p for p in (least_memory(replan, scan_group=g) for g in [*sizes, 1]) if p is not None]


def at_floor(replan: Callable[..., Plan], below: InfeasibleBudgetError, **knobs: int) -> Plan:
    """The model's least-memory plan under `knobs`: at the smallest budget `below` names (a hair
    above it, for the rounding of that figure)."""
    return replan(min(1.0, below.smallest_fraction * 1.0005), **knobs)


def least_memory(replan: Callable[..., Plan], **knobs: int) -> Plan | None:
    """The model's least-memory plan under `knobs`, or None where even that does not solve."""
    try:
        replan(1e-9, **knobs)
    except InfeasibleBudgetError as e:
        try:
            return at_floor(replan, e, **knobs)
        except InfeasibleBudgetError:
            return None
    return None


def _coarser(traced: Traced, replan: Callable[..., Plan]) -> list[Plan]:
    """Coarser segmentations, least memory first in the model: the DP's floor with segments up
    to the whole chain (it keeps the fewest boundaries the model knows of), then uniform
    √n-style segments around √n (what XLA compiles most faithfully: one full-recompute region
    per segment). At most four compiles."""
    n = traced.graph.num_blocks
    floor = least_memory(replan, max_segment_blocks=n)
    out: list[Plan] = [] if floor is None else [floor]
    root = max(1, round(math.sqrt(n)))
    for k in dict.fromkeys((root, root - 1, root + 1)):
        if 2 <= k < n:
            out.append(presets.sqrt_n(traced.graph, k))
    return out
