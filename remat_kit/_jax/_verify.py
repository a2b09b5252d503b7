"""Check a plan against what XLA compiles, and tighten it until the compiled step fits.

Why: the cost graph counts every residual JAX's VJP keeps, but XLA fuses cheap elementwise
work into the backward and never stores some of those residuals, so the compiled no-remat step
is smaller than the model's, and a plan that recomputes only cheap elementwise values may buy
nothing (measured: a plan predicted at 50% of no remat compiled to 72% on an unrolled MLP).
The budget contract is on real memory, so on the first call for each input signature `auto`
compiles the forward+backward with no remat and with the plan (`memory_analysis()
.temp_size_in_bytes`; SPMD-partitioned with the arguments' shardings, so one device's temp),
and while the measured fraction is over the budget re-plans against a proportionally smaller
model target (a few rounds). If none of those fits, it measures the model's least-memory plans:
the floor, on an unrolled chain coarser segmentations (segments up to the whole chain, then
√n-style uniform segments), on scanned layers the floor for each number of layers per loop step
(`_regrouped`), and keeps the cheapest that fits. If still none fits, `InfeasibleBudgetError`
names the smallest of those measured, in the user's unit: never a step over the budget. A budget
below the model's floor is not refused on the model's word alone: the floor plan and the coarser
ones are compiled, and the cheapest that fits is kept (the tiny zoo MLP: the model's floor is
0.205 of no remat, groups of layers compile to 0.127).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from remat_kit._core import presets
from remat_kit._core.budget import format_bytes, parse_budget, smallest_budget_text
from remat_kit._core.graph import Role
from remat_kit._core.plan import Plan
from remat_kit._core.simulate import simulate
from remat_kit._core.solve import InfeasibleBudgetError
from remat_kit._jax._apply import run_planned
from remat_kit._jax._graph import Traced
from remat_kit._jax._ir import Lit
from remat_kit._jax._planner import scan_groups
from remat_kit._jax._rules import Tracer, is_float, nbytes
from remat_kit._jax._sharding import divisor, input_shardings, spec

MAX_ROUNDS = 3
SHRINK = 0.97
_NONE_CACHE: dict = {}  # (layer, graph fingerprint, input specs) -> (no-remat temp bytes, constant bytes)


@dataclasses.dataclass(frozen=True)
class Measured:
    none_temp_bytes: int
    plan_temp_bytes: int

    @property
    def fraction(self) -> float:
        return self.plan_temp_bytes / self.none_temp_bytes if self.none_temp_bytes else 1.0


def vjp_step(traced: Traced, decisions: dict, *, segments: Sequence[Sequence[str]] = (), unroll: bool = False) -> Callable:
    """One forward+backward of the traced function under `decisions` (ones as output cotangents),
    differentiated, as a training step is, with respect to the parameters alone where it has
    any: an input's cotangent is one more buffer the user's `jax.grad(loss)` never makes (one
    batch-sized temp buffer more or less, 2.5% of no remat on a data-parallel MLP)."""
    wrt = [i for i, n in enumerate(traced.fn.invars) if traced.graph.values[traced.graph.index(f"arg{i}")].role is Role.PARAM]
    seeded = seeded_outputs(traced)

    def fwd(*vals):
        outs = run_planned(traced, decisions, vals, segments=segments, unroll_scans=unroll)
        return [o for o, s in zip(outs, seeded) if s], [o for o, s in zip(outs, seeded) if not s]

    def step(*vals):
        if not wrt:
            out, vjp, aux = jax.vjp(fwd, *vals, has_aux=True)
        else:
            def of_params(*params):
                full = list(vals)
                for i, v in zip(wrt, params):
                    full[i] = v
                return fwd(*full)

            out, vjp, aux = jax.vjp(of_params, *[vals[i] for i in wrt], has_aux=True)
        cts = [jnp.ones_like(o) if is_float(o) else np.zeros(o.shape, jax.dtypes.float0) for o in out]
        return vjp(cts), aux

    return step


def seeded_outputs(traced: Traced) -> list[bool]:
    """Which flat outputs a training step differentiates. A function returning (scalar, aux) is a
    loss with auxiliary outputs, differentiated as `jax.grad(f, has_aux=True)` does: the scalar
    alone (seeding haiku's batch-norm statistics too changed what XLA fused: a ResNet-shaped
    loss measured 0.69 of no remat here and 0.73 under the user's `jax.grad`, at budget 0.7).
    Anything else: every output."""
    outs = traced.fn.outvars
    children = jax.tree_util.treedef_children(traced.out_tree)
    if len(children) == 2 and children[0].num_leaves == 1 and outs:
        aval = outs[0].aval if isinstance(outs[0], Lit) else traced.fn.avals[outs[0]]
        if getattr(aval, "shape", None) == () and is_float(aval):
            return [True] + [False] * (len(outs) - 1)
    return [True] * len(outs)


def specs_of(vals: Sequence[Any], shardings: Sequence[Any] | None = None) -> list[Any]:
    """Abstract arguments for a measured compile; with `shardings` (`_sharding.input_shardings`)
    the compiled step is SPMD-partitioned and its temp is one device's."""
    shardings = input_shardings(vals) if shardings is None else shardings
    return [spec(x, s) for x, s in zip(vals, shardings)]


def temp_bytes(traced: Traced, decisions: dict, specs: Sequence[Any], *, segments: Sequence[Sequence[str]] = ()) -> int:
    compiled = jax.jit(vjp_step(traced, decisions, segments=segments)).lower(*specs).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def step_figures(traced: Traced, specs: Sequence[Any]) -> tuple[int, int]:
    """No remat's compiled temp, and the bytes one device holds of the parameters, their gradients
    and the inputs, as the SPMD-partitioned step lays them out: a gradient's layout is the
    partitioner's choice (FSDP parameters' gradients may come out whole), not its parameter's."""
    compiled = jax.jit(vjp_step(traced, {})).lower(*specs).compile()
    graph = traced.graph
    params = [i for i in range(len(specs)) if graph.values[graph.index(f"arg{i}")].role is Role.PARAM]
    held = sum(nbytes(s) // divisor(s.sharding, s.shape) for s in specs)
    for i, out in zip(params, jax.tree_util.tree_leaves(compiled.output_shardings)):
        if is_float(specs[i]):
            held += nbytes(specs[i]) // divisor(out, specs[i].shape)
    return int(compiled.memory_analysis().temp_size_in_bytes), held


def can_verify(traced: Traced) -> bool:
    """Consts that are tracers of an enclosing transformation cannot be compiled on their own."""
    return not any(isinstance(c, Tracer) for c in traced.fn.consts.values())


def verified(traced: Traced, plan: Plan, budget: object, replan: Callable[..., Plan], dyn_vals: Sequence[Any],
             *, layer: bool = False, below_floor: InfeasibleBudgetError | None = None,
             shardings: Sequence[Any] | None = None) -> Plan:
    """`plan`, or a tighter one, whose compiled memory fits the budget (see the module doc).

    `below_floor`: the budget is below the cost model's floor (this error) and `plan` is the
    model's least-memory plan. XLA often compiles less than the model predicts, so the floor and
    the coarser plans are measured; if none fits, the error names the measured figures and quotes
    `below_floor`. `shardings`: the arguments' (`_sharding.input_shardings`), for a per-device measure.

    For a whole model the measure is the step's temp memory. For one layer (`layer=True`) it is
    what one more call adds: temp of the layer chained three times minus twice, the steady
    state of a deep stack that a layer budget speaks of. `replan(fraction, max_segment_blocks=None,
    scan_group=None)` re-solves against a model target.
    """
    parsed = parse_budget(budget)
    specs = specs_of(dyn_vals, shardings)
    if layer:
        carry = _carry_position(traced)
        if carry is None or parsed.kind != "fraction":
            return plan  # not a residual-stream layer (or a per-call byte budget): the model alone decides

        def measure(p: Plan) -> int:
            decisions = p.as_dict()
            return chained_temp_bytes(traced, decisions, specs, carry, 3) - chained_temp_bytes(traced, decisions, specs, carry, 2)

        model_fraction = _kept_fraction(traced)
    else:
        def measure(p: Plan) -> int:
            return temp_bytes(traced, p.as_dict(), specs, segments=p.segments)

        def model_fraction(p: Plan) -> float:
            return p.activation_fraction
    key = (layer, traced.graph.fingerprint(), tuple((s.shape, str(s.dtype), s.sharding) for s in specs))
    if key not in _NONE_CACHE:  # several budgets on one model compile no remat once
        none_plan = Plan.from_decisions(traced.graph, {})
        sharded = not layer and any(s is not None for s in (shardings or ()))
        _NONE_CACHE[key] = step_figures(traced, specs) if sharded else (measure(none_plan), traced.graph.constant_bytes)
    none, constant_bytes = _NONE_CACHE[key]
    goal = parsed.value * none if parsed.kind == "fraction" else parsed.value - constant_bytes
    tried: dict[tuple, int] = {}  # (decisions, segments) -> measured temp bytes

    def measured_of(p: Plan) -> int:
        k = (p.decisions, p.segments)
        if k not in tried:
            tried[k] = measure(p)
        return tried[k]

    fitting: Plan | None = None  # least recompute among plans that fit
    lo, hi = 0.0, model_fraction(plan)  # model targets known to fit / known to miss
    current, tried_floor = plan, False
    for _ in range(MAX_ROUNDS):
        measured = measured_of(current)
        if measured <= goal:
            if fitting is None or current.predicted_recompute_seconds < fitting.predicted_recompute_seconds:
                fitting = current
            lo = max(lo, model_fraction(current))
            if current is plan or hi - lo < 0.02:
                break
            target = (lo + hi) / 2  # fits: try a little less recompute
        else:
            hi = min(hi, model_fraction(current))
            proportional = model_fraction(current) * goal / max(measured, 1) * SHRINK
            target = proportional if lo == 0.0 else (lo + hi) / 2
            if target <= 0:  # a byte budget below the parameters and inputs alone: nothing fits
                break
        try:
            nxt = replan(target)
        except InfeasibleBudgetError as e:  # below the model's floor: try the floor itself once
            if tried_floor:
                break
            tried_floor = True
            nxt = at_floor(replan, e)
        if (nxt.decisions, nxt.segments) == (current.decisions, current.segments):
            break
        current = nxt
    floors: list[int] = []  # measured least-memory plans: a budget at their smallest finds one again
    if fitting is None and not layer:
        for candidate in _floor_plans(traced, replan):
            measured = measured_of(candidate)
            floors.append(measured)
            if measured <= goal and (fitting is None or candidate.predicted_recompute_seconds < fitting.predicted_recompute_seconds):
                fitting = candidate
    if fitting is not None:
        return dataclasses.replace(fitting, budget=str(parsed))
    # No remat itself is a plan that fits its own figure: where every plan measures more (XLA's
    # own workspace dominates, as the max-pool gradient's index buffers do in haiku's small
    # ResNet), the smallest feasible budget is no remat's, never a number above 1.
    smallest = min(min(floors or tried.values()), none)
    raise _infeasible(budget, smallest, none, constant_bytes, len(tried), below_floor)


def _infeasible(budget: object, smallest: int, none: int, constant_bytes: int, num_tried: int,
                below_floor: InfeasibleBudgetError | None) -> InfeasibleBudgetError:
    """No plan's compiled step fits: the error names the least measured plan's figure in the
    user's unit (a byte budget is the whole step on one device: temp plus parameters, their
    gradients and the inputs)."""
    fraction = smallest / max(none, 1)
    smallest_bytes = smallest + constant_bytes
    need = smallest_budget_text(budget, fraction=fraction, num_bytes=smallest_bytes)
    model = f" The cost model alone said: {below_floor}" if below_floor is not None else ""
    least = (f"no plan of {num_tried} tried measures less than no remat's temp ({format_bytes(none)})" if smallest >= none else
             f"the least-memory plan of {num_tried} tried measures {fraction:.1%} of no remat's temp "
             f"({format_bytes(smallest)} of {format_bytes(none)})")
    return InfeasibleBudgetError(
        f"budget={budget!r} is below the smallest feasible budget {need} as compiled (per device): {least}; "
        f"parameters, their gradients and the inputs take {format_bytes(constant_bytes)} more. Raise it or pass "
        f"offload=True.{model}",
        smallest_fraction=fraction, smallest_bytes=smallest_bytes,
    )


def _floor_plans(traced: Traced, replan: Callable[..., Plan]) -> list[Plan]:
    """The model's least-memory plan, then the coarser ones XLA may compile smaller (see the
    module doc); measured when no plan the rounds tried fits."""
    floor = _least_memory(replan)
    out = [] if floor is None else [floor]
    if _segmentable(traced):
        out += _coarser(traced, replan)
    elif _groupable(traced):
        out += _regrouped(traced, replan)
    return out


def _segmentable(traced: Traced) -> bool:
    """Unrolled chains of 3+ blocks: where `choose` plans multi-block segments."""
    return not traced.scans and traced.graph.num_blocks >= 3


def _groupable(traced: Traced) -> bool:
    """A top-level scan whose length `choose` can split into groups of layers per loop step."""
    return any(scan_groups(len(info.blocks)) for info in traced.scans.values())


def _regrouped(traced: Traced, replan: Callable[..., Plan]) -> list[Plan]:
    """Scans' counterpart of `_coarser`: the model's least-memory plan with g layers per loop step,
    for every group size g the scans take, then with one plan per layer. The cost model prices a
    group's recompute transient above the carries it drops, but XLA's scan keeps per-iteration
    buffers the model does not see (measured, 8 scanned MLP layers: 2 layers per step under one
    checkpoint 0.12 of no remat, one checkpoint per layer 0.26), so these are measured, not ranked."""
    sizes = sorted({g for info in traced.scans.values() for g in scan_groups(len(info.blocks))})
    return [p for p in (_least_memory(replan, scan_group=g) for g in [*sizes, 1]) if p is not None]


def at_floor(replan: Callable[..., Plan], below: InfeasibleBudgetError, **knobs: int) -> Plan:
    """The model's least-memory plan under `knobs`: at the smallest budget `below` names (a hair
    above it, for the rounding of that figure)."""
    return replan(min(1.0, below.smallest_fraction * 1.0005), **knobs)


def _least_memory(replan: Callable[..., Plan], **knobs: int) -> Plan | None:
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
    """Coarser segmentations to try when the rounds found nothing that fits, least memory first
    in the model: the DP's floor with segments up to the whole chain (it keeps the fewest
    boundaries the model knows of), then uniform √n-style segments around √n (what XLA
    compiles most faithfully: one full-recompute region per segment). At most four compiles."""
    n = traced.graph.num_blocks
    floor = _least_memory(replan, max_segment_blocks=n)
    out: list[Plan] = [] if floor is None else [floor]
    root = max(1, round(math.sqrt(n)))
    for k in dict.fromkeys((root, root - 1, root + 1)):
        if 2 <= k < n:
            out.append(presets.sqrt_n(traced.graph, k))
    return out


def _carry_position(traced: Traced) -> int | None:
    """The input a layer's first output feeds in a stack: the last input of the same shape and dtype."""
    fn = traced.fn
    first = fn.outvars[0] if fn.outvars else None
    if first is None or isinstance(first, Lit):
        return None
    out = fn.avals[first]
    same = [i for i, v in enumerate(fn.invars) if fn.avals[v].shape == out.shape and fn.avals[v].dtype == out.dtype]
    return same[-1] if same and is_float(out) else None


def chained_temp_bytes(traced: Traced, decisions: dict, specs: Sequence[Any], carry: int, times: int) -> int:
    def chain(*vals):
        vals = list(vals)
        for _ in range(times):
            outs = run_planned(traced, decisions, vals)
            vals[carry] = outs[0]
        return outs

    def step(*vals):
        out, vjp = jax.vjp(chain, *vals)
        return vjp([jnp.ones_like(o) if is_float(o) else np.zeros(o.shape, jax.dtypes.float0) for o in out])

    return int(jax.jit(step).lower(*specs).compile().memory_analysis().temp_size_in_bytes)


def _kept_fraction(traced: Traced) -> Callable[[Plan], float]:
    """A one-layer plan's model figure: bytes kept for the backward over what no remat keeps."""
    graph = traced.graph
    none = sum(simulate(graph).kept_bytes_by_block) or 1
    return lambda p: sum(simulate(graph, p).kept_bytes_by_block) / none
