"""Measure a JAX training step: FLOPs from XLA's cost analysis, including those of `auto`'s plan
with its scans unrolled (XLA counts a loop body once, whatever its trip count).

The JAX counterpart of `_torch/_measure.py`; `remat_kit.measure` is the public door to both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from remat_kit._core.graph import CostGraph
from remat_kit._core.plan import Plan
from remat_kit._jax._api import Planner, _is_array, planner_of
from remat_kit._jax._graph import Traced
from remat_kit._jax._plan import choose
from remat_kit._jax._run import run_planned


def compiled_flops(stage: Any) -> float:
    """FLOPs of a lowered or compiled stage (`jax.jit(f).lower(...)`, or `.compile()` of it)."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def auto_flops_unrolled(wrapped: Any, params: Any, batch: Any) -> float:
    """FLOPs of one `value_and_grad` step, gradients with respect to `params`, of the plan `auto`
    made for `wrapped(params, batch)`, its scans unrolled so every layer's recompute is counted."""
    found = planner_of(wrapped)
    if found is None:
        raise ValueError(f"auto_flops_unrolled(wrapped={wrapped!r:.80}): not made by remat_kit.auto.")
    planner, f = found
    entry, dyn_vals = planner.prepare(f, (params, batch), {})[:2]
    num_params = len(jax.tree.leaves(params))
    if len(dyn_vals) != num_params + len(jax.tree.leaves(batch)):
        raise ValueError(
            "auto_flops_unrolled: auto's traced inputs do not line up with (params, batch); "
            "pass the function auto wrapped, called as wrapped(params, batch)"
        )

    def loss(param_leaves: list, batch_leaves: list) -> jax.Array:
        return run_planned(
            entry.traced, entry.decisions, [*param_leaves, *batch_leaves], segments=entry.segments, unroll_scans=True
        )[0]

    return compiled_flops(jax.jit(jax.value_and_grad(loss)).lower(dyn_vals[:num_params], dyn_vals[num_params:]))


class TracedStep:
    """A JAX function traced as `auto` traces it, so plans can be compared on it on equal terms:
    its cost graph, the cost model's plan at a budget (no verifying compile) and the function run
    under any plan made for that graph (`remat_kit.measure.jax_trace`)."""

    def __init__(self, traced: Traced):
        self._traced = traced

    @property
    def graph(self) -> CostGraph:
        return self._traced.graph

    @property
    def scan_blocks(self) -> list[list[int]]:
        """Per scan over layers, the graph block of each of its iterations."""
        return [list(s.blocks) for s in self._traced.scans.values() if min(s.blocks, default=-1) >= 0]

    def plan(self, budget: object, *, solver: str | None = None, offload: bool = False) -> Plan:
        """The plan `auto` starts from under `budget`: the cost model's alone, before its compiles
        verify it (`auto` may go on to a smaller fraction that compiles under the budget)."""
        return choose(self._traced, budget, solver=solver, offload=offload)

    def run(self, plan: Plan, *, unroll: int = 1) -> Callable[..., Any]:
        """The traced function under `plan`, taking the arguments it was traced with; `unroll` > 1
        runs that many layers per loop step (XLA's cost analysis counts a loop body once)."""
        plan.check_graph(self.graph)
        decisions, segments = plan.as_dict(), plan.segments

        def run(*args: Any, **kwargs: Any) -> Any:
            flat = [x for x in jax.tree.leaves((args, kwargs)) if _is_array(x)]  # as `Planner.prepare` flattens
            return run_planned(
                self._traced, decisions, flat, segments=segments, unroll_scans=unroll if unroll > 1 else False
            )[0]

        return run


def trace_step(fn: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> TracedStep:
    """Trace ``fn(*args, **kwargs)`` (its first argument the parameters) as `auto` does."""
    entry = Planner(1.0, offload=False, solver=None, verify=False).prepare(fn, args, kwargs or {})[0]
    return TracedStep(entry.traced)
