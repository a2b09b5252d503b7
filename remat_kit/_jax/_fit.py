"""From measured compiles to the plan that lands just under the budget, in as few compiles as
the compiler allows.

The cost model's fraction of no remat is not the compiled one: XLA fuses cheap elementwise work
into the backward and never stores some residuals the model counts, and adds buffers of its own
(workspace, gradients) that the model's peak does not describe. So `fit` is a search over
figures (below), each step one plan compiled:

* the search works in the predicted compiled fraction of a plan, its *figure*. Where no remat's
  residual bytes are known (`_verify.step_figures` reads them off its trace), the figure is the
  plan's kept bytes (the model's, which are the residuals JAX keeps under the plan:
  `_rules.backward_reads`) plus what XLA holds besides residuals in no remat's compile (its temp
  minus its residuals), plus what the plan's recompute holds while a layer's backward runs (the
  recomputed values XLA stores rather than fuses: `recompute_transient`), over no remat's temp:
  measured on the bench's scanned GPT, XLA holds the same bytes besides these whatever the plan
  (`reports/jax/first_call.md`), so the first target aims `AIM` under the budget with slope 1. Elsewhere (one layer, a sharded step) the
  figure is the model's fraction of no remat, and no remat's compile gives the first slope (the
  model's no-remat bytes over the compiled ones). A figure is turned into a plan by asking the
  model for the activation fraction that plan's figure sits at (`Search.plan_at`, a solve or two);
* each measured plan replaces the slope with the one through its own point and narrows the
  bracket (the largest target that fit, the smallest that missed); once a fit and a miss bracket
  the budget, the next target is on the chord between them, so a plan the line mispredicts is
  not asked for twice;
* a target below the model's floor (`_plan.Model.floor`, asked, not caught) is answered with
  the model's least-memory plan;
* a miss well below a miss already measured, and far over what the calibrated line promised
  for it (`WALL` each), is a *wall*: the plan is not of the line's kind (on Flax's lm1b with its
  layers in a loop, the model's plans with segments compile to more than those without at a
  higher figure: `tests/test_jax_unrolled_outside.py`), so the compiled fraction is not monotone
  in the figure. The wall bounds the bracket from below, the next target splits the bracket (the
  line led into the wall), and each wall buys one more round (at most `MAX_WALLS`): without it
  the search went on down to the model's floor, measured more walls and refused a budget that a
  plan between the wall and the first miss fits.

Termination of the rounds (`_next_target`), whichever comes first: a plan compiles within
`TOLERANCE` under the budget; `MAX_ROUNDS` (plus walls) plans have been compiled; the bracket is
narrower than `MIN_BRACKET`; the next target is not positive (a byte budget below the constant
bytes alone); the model answers the next target with a plan already measured (it has nothing
new to offer); or, where another family is searched after this one (`Search.leave_on_far_miss`:
layers recomputed whole on an unrolled chain, `_wholelayers`), the first plan misses the goal by
more than `REACH`. The answer is the cheapest measured plan that fit; where none did but one missed
by at most `REACH`, `_refine` asks for figures beside the least-measured plan (`REFINE_ROUNDS`
compiles at most); else None.

Every plan measured is remembered for the process with its bytes (`known`, shared by every
budget's search of the same program): a search starts from the cheapest that lands within its
`TOLERANCE` band, where one does (no compile: the budget an `InfeasibleBudgetError` names, passed
back, is met by the plan that measured it), and `_verify` falls back on the cheapest that fits the goal.

Below the model's floor, the floor plan, coarser layouts and (unrolled) every layer recomputed whole
are measured (`floor_plans`), since XLA often compiles those below the model's figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from remat_kit._core import presets
from remat_kit._core.graph import CostGraph
from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import decision_codes, needed_and_recomputed, simulate
from remat_kit._jax._device import default_device
from remat_kit._jax._graph import Traced
from remat_kit._jax._plan import Model, scan_groups
from remat_kit._jax._rules import materialised, op_of

MAX_ROUNDS = 3  # plan compiles per budget, past no remat's
AIM = 0.02  # of no remat: where under the budget the line aims
TOLERANCE = 0.05  # of no remat: a fitting plan this close under the budget is kept
MIN_BRACKET = 0.01  # model targets closer than this between fit and miss: stop asking
MAX_SOLVES = 3  # solves turning one figure into a plan (`Search.plan_at`)
WALL = 0.05  # of no remat: a miss this far over the line's promise and under a miss's figure is a wall
MAX_WALLS = 1  # rounds added by walls
REACH = 0.1  # of no remat: a search whose least-measured plan misses the goal by at most this is refined
REFINE_ROUNDS = 2  # plan compiles `_refine` adds at most


@dataclasses.dataclass
class Search:
    """One budget's search: what to measure, against what, and what was measured."""

    measure: Callable[[Plan], int]  # compiled temp bytes of a plan
    model_fraction: Callable[[Plan], float]
    model: Model
    none_bytes: int
    goal_bytes: int
    slope: float = 1.0
    none_residual_bytes: int | None = None  # what JAX's VJP keeps in no remat (see the module doc)
    tried: dict = dataclasses.field(default_factory=dict)  # (decisions, segments) -> measured bytes
    fit_at: tuple[float, float] | None = None  # (figure, measured fraction) of the fit with the largest figure
    miss_at: tuple[float, float] | None = None  # ... of the miss with the smallest
    shift: float | None = None  # the last plan's model fraction minus its figure (`plan_at`)
    budget_fraction: float = 1.0  # the budget as a fraction of the model's no remat: `plan_at` asks no more
    walls: list = dataclasses.field(default_factory=list)  # figures of the walls met (module doc)
    last_wall: bool = False  # the last plan recorded was a wall
    known: dict = dataclasses.field(default_factory=dict)  # (decisions, segments) -> (plan, bytes), any budget
    points: list = dataclasses.field(default_factory=list)  # (figure, measured fraction) of each plan recorded
    # Another family is searched where this search finds nothing (`_wholelayers`, on unrolled
    # chains): a first plan missing the goal by more than `REACH` ends it (the model's figures do
    # not describe this program; more of its plans cost compiles the other family answers with).
    leave_on_far_miss: bool = False

    def measured(self, p: Plan) -> int:
        k = (p.decisions, p.segments)
        if k not in self.tried:
            # A plan that recomputes nothing runs as no remat does (`_run`): its figure is known;
            # one another budget's search of this program measured is not compiled again.
            if _keeps_all(p):
                self.tried[k] = self.none_bytes
            elif k in self.known:
                self.tried[k] = self.known[k][1]
            else:
                self.tried[k] = self.measure(p)
            self.known[k] = (p, self.tried[k])
        return self.tried[k]

    def known_fit(self, at_least: float = 0) -> Plan | None:
        """The cheapest plan measured within the goal (and at `at_least` bytes or more) by any
        search of this program, and within the budget in the model's own terms (`plan_at`)."""
        fits = [
            p
            for p, b in self.known.values()
            if at_least <= b <= self.goal_bytes and p.activation_fraction <= self.budget_fraction
        ]
        return min(fits, key=lambda p: p.predicted_recompute_seconds, default=None)

    def aim(self) -> float:
        """The compiled fraction of no remat the search aims at: `AIM` under the goal."""
        return (self.goal_bytes - AIM * self.none_bytes) / max(self.none_bytes, 1)

    def target(self) -> float:
        """The figure the calibrated line maps to the aim."""
        return 1.0 - (1.0 - self.aim()) / max(self.slope, 1e-6)

    def figure(self, plan: Plan | None) -> float:
        """The plan's predicted compiled fraction of no remat before calibration (module doc);
        None: keep-all under the plan's checkpoints."""
        if self.none_residual_bytes is None:
            return 1.0 if plan is None else self.model_fraction(plan)
        if plan is not None and _keeps_all(plan):
            return 1.0  # runs as no remat does, no checkpoint to change its residuals
        graph = _plan_graph(self.model.traced, plan)
        kept = sum(simulate(graph, plan).kept_bytes_by_block)
        held = kept + recompute_transient(graph, plan) + self.none_bytes - self.none_residual_bytes
        return held / max(self.none_bytes, 1)

    def record(self, plan: Plan, measured: int) -> None:
        """Recalibrate the line through the plan's point and narrow the bracket with it."""
        f_model, f_measured = self.figure(plan), measured / max(self.none_bytes, 1)
        self.points.append((f_model, f_measured))
        promised = 1.0 - self.slope * (1.0 - f_model)
        self.last_wall = (
            measured > self.goal_bytes
            and self.miss_at is not None
            and f_model <= self.miss_at[0] - WALL  # a wall just under the miss leaves nothing between
            and f_measured > promised + WALL
        )
        if self.last_wall:  # the line holds above it, not through it: keep its slope
            self.walls.append(f_model)
            return
        if measured <= self.goal_bytes:
            if self.fit_at is None or f_model > self.fit_at[0]:
                self.fit_at = (f_model, f_measured)
        elif self.miss_at is None or f_model < self.miss_at[0]:
            self.miss_at = (f_model, f_measured)
        if f_model < 1.0 - 1e-6 and f_measured < 1.0:
            self.slope = (1.0 - f_measured) / (1.0 - f_model)

    def plan_at(self, target: float) -> Plan:
        """The plan whose figure is at most `target`, as near it as a few solves find: the model
        is asked at `target` plus the last plan's shift (its model fraction minus its figure; at
        first keep-all's), until the shift settles."""
        if self.none_residual_bytes is None:
            return self._model_plan(target)
        if self.shift is None:
            self.shift = 1.0 - self.figure(None)
        best, last = None, None
        for _ in range(MAX_SOLVES):
            # Never above the budget in the model's own terms: a plan the model itself puts over
            # the budget would report a prediction over it, whatever XLA makes of it.
            plan = self._model_plan(min(target + self.shift, self.budget_fraction))
            figure = self.figure(plan)
            settled = last is not None and (plan.decisions, plan.segments) == (last.decisions, last.segments)
            self.shift, last = plan.activation_fraction - figure, plan
            if figure <= target and (best is None or figure > best[0]):
                best = (figure, plan)
            if settled:
                break
        return last if best is None else best[1]

    def _model_plan(self, target: float) -> Plan:
        """The model's plan at `target`, or its least-memory plan where the target is below its floor."""
        target = min(target, 1.0)  # a figure's shift may carry it past keep-all
        if target > 0 and self.model.floor().admits(target, 0):
            return self.model.plan(target)
        return self.model.least_memory()


