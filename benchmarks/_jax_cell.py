"""Measure one JAX cell: compiled memory and FLOPs, step time, process RSS, gradients vs `none`.

Memory is XLA's own account of the compiled step (`memory_analysis`): `temp_size_in_bytes` is
activation memory (parameters are arguments, gradients outputs); `peak_bytes` adds arguments and
outputs. FLOPs are `cost_analysis()["flops"]`, which counts a `while` body once, so a scanned
model's FLOPs are counted on the same program with its scan unrolled, before XLA optimizes it
(`Lowered.cost_analysis()`: compiling the unrolled copy as well would double a cell's time;
on the tiny GPT the two counts differ by under 4%, and every cell of a model is counted alike).
"""

from __future__ import annotations

import math
from typing import Any

import jax

from benchmarks._cell import time_with_none
from benchmarks._cells import Cell
from benchmarks._measure import max_rel_err, reference_grads, rss_peak_bytes
from benchmarks.models.jax_zoo import NON_CORE_NAMES, JaxModel, Layout, build
from remat_kit import measure as rk_measure

_CP = jax.checkpoint_policies


def layout(strategy: str, num_layers: int) -> Layout:
    """The block layout a hand-written strategy runs with."""
    per_block = {
        "none": None,
        "all": "nothing",
        "attn_core": _CP.save_only_these_names(*NON_CORE_NAMES),
        "dots_saveable": _CP.dots_saveable,
        "dots_no_batch": _CP.dots_with_no_batch_dims_saveable,
    }
    if strategy in per_block:
        policy = per_block[strategy]
        return Layout(block_policy=lambda j: policy)
    if strategy == "every_2":
        return Layout(group=2, block_policy=lambda j: "nothing" if j == 0 else None)
    if strategy == "sqrt_n":
        return Layout(group=segment_size(num_layers), group_policy="nothing")
    raise ValueError(
        f"strategy={strategy!r} has no JAX layout; JAX runs none, all, attn_core, every_2, sqrt_n, "
        "dots_saveable, dots_no_batch and auto."
    )


def segment_size(num_layers: int) -> int:
    """Blocks per segment for ~sqrt(n) segments (a divisor of n, so a scan can group them)."""
    target = math.sqrt(num_layers)
    return min((d for d in range(1, num_layers + 1) if num_layers % d == 0), key=lambda d: (abs(d - target), d))


def _loss_fns(model: JaxModel, cell: Cell, solver: str | None = None) -> tuple[Any, Any, Any]:
    """(loss to run, loss to count FLOPs on (None: count auto's plan unrolled), auto-wrapped function or None)."""
    if cell.strategy == "auto":
        import remat_kit as rk

        run = rk.auto(model.loss(), budget=cell.budget, solver=solver)
        return run, (None if model.scanned else run), run
    lay = layout(cell.strategy, model.num_layers)
    run = model.loss(lay)
    count = (
        model.loss(Layout(lay.group, lay.block_policy, lay.group_policy, unroll_scan=True)) if model.scanned else run
    )
    return run, count, None


def _auto_flops_unrolled(wrapped: Any, params: Any, batch: Any) -> float:
    """FLOPs of auto's own plan with its scans unrolled (XLA's cost analysis counts a scan body once)."""
    return rk_measure.jax_auto_flops_unrolled(wrapped, params, batch)


def _flops(stage: Any) -> float:
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _predicted(wrapped: Any) -> int | None:
    """auto's predicted activation bytes, from the plan it cached for this input signature."""
    if wrapped is None:
        return None
    import remat_kit as rk

    plans = rk.plan_of(wrapped)
    return int(plans[-1].predicted_activation_bytes) if plans else None


def run(
    cell: Cell, *, steps: int, warmup: int, grad_tol: float, ref_path: str | None = None, solver: str | None = None
) -> dict[str, Any]:
    model = build(cell.model, cell.size)
    params, batch = model.params, model.batch
    loss, count_loss, wrapped = _loss_fns(model, cell, solver)
    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params, batch).compile()
    mem = compiled.memory_analysis()
    if count_loss is loss:
        flops, flops_source = _flops(compiled), "compiled"
    elif count_loss is None:  # auto on a scanned model
        flops, flops_source = _auto_flops_unrolled(wrapped, params, batch), "lowered, scan unrolled"
    else:
        flops, flops_source = (
            _flops(jax.jit(jax.value_and_grad(count_loss)).lower(params, batch)),
            "lowered, scan unrolled",
        )

    def one_step() -> None:
        jax.block_until_ready(compiled(params, batch))

    none_step = None
    if cell.strategy != "none":  # no remat compiled in this process: the time ratio's base
        none_compiled = jax.jit(jax.value_and_grad(model.loss())).lower(params, batch).compile()

        def none_step() -> None:
            jax.block_until_ready(none_compiled(params, batch))

    times = time_with_none(one_step, none_step, steps=steps, warmup=warmup)
    rss = rss_peak_bytes(one_step)
    value, grads = compiled(params, batch)

    def reference() -> tuple[float, list]:
        if cell.strategy == "none":
            return float(value), jax.tree.leaves(grads)
        ref_value, ref_grads = jax.jit(jax.value_and_grad(model.loss()))(params, batch)
        return float(ref_value), jax.tree.leaves(ref_grads)

    err = max_rel_err(float(value), jax.tree.leaves(grads), *reference_grads(ref_path, reference))
    device = jax.devices()[0]
    row = {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "activation_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        ),
        "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params))),
        "flops": flops,
        "flops_source": flops_source,
        "predicted_activation_bytes": _predicted(wrapped),
        "rss_peak_bytes": rss,
        "grad_max_rel_err": err,
        "grad_ok": bool(err <= grad_tol),
        **times,
    }
    if device.platform == "gpu":
        stats = device.memory_stats() or {}
        row["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return row
