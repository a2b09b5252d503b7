"""Check a plan against what XLA compiles, and tighten it until the compiled step fits.

Why: the cost graph counts every residual JAX's VJP keeps, but XLA fuses cheap elementwise
work into the backward and never stores some of those residuals, so the compiled no-remat step
is not the model's, and a plan that recomputes only cheap elementwise values may buy nothing
(measured: a plan predicted at 50% of no remat compiled to 72% on an unrolled MLP). The budget
contract is on real memory, so on the first call for each input signature `auto` compiles the
forward+backward with no remat (once per program: kept in memory and in the on-disk plan cache,
`_plancache.py`) and with the plan (`memory_analysis().temp_size_in_bytes`; SPMD-partitioned
with the arguments' shardings, so one device's temp). `_fit.py` calibrates the model against
those compiles and asks it for the plan that lands just under the budget (a few rounds at most).
If none of those fits, it measures the model's least-memory plans: the floor, on an unrolled
chain coarser segmentations, on scanned layers the floor for each number of layers per loop step,
and keeps the cheapest that fits. If still none fits, a plan an earlier search of the same program
measured within this budget is the answer (each measured plan is remembered for the process),
else `InfeasibleBudgetError` names the smallest figure of every plan measured, in the user's
unit: never a step over the budget, and never a floor above a plan measured (a budget at the
named floor finds that plan again). A budget below the model's floor is not refused on the
model's word alone (the tiny zoo MLP: the model's floor is 0.205 of no remat, groups of layers
compile to 0.127).

The measuring compiles run on CPU with LLVM's optimisation off (`MEMORY_OPTIONS`): buffer
assignment, hence `temp_size_in_bytes`, is settled by XLA's HLO passes before code generation,
so the figure is the user's compile's to the byte at about half its cost (measured on the bench's
GPTs, the zoo and the test MLPs; `tests/test_jax_first_call.py` checks it). XLA:CPU's older
fusion code generator (`xla_cpu_use_fusion_emitters=False`) would cost a fifth, but it fuses
differently: the zoo's tiny MLP compiled 17% smaller than the user's step, a plan over budget.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from remat_kit._core.budget import format_bytes, parse_budget
from remat_kit._core.graph import Role
from remat_kit._core.plan import Plan
from remat_kit._core.simulate import baseline_activation_bytes, simulate
from remat_kit._core.solve import InfeasibleBudgetError
from remat_kit._jax import _plancache, _wholelayers
from remat_kit._jax._fit import Search, fit, floor_plans
from remat_kit._jax._graph import Traced
from remat_kit._jax._plan import Floor, Model
from remat_kit._jax._rules import Tracer, is_float, nbytes
from remat_kit._jax._run import run_planned
from remat_kit._jax._sharding import divisor, input_shardings, spec
from remat_kit._jax._trace import Lit

__all__ = ["can_verify", "verified"]

# (layer, graph fingerprint, input specs, jax flags) -> `none_figures`; and ("measured", that key)
# -> {(decisions, segments): (plan, measured bytes)} of every budget's search, in the same dict
# so that they live and are cleared together (a figure is only good beside its no remat's).
_NONE_CACHE: dict = {}
# Cheap code generation for measuring compiles on CPU (see the module doc); elsewhere the default.
MEMORY_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_for_memory(lowered: Any) -> Any:
    """`lowered` compiled for its memory figures alone (see the module doc)."""
    cpu = jax.devices()[0].platform == "cpu"
    return lowered.compile(compiler_options=MEMORY_OPTIONS if cpu else None)


def vjp_step(
    traced: Traced,
    decisions: dict,
    *,
    segments: Sequence[Sequence[str]] = (),
    unroll: bool = False,
    residual_bytes: list[int] | None = None,
) -> Callable:
    """One forward+backward of the traced function under `decisions` (ones as output cotangents),
    differentiated, as a training step is, with respect to the parameters alone where it has
    any: an input's cotangent is one more buffer the user's `jax.grad(loss)` never makes (one
    batch-sized temp buffer more or less, 2.5% of no remat on a data-parallel MLP).

    `residual_bytes`: the bytes of the residuals JAX's VJP keeps (its arguments aside) are
    appended to it when the step is traced; `_fit` calibrates the cost model's kept bytes by them."""
    wrt = [
        i
        for i, n in enumerate(traced.fn.invars)
        if traced.graph.values[traced.graph.index(f"arg{i}")].role is Role.PARAM
    ]
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
        if residual_bytes is not None:
            held = [x for x in jax.tree_util.tree_leaves(vjp) if hasattr(x, "shape") and hasattr(x, "dtype")]
            residual_bytes.append(sum(nbytes(x) for x in held if not any(x is v for v in vals)))
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
    compiled = compile_for_memory(jax.jit(vjp_step(traced, decisions, segments=segments)).lower(*specs))
    return int(compiled.memory_analysis().temp_size_in_bytes)