def recompute_transient(graph: CostGraph, plan: Plan) -> int:
    """The bytes a plan's recompute holds beside the residuals while a layer's backward runs: the
    largest block's recomputed values that XLA writes to buffers of their own (`_rules.materialised`:
    a matmul's output, a softmax's exp). The core's simulator counts every recomputed value live at
    the recompute, which overstates XLA, whose fusions store none of the cheap elementwise ones; no
    remat recomputes nothing, so what its compile holds beside the residuals has none of these."""
    _, recomputed = needed_and_recomputed(graph, decision_codes(graph, plan))
    readers: dict[int, list[str]] = {}
    for k, v in enumerate(graph.values):
        if recomputed[k]:
            for d in v.deps:
                readers.setdefault(graph.index(d), []).append(op_of(v.name))
    by_block: dict[int, int] = {}
    for k, v in enumerate(graph.values):
        if recomputed[k] and materialised(op_of(v.name), readers.get(k, ())):
            by_block[v.block] = by_block.get(v.block, 0) + v.num_bytes
    return max(by_block.values(), default=0)


def _keeps_all(plan: Plan) -> bool:
    return not plan.segments and all(d is Decision.SAVE for _, d in plan.decisions)


def fit(search: Search, start: Plan | None) -> Plan | None:
    """The cheapest plan measured to fit (see the module doc), or None.

    `start` (the model's plan at a byte budget or a layer's) is asked first where the line has no
    positive target; without it, the model's least-memory plan."""
    low_bytes = search.goal_bytes - TOLERANCE * search.none_bytes
    # A plan another budget's search measured within this one's band is the answer the rounds
    # would stop at: no compile (a budget passed back from an `InfeasibleBudgetError` lands here).
    known = search.known_fit(at_least=low_bytes)
    if known is not None:
        return known
    first = search.target()
    current: Plan | None = search.plan_at(first) if first > 0 else start or search.model.least_memory()
    fitting: Plan | None = None
    rounds = 0
    while rounds < MAX_ROUNDS + min(len(search.walls), MAX_WALLS):
        rounds += 1
        measured = search.measured(current)
        search.record(current, measured)
        if rounds == 1 and search.leave_on_far_miss and measured > search.goal_bytes + REACH * search.none_bytes:
            return None
        if measured <= search.goal_bytes:
            if fitting is None or current.predicted_recompute_seconds < fitting.predicted_recompute_seconds:
                fitting = current
            if measured >= low_bytes:
                break  # within the tolerance band: done
        current = _next_plan(search)
        if current is None:
            break
    return fitting or _refine(search)


