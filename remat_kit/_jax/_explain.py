"""`explain`: where a JAX step's activation memory is, what the plan does with it, and (with
`measure=True`) what XLA actually compiled.

Measured figures: `memory_analysis().temp_size_in_bytes` of the jitted forward+backward (on CPU
`peak_memory_in_bytes` leaves temporaries out), and `cost_analysis()["flops"]`. XLA counts a
while-loop body once, so FLOPs are read from a second compile with every planned scan unrolled
(the trip count applied by XLA itself), with `prevent_cse` on so the recompute is not merged away.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

from remat_kit._core.budget import format_bytes
from remat_kit._core.plan import Decision, Plan
from remat_kit._jax._api import Planner, _is_module_instance, _target_kind, planner_of
from remat_kit._jax._graph import Traced
from remat_kit._jax._measure import compiled_flops
from remat_kit._jax._verify import vjp_step

# A measured fraction this far above the prediction means the compiler did not follow the plan.
TOLERANCE = 0.05


@dataclasses.dataclass
class Explanation:
    plan: Plan
    rows: list[dict]  # one per (layer, op kind): residual_bytes, kept_bytes, recomputed_bytes, recompute_flops
    predicted_activation_bytes: int
    baseline_activation_bytes: int
    measured: dict[str, float] | None = None  # temp bytes and FLOPs, none vs plan
    budget_meaning: str = ""  # what the budget bounds: the whole step, or one call of a layer (`_api.budget_meaning`)

    @property
    def predicted_fraction(self) -> float:
        return (
            self.predicted_activation_bytes / self.baseline_activation_bytes if self.baseline_activation_bytes else 1.0
        )

    def __str__(self) -> str:
        lines = [f"{'layer':<36} {'kind':<12} {'no remat':>10} {'kept':>10} {'recomputed':>10} {'GFLOP':>8}"]
        for r in self.rows:
            lines.append(
                f"{r['layer']:<36.36} {r['kind']:<12} {format_bytes(r['residual_bytes']):>10} {format_bytes(r['kept_bytes']):>10} "
                f"{format_bytes(r['recomputed_bytes']):>10} {r['recompute_flops'] / 1e9:>8.3f}"
            )
        lines += _summary(self)
        return "\n".join(lines)


def _summary(e: Explanation) -> list[str]:
    out = [f"budget {e.plan.budget} bounds {e.budget_meaning}"] if e.budget_meaning else []
    out += [
        f"predicted activation memory: {format_bytes(e.predicted_activation_bytes)} = {e.predicted_fraction:.1%} of no remat "
        f"({format_bytes(e.baseline_activation_bytes)}); recompute {e.plan.predicted_recompute_flops / 1e9:.3f} GFLOP; {e.plan.summary()}"
    ]
    m = e.measured
    if m:
        out.append(
            f"measured temp memory: {format_bytes(m['plan_temp_bytes'])} = {m['temp_fraction']:.1%} of no remat "
            f"({format_bytes(m['none_temp_bytes'])}); FLOPs {m['plan_flops'] / 1e9:.3f} vs {m['none_flops'] / 1e9:.3f} GFLOP "
            f"(+{m['extra_flops_fraction']:.1%})"
        )
    return out


def explain(
    target: Any,
    *example_args: Any,
    measure: bool = False,
    budget: object = None,
    offload: bool = False,
    solver: str | None = None,
    print_table: bool = True,
    **example_kwargs: Any,
) -> Explanation:
    """Table per layer and op kind: bytes held, recompute FLOPs, the plan's decision, predicted
    activation memory against no remat; `measure=True` adds compiled memory and FLOPs.

    `target` is a function or module made by `remat_kit.auto` (its budget is used), or any JAX
    function / nnx Module instance / linen Module instance (pass `budget=` to plan it; without
    one the table shows where no remat keeps its memory). For a linen instance the first example
    argument is its variables.
    """
    f, args, planner = _resolve(target, example_args, budget, offload, solver)
    entry, dyn_vals = planner.prepare(f, args, example_kwargs)
    traced, plan = entry.traced, entry.plan
    result = Explanation(
        plan=plan,
        rows=_rows(traced, plan),
        predicted_activation_bytes=plan.predicted_activation_bytes,
        baseline_activation_bytes=plan.baseline_activation_bytes,
        budget_meaning=entry.budget_meaning,
    )
    if measure:
        result.measured = measure_plan(traced, entry.decisions, dyn_vals, segments=entry.segments)
        if result.measured["temp_fraction"] > max(result.predicted_fraction, _budget_fraction(plan)) + TOLERANCE:
            warnings.warn(
                f"remat_kit: the compiled step does not follow the plan: predicted {result.predicted_fraction:.1%} of no-remat "
                f"activation memory, measured {result.measured['temp_fraction']:.1%} "
                f"({format_bytes(result.measured['plan_temp_bytes'])} of {format_bytes(result.measured['none_temp_bytes'])} temp).",
                RuntimeWarning,
                stacklevel=2,
            )
    if print_table:
        _print(result)
    return result


def _budget_fraction(plan: Plan) -> float:
    try:
        return float(plan.budget)
    except ValueError:
        return 0.0


def _resolve(target: Any, args: tuple, budget: object, offload: bool, solver: str | None):
    found = planner_of(target)
    planner = (
        found[0]
        if found is not None and budget is None
        else Planner(1.0 if budget is None else budget, offload=offload, solver=solver)
    )
    kind = _target_kind(target)
    if kind == "nnx_instance":
        from flax import nnx

        original = found[1] if found is not None else type(target)
        graphdef, state = nnx.split(target)

        def pure(state, *a, **kw):
            module = nnx.merge(graphdef, state)
            return original.__call__(module, *a, **kw)

        return pure, (state, *args), planner
    if kind == "linen_instance":
        if not args:
            raise ValueError(
                f"remat_kit.explain({type(target).__name__}(...)): pass the variables first, then the call arguments."
            )
        return (lambda variables, *a, **kw: target.apply(variables, *a, **kw)), args, planner
    if _is_module_instance(target) or not callable(target):
        raise ValueError(f"remat_kit.explain(target={target!r:.80}): expected a function or a Flax module instance.")
    return (found[1] if found is not None else target), args, planner


def _rows(traced: Traced, plan: Plan) -> list[dict]:
    graph = traced.graph
    decisions = plan.as_dict()
    groups: dict[tuple[str, str], dict] = {}
    for i in graph.residuals():
        v = graph.values[i]
        key = (graph.block_names[v.block], v.kind.value)
        row = groups.setdefault(
            key, dict(layer=key[0], kind=key[1], residual_bytes=0, kept_bytes=0, recomputed_bytes=0, recompute_flops=0)
        )
        d = decisions.get(v.name, Decision.SAVE)
        row["residual_bytes"] += v.num_bytes
        if d is Decision.RECOMPUTE:
            row["recomputed_bytes"] += v.num_bytes
            row["recompute_flops"] += v.flops
        elif d is Decision.SAVE:
            row["kept_bytes"] += v.num_bytes
    return list(groups.values())


def measure_plan(traced: Traced, decisions: dict, dyn_vals: list, segments: tuple = ()) -> dict[str, float]:
    """Compiled temp memory and FLOPs of one forward+backward, no remat against the plan."""
    out: dict[str, float] = {}
    for label, dec in (("none", {}), ("plan", decisions)):
        step = _vjp_step(traced, dec, unroll=False, segments=segments if dec else ())
        out[f"{label}_temp_bytes"] = jax.jit(step).lower(*dyn_vals).compile().memory_analysis().temp_size_in_bytes
        flop_step = _vjp_step(traced, dec, unroll=True, segments=segments if dec else ()) if traced.scans else step
        out[f"{label}_flops"] = compiled_flops(jax.jit(flop_step).lower(*dyn_vals).compile())
    out["temp_fraction"] = out["plan_temp_bytes"] / out["none_temp_bytes"] if out["none_temp_bytes"] else 1.0
    out["extra_flops_fraction"] = out["plan_flops"] / out["none_flops"] - 1 if out["none_flops"] else 0.0
    return out


def _vjp_step(traced: Traced, decisions: dict, *, unroll: bool, segments: tuple = ()):
    return vjp_step(traced, decisions, segments=segments, unroll=unroll)


def _print(result: Explanation) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain text
        print(result)
        return
    table = Table(title="remat_kit plan", show_lines=False)
    for col, justify in (
        ("layer", "left"),
        ("kind", "left"),
        ("no remat", "right"),
        ("kept", "right"),
        ("recomputed", "right"),
        ("recompute GFLOP", "right"),
    ):
        table.add_column(col, justify=justify)
    for r in result.rows:
        table.add_row(
            r["layer"],
            r["kind"],
            format_bytes(r["residual_bytes"]),
            format_bytes(r["kept_bytes"]),
            format_bytes(r["recomputed_bytes"]),
            f"{r['recompute_flops'] / 1e9:.3f}",
        )
    console = Console()
    console.print(table)
    for line in _summary(result):
        console.print(line)
