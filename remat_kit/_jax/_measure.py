"""Measure a JAX training step: FLOPs from XLA's cost analysis, including those of `auto`'s plan
with its scans unrolled (XLA counts a loop body once, whatever its trip count).

The JAX counterpart of `_torch/_measure.py`; `remat_kit.measure` is the public door to both.
"""

from __future__ import annotations

from typing import Any

import jax

from remat_kit._jax._api import planner_of
from remat_kit._jax._apply import run_planned


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