def _refine(search: Search) -> Plan | None:
    """Where the rounds found no fit but a plan measured within `REACH` of the goal: ask for a
    figure beside the least-measured plan (`REFINE_ROUNDS` compiles at most), in the interval
    below it first (the line's way), else the one above it, each only if at least `WALL` wide;
    there, the calibrated line's target kept within the interval's middle third. The compiled
    fraction is not monotone in the figure: on Flax's lm1b with its layers in a loop, under the
    model's device defaults, the line went from a miss straight to a plan with segments measured
    just over the budget, and the plans without segments between the two, which fit, were never
    asked for. The interval below the lowest figure is the floors' (`floor_plans`)."""
    for _ in range(REFINE_ROUNDS):
        best_figure, best = min(search.points, key=lambda p: p[1], default=(1.0, 1.0))
        if best * search.none_bytes - search.goal_bytes > REACH * search.none_bytes:
            return None
        below = max((f for f, _ in search.points if f < best_figure), default=None)
        above = min((f for f, _ in search.points if f > best_figure), default=1.0)
        if below is not None and best_figure - below >= WALL:
            lo, hi = below, best_figure
        elif above - best_figure >= WALL:
            lo, hi = best_figure, above
        else:
            return None
        # The calibrated line's target, kept within the middle third (safeguarded secant).
        plan = search.plan_at(min(max(search.target(), lo + (hi - lo) / 3), hi - (hi - lo) / 3))
        if (plan.decisions, plan.segments) in search.tried:
            return None
        measured = search.measured(plan)
        search.record(plan, measured)
        if measured <= search.goal_bytes:
            return plan
    return None