def step_figures(
    traced: Traced, specs: Sequence[Any], *, sharded: bool, meanwhile: Callable[[], Any] | None
) -> tuple[int, int, int | None]:
    """No remat's compiled temp, the bytes one device holds beside it, and its residual bytes.

    Beside it: for a sharded step the parameters, their gradients and the inputs as the SPMD
    partitioner lays them out (a gradient's layout is the partitioner's choice: FSDP parameters'
    gradients may come out whole, not as their parameter's), else the graph's constant bytes.
    Residuals: what JAX's VJP keeps, read while the step is traced for its lowering (no compile
    of its own); None for a sharded step, whose traced shapes are global, not one device's.

    The compile runs on a second thread while `meanwhile()` (the solve's budget-independent work)
    runs on this one: XLA releases the GIL while it compiles, so on two cores the two overlap, and
    on one they cost what they cost in turn. Lowering stays on this thread, under the caller's
    tracing contexts (mesh, device) that a new thread would not see."""
    residuals: list[int] = []
    lowered = jax.jit(vjp_step(traced, {}, residual_bytes=residuals)).lower(*specs)
    if meanwhile is None or usable_cpus() < 2:  # one core: nothing to overlap, the solve warms itself
        compiled = compile_for_memory(lowered)
    else:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="remat_kit-none") as pool:
            pending = pool.submit(compile_for_memory, lowered)
            meanwhile()
            compiled = pending.result()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    if not sharded:
        return temp, traced.graph.constant_bytes, residuals[0] if residuals else None
    graph = traced.graph
    params = [i for i in range(len(specs)) if graph.values[graph.index(f"arg{i}")].role is Role.PARAM]
    held = sum(nbytes(s) // divisor(s.sharding, s.shape) for s in specs)
    for i, out in zip(params, jax.tree_util.tree_leaves(compiled.output_shardings)):
        if is_float(specs[i]):
            held += nbytes(specs[i]) // divisor(out, specs[i].shape)
    return temp, held, None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS says, else the machine's)."""
    getter = getattr(os, "sched_getaffinity", None)
    return len(getter(0)) if getter else (os.cpu_count() or 1)


def can_verify(traced: Traced) -> bool:
    """Consts that are tracers of an enclosing transformation cannot be compiled on their own."""
    return not any(isinstance(c, Tracer) for c in traced.fn.consts.values())


def verified(
    traced: Traced,
    plan: Plan | None,
    budget: object,
    model: Model,
    dyn_vals: Sequence[Any],
    *,
    layer: bool = False,
    below_floor: Floor | None = None,
    shardings: Sequence[Any] | None = None,
    warm: Callable[[], Any] | None = None,
) -> Plan:
    """`plan`, or another, whose compiled memory fits the budget (see the module doc). `plan`
    None: a whole step under a fractional budget, planned at the calibrated target from the start.

    `below_floor`: the budget is below the cost model's floor (this one) and `plan` is the
    model's least-memory plan; if nothing measured fits, the error names the measured figures
    and quotes the model's floor. `shardings`: the arguments' (`_sharding.input_shardings`), for
    a per-device measure. For a whole model the measure is the step's temp memory; for one layer
    (`layer=True`) what one more call adds (`_measures`). `model` plans at a target
    (`_plan.Model`); `warm()` does its budget-independent work, overlapped with no remat's
    compile where that runs (`step_figures`).
    """
    parsed = parse_budget(budget)
    specs = specs_of(dyn_vals, shardings)
    found = _measures(traced, specs, parsed.kind, layer)
    if found is None:
        return plan  # not a residual-stream layer (or a per-call byte budget): the model alone decides
    measure, model_fraction = found
    sharded = not layer and any(s is not None for s in (shardings or ()))
    none, constant_bytes, none_residuals = none_figures(
        traced, specs, measure, layer=layer, sharded=sharded, meanwhile=warm
    )
    known = _NONE_CACHE.setdefault(("measured", *_program_key(traced, specs, layer)), {})
    goal = parsed.value * none if parsed.kind == "fraction" else parsed.value - constant_bytes
    # Without no remat's residuals, the model's no-remat bytes over the compiled ones: the
    # calibration's first slope (`_fit`).
    baseline = baseline_activation_bytes(traced.graph)
    slope = baseline / none if none_residuals is None and not layer and none and baseline else 1.0
    whole_layers = not layer and _wholelayers.applies(traced)  # searched where the model's plans miss
    search = Search(
        measure=measure,
        model_fraction=model_fraction,
        model=model,
        none_bytes=none,
        goal_bytes=goal,
        slope=slope,
        none_residual_bytes=none_residuals,
        budget_fraction=parsed.limit_activation_bytes(baseline, traced.graph.constant_bytes) / baseline
        if baseline
        else 1.0,
        known=known,
        leave_on_far_miss=whole_layers,
    )
    fitting = fit(search, plan)
    if fitting is None and whole_layers:
        # On an unrolled chain the model's plans may all miss where recomputing some layers
        # whole fits, in the band where the family has a plan there (`_wholelayers`).
        fitting = _wholelayers.fit(traced, search)
    if fitting is None and not layer:
        fitting = _fitting_floor(traced, search)
    if fitting is None:
        fitting = search.known_fit()
    if fitting is not None:
        return dataclasses.replace(fitting, budget=str(parsed))
    # No remat itself is a plan that fits its own figure: where every plan measures more (XLA's
    # own workspace dominates, as the max-pool gradient's index buffers do in haiku's small
    # ResNet), the smallest feasible budget is no remat's, never a number above 1. The least of
    # every plan measured (the search's, the floors', other budgets'): a budget there finds it again.
    smallest = min([b for _, b in known.values()] + [none])  # `known` holds this search's plans too
    raise _infeasible(budget, smallest, none, constant_bytes, len(search.tried), below_floor)


def _fitting_floor(traced: Traced, search: Search) -> Plan | None:
    """The cheapest of the model's least-memory plans (`_fit.floor_plans`) that compiles within
    the goal, or None."""
    fitting = None
    for candidate in floor_plans(traced, search.model):
        measured = search.measured(candidate)
        if measured <= search.goal_bytes and (
            fitting is None or candidate.predicted_recompute_seconds < fitting.predicted_recompute_seconds
        ):
            fitting = candidate
    return fitting


def _measures(traced: Traced, specs: Sequence[Any], kind: str, layer: bool):
    """(measure, model fraction) for a whole step, or for one layer of a residual stream: what
    one more call adds, temp of the layer chained three times minus twice, the steady state of a
    deep stack that a layer budget speaks of. None where there is nothing to measure."""
    if not layer:
        return (lambda p: temp_bytes(traced, p.as_dict(), specs, segments=p.segments)), (
            lambda p: p.activation_fraction
        )
    carry = _carry_position(traced)
    if carry is None or kind != "fraction":
        return None

    def measure(p: Plan) -> int:
        decisions = p.as_dict()
        return chained_temp_bytes(traced, decisions, specs, carry, 3) - chained_temp_bytes(
            traced, decisions, specs, carry, 2
        )

    return measure, _kept_fraction(traced)


def none_figures(
    traced: Traced,
    specs: Sequence[Any],
    measure: Callable[[Plan], int],
    *,
    layer: bool,
    sharded: bool,
    meanwhile: Callable[[], Any] | None = None,
) -> tuple[int, int]:
    """No remat's measure and the constant bytes beside it: compiled once per program, kept for
    the process and in the on-disk cache (several budgets, or a second run, compile it once)."""
    key = _program_key(traced, specs, layer)
    if key in _NONE_CACHE:
        return _NONE_CACHE[key]
    disk_key = _plancache.program_key(traced, specs, what="none", layer=layer)
    figures = _plancache.load_figures(disk_key)
    if figures is None:
        if layer:
            figures = (measure(Plan.from_decisions(traced.graph, {})), traced.graph.constant_bytes, None)
        else:
            figures = step_figures(traced, specs, sharded=sharded, meanwhile=meanwhile)
        _plancache.store_figures(disk_key, figures)
    _NONE_CACHE[key] = figures
    return figures


def _program_key(traced: Traced, specs: Sequence[Any], layer: bool) -> tuple:
    return (
        layer,
        traced.graph.fingerprint(),
        tuple((s.shape, str(s.dtype), s.sharding) for s in specs),
        _plancache.transform_flags(),  # the traced function's own checkpoints compile differently
    )


def _infeasible(
    budget: object,
    smallest: int,
    none: int,
    constant_bytes: int,
    num_tried: int,
    below_floor: Floor | None,
) -> InfeasibleBudgetError:
    """No plan's compiled step fits: the error names the least measured plan's figure in the
    user's unit (a byte budget is the whole step on one device: temp plus parameters, their
    gradients and the inputs)."""
    fraction = smallest / max(none, 1)
    least = (
        f"no plan of {num_tried} tried measures less than no remat's temp ({format_bytes(none)})"
        if smallest >= none
        else f"the least-memory plan of {num_tried} tried measures {fraction:.1%} of no remat's temp "
        f"({format_bytes(smallest)} of {format_bytes(none)})"
    )
    return InfeasibleBudgetError.below(
        budget,
        smallest_activation_bytes=smallest,
        baseline_activation_bytes=none,
        constant_bytes=constant_bytes,
        where=" as compiled (per device)",
        why=f"{least}; parameters, their gradients and the inputs take {format_bytes(constant_bytes)} more",
        remedies=["pass offload=True"],
        note=(
            f" The cost model alone puts the floor at {below_floor.fraction:.3f} of its no-remat activations "
            f"({format_bytes(below_floor.smallest)} of {format_bytes(below_floor.baseline)})."
            if below_floor is not None
            else ""
        ),
    )


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

    return int(compile_for_memory(jax.jit(step).lower(*specs)).memory_analysis().temp_size_in_bytes)


def _kept_fraction(traced: Traced) -> Callable[[Plan], float]:
    """A one-layer plan's model figure: bytes kept for the backward over what no remat keeps."""
    graph = traced.graph
    none = sum(simulate(graph).kept_bytes_by_block) or 1
    return lambda p: sum(simulate(graph, p).kept_bytes_by_block) / none