def _next_plan(search: Search) -> Plan | None:
    """The plan at the next target, or None where the search stops (see the module doc)."""
    target = _next_target(search)
    if target is None or target <= 0:  # bracketed, or a byte budget below the constants alone
        return None
    nxt = search.plan_at(target)
    return None if (nxt.decisions, nxt.segments) in search.tried else nxt


def _next_target(search: Search) -> float | None:
    """The next figure: on the calibrated line until a fit and a miss bracket it, then on the
    chord between them (the compiled fraction is neither linear nor monotone in the figure, so the
    bracket, not the line, has the last word; a wall bounds it from below). None once the bracket
    is too narrow to split."""
    fit_at, miss_at = search.fit_at, search.miss_at
    hi = miss_at[0] if miss_at else 1.0
    lo = max([fit_at[0]] if fit_at else [], default=0.0)
    lo = max([lo] + [w for w in search.walls if w < hi])
    if hi - lo < MIN_BRACKET:
        return None
    if search.last_wall:  # the line led into the wall: split what lies between it and the miss above
        return (lo + hi) / 2
    if fit_at and miss_at and fit_at[0] == lo and miss_at[1] > fit_at[1]:
        target = lo + (search.aim() - fit_at[1]) / (miss_at[1] - fit_at[1]) * (hi - lo)
    else:
        target = search.target()
    return target if lo < target < hi else (lo + hi) / 2


def floor_plans(traced: Traced, model: Model) -> list[Plan]:
    """The model's least-memory plan, then the coarser ones XLA may compile smaller (and on an
    unrolled chain the least-memory plan without segments); measured when no plan the search
    tried fits.

    On an unrolled chain also every layer recomputed whole (`presets.full`: each block one
    checkpoint keeping only its inputs, what `jax.checkpoint` on every layer does). The model's
    least-memory plans depend on its recompute prices: where several plans reach its floor it
    keeps the cheapest, and which values that leaves stored moves with the device constants,
    while XLA fuses a wholly recomputed layer into its backward and stores none of its values.
    Measured on Flax's lm1b with its layers in a loop under this CI VM's calibrated constants:
    every model plan and coarser layout compiled to 0.704 of no remat or more, every layer
    recomputed to 0.573 (`tests/test_jax_unrolled_outside.py`). So a refusal never names a
    budget above what checkpointing every layer measures."""
    out = [model.least_memory()]
    if not traced.scans and traced.graph.num_blocks >= 3:  # unrolled chains: `choose` plans segments
        out += _coarser(traced, model)
    elif any(scan_groups(len(info.blocks)) for info in traced.scans.values()):
        out += _regrouped(traced, model)
    if not traced.scans and traced.graph.num_blocks >= 2:
        out.append(_priced(presets.full(traced.graph), traced, model))
    return out


def _priced(plan: Plan, traced: Traced, model: Model) -> Plan:
    """A preset's plan with its recompute priced on the model's device, as the model's own plans
    are (`_fitting_floor` keeps the cheapest that fits)."""
    return plan.with_predictions(simulate(_plan_graph(traced, plan), plan, device=model.device or default_device()))


def _plan_graph(traced: Traced, plan: Plan | None) -> CostGraph:
    """The traced graph as `plan` runs it: regrouped into its segments, where it has any."""
    return traced.graph.regroup(plan.segments) if plan is not None and plan.segments else traced.graph


def _regrouped(traced: Traced, model: Model) -> list[Plan]:
    """Scans' counterpart of `_coarser`: the model's least-memory plan with g layers per loop step,
    for every group size g the scans take, then with one plan per layer. The cost model prices a
    group's recompute transient above the carries it drops, but XLA's scan keeps per-iteration
    buffers the model does not see (measured, 8 scanned MLP layers: 2 layers per step under one
    checkpoint 0.12 of no remat, one checkpoint per layer 0.26), so these are measured, not ranked."""
    sizes = sorted({g for info in traced.scans.values() for g in scan_groups(len(info.blocks))})
    return [model.least_memory(scan_group=g) for g in [*sizes, 1]]


def _coarser(traced: Traced, model: Model) -> list[Plan]:
    """Coarser segmentations, least memory first in the model: the DP's floor with segments up
    to the whole chain (it keeps the fewest boundaries the model knows of), then uniform
    √n-style segments around √n (what XLA compiles most faithfully: one full-recompute region
    per segment). Last, the floor with no segments at all: XLA may schedule an unrolled chain's
    segments worse than the per-layer plans the model puts above them (Flax's lm1b with its
    layers in a loop: `tests/test_jax_unrolled_outside.py`). At most five compiles."""
    n = traced.graph.num_blocks
    out = [model.least_memory(max_segment_blocks=n)]
    root = max(1, round(math.sqrt(n)))
    for k in dict.fromkeys((root, root - 1, root + 1)):
        if 2 <= k < n:
            out.append(_priced(presets.sqrt_n(traced.graph, k), traced, model))
    return [*out, model.least_memory(max_segment_blocks=1)]
