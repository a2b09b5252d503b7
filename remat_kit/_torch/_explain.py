"""`explain(model, *example_inputs, measure=False)`: what the plan keeps, recomputes and costs.

Prints a per-block table (bytes kept from forward to backward, recompute FLOPs, what the plan
does with the block) and a per-op table for the block that recomputes most, with predicted
activation memory against no remat; `measure=True` runs one training step each way and puts the
measured figures (live-storage tracker, FlopCounterMode) beside the predictions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from remat_kit._core.budget import budget_meaning, format_bytes
from remat_kit._core.plan import DecisionCode
from remat_kit._core.simulate import decision_codes, needed_and_recomputed, simulate
from remat_kit._torch._api import auto, state_of, unwrap
from remat_kit._torch._measure import StepMeasurement, measure_step
from remat_kit._torch._plan import Entry, compile_plan, signature
from remat_kit._torch._replay import _units
from remat_kit._torch._run import install_blocks


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `explain` printed, as data."""

    compiled: Entry = dataclasses.field(repr=False)  # the whole op table: too long to print
    planning_seconds: float
    block_rows: tuple[dict[str, Any], ...]
    op_rows: tuple[dict[str, Any], ...]
    measured_none: StepMeasurement | None = None
    measured_plan: StepMeasurement | None = None
    budget_meaning: str = ""  # what the budget bounds: the whole step, or one call of a decorated layer class

    @property
    def plan(self):
        return self.compiled.plan


def _rows(compiled: Entry) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    plan = compiled.plan
    graph = plan.graph_for(compiled.tg.graph)  # one block per checkpoint region (several layers in a segment)
    codes = decision_codes(graph, plan)
    needed, recomputed = needed_and_recomputed(graph, codes)
    sim = simulate(graph, plan)
    base = simulate(graph)
    blocks = []
    for b, seg, segs in _units(compiled.tg, plan):
        members = graph.block_members[b]
        rec = [i for i in members if recomputed[i]]
        kept = sim.kept_bytes_by_block[b]
        if seg.module is None:
            what = "pinned (outside layers)"
        elif len(segs) > 1:
            what = f"one region over {len(segs)} layers, recomputed"
        elif not rec and not any(needed[i] and codes[i] == DecisionCode.OFFLOAD for i in members):
            what = "keep all"
        elif all(recomputed[i] or not needed[i] or graph.is_forced[i] for i in members):
            what = "full recompute"
        else:
            what = f"selective ({len(rec)} ops)"
        blocks.append(
            dict(
                block=seg.name,
                ops=seg.stop - seg.start,
                no_remat_bytes=base.kept_bytes_by_block[b],
                kept_bytes=kept,
                recompute_flops=sum(graph.values[i].flops for i in rec),
                plan=what,
            )
        )
    # The block that recomputes most (first of equals) gets an op-by-op table.
    busiest = max(range(len(blocks)), key=lambda b: (blocks[b]["recompute_flops"], -b), default=None)
    ops = []
    if busiest is not None:
        for i in graph.block_members[busiest]:
            v = graph.values[i]
            if recomputed[i]:
                decision = "recompute"
            elif needed[i] and codes[i] == DecisionCode.OFFLOAD:
                decision = "offload"
            elif graph.is_residual[i] or graph.is_forced[i]:
                decision = "save"
            else:
                decision = "-"  # nobody's backward reads it: freed after its last forward use
            ops.append(dict(value=v.name, kind=v.kind.value, bytes=v.num_bytes, flops=v.flops, decision=decision))
    return blocks, ops


def explain(
    model: torch.nn.Module,
    *example_inputs: Any,
    measure: bool = False,
    budget: object = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    solver: str | None = None,
    offload: bool | None = None,
    print_table: bool = True,
    **forward_kwargs: Any,
) -> Explanation:
    """Plan `model` on these example inputs (with its `auto` budget, or `budget=`) and print the plan.

    `measure=True` also runs one forward + backward without and with the plan and prints measured
    activation memory and FLOPs beside the predictions. Extra keyword arguments go to the forward.
    """
    _check_call(model, example_inputs, forward_kwargs)
    state = state_of(model)
    budget, offload, solver, per_call = _settings(state, budget, offload, solver)
    args, kwargs = tuple(example_inputs), dict(forward_kwargs)
    was_training = model.training
    model.train()
    try:
        key = signature(model, args, kwargs)
        start = time.perf_counter()
        compiled = state.plans.get(key) if state is not None and budget == state.budget else None
        if compiled is None:
            call = _original_forward(model)
            compiled = compile_plan(
                model, args, kwargs, budget, offload=offload, solver=solver, call=call, per_call=per_call
            )
        seconds = time.perf_counter() - start
        blocks, ops = _rows(compiled)
        measured_none = measured_plan = None
        if measure:
            measured_none, measured_plan = _measure(model, compiled, args, kwargs, loss_fn)
    finally:
        model.train(was_training)
    one_region = len(compiled.tg.segments) == 1 and compiled.tg.segments[0].module is not None
    result = Explanation(
        compiled,
        seconds,
        tuple(blocks),
        tuple(ops),
        measured_none,
        measured_plan,
        budget_meaning=budget_meaning(per_call and one_region),
    )
    if print_table:
        _print(model, result)
    return result


def _check_call(model: Any, example_inputs: tuple, forward_kwargs: dict) -> None:
    if not isinstance(model, torch.nn.Module) or isinstance(model, type):
        raise ValueError(f"explain(model={model!r:.80}): pass a torch.nn.Module instance and example inputs.")
    if not example_inputs and not forward_kwargs:
        raise ValueError(
            f"explain({type(model).__name__}): pass example inputs, e.g. explain(model, input_ids); the plan depends "
            "on their shapes."
        )


def _settings(
    state: Any, budget: object, offload: bool | None, solver: str | None
) -> tuple[object, bool, str | None, bool]:
    """budget, offload, solver and per_call: those given, else the model's `auto` settings."""
    if budget is None:
        budget = state.budget if state is not None else 1.0
    offload = (state.offload if state is not None else False) if offload is None else offload
    solver = solver if solver is not None else (state.solver if state is not None else None)
    return budget, offload, solver, state.per_call if state is not None else False


def _original_forward(model: torch.nn.Module) -> Any:
    state = state_of(model)
    if state is None:
        return None
    return state.original_forward or type(model).forward.__get__(model)


def _measure(model: torch.nn.Module, compiled: Entry, args: tuple, kwargs: dict, loss_fn: Any):
    """Measure no remat, then the plan, on the same module; leave `auto` as it was."""
    old = state_of(model)
    if old is not None:
        unwrap(model)
    try:
        torch.manual_seed(0)
        none = measure_step(model, args, kwargs, loss_fn)
        auto(model, 1.0)  # a carrier for the plan: the signature is answered from the table below
        probe = state_of(model)
        probe.plans[signature(model, args, kwargs)] = compiled
        install_blocks(model, probe, compiled)
        try:
            torch.manual_seed(0)
            planned = measure_step(model, args, kwargs, loss_fn)
        finally:
            unwrap(model)
    finally:
        if old is not None:
            auto(model, old.budget, offload=old.offload, solver=old.solver)
            state = state_of(model)
            for key, plan in old.plans.items():
                state.plans[key] = plan
                install_blocks(model, state, plan)
    return none, planned


_BLOCK_COLS = ("block", "ops", "no_remat_bytes", "kept_bytes", "recompute_flops", "plan")
_OP_COLS = ("value", "kind", "bytes", "flops", "decision")


def _print(model: torch.nn.Module, ex: Explanation) -> None:
    plan = ex.plan
    title = (
        f"remat_kit plan for {type(model).__name__}: budget {plan.budget or '-'}, solver {plan.solver}, "
        f"planned in {ex.planning_seconds:.2f} s"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain text keeps explain usable everywhere
        _print_plain(title, _summary(ex), ex)
    else:
        _print_rich(title, _summary(ex), ex, Console, Table)


def _summary(ex: Explanation) -> list[str]:
    plan = ex.plan
    summary = [
        f"budget {plan.budget or '-'} bounds {ex.budget_meaning}",
        f"activation memory, predicted: {format_bytes(plan.predicted_activation_bytes)} = "
        f"{plan.activation_fraction:.1%} of no remat ({format_bytes(plan.baseline_activation_bytes)})",
        f"recompute: {plan.predicted_recompute_flops / 1e9:.4f} GFLOP in {plan.num_recomputed_ops} ops, "
        f"predicted {plan.predicted_recompute_seconds * 1e3:.3f} ms on this device",
    ]
    if plan.predicted_extra_step_seconds:  # the replay modes' forward too, where the plan prices it
        summary.append(
            f"extra step time, predicted: {plan.predicted_extra_step_seconds * 1e3:.3f} ms "
            "(recompute, checkpoint regions and the selective regions' forward)"
        )
    if ex.measured_none is not None and ex.measured_plan is not None:
        n, p = ex.measured_none, ex.measured_plan
        summary.append(
            f"activation memory, measured: {format_bytes(p.activation_bytes)} = "
            f"{p.activation_bytes / max(1, n.activation_bytes):.1%} of no remat ({format_bytes(n.activation_bytes)})"
        )
        summary.append(f"recompute FLOPs, measured: {(p.flops - n.flops) / 1e9:.4f} GFLOP")
    return summary


def _cell(key: str, val: Any) -> str:
    if key.endswith("bytes"):
        return format_bytes(val)
    return f"{val:,}" if isinstance(val, int) else str(val)


def _print_plain(title: str, summary: list[str], ex: Explanation) -> None:
    print(title)
    print("\n".join(summary))
    for cols, rows in ((_BLOCK_COLS, ex.block_rows), (_OP_COLS, ex.op_rows)):
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(_cell(c, r[c]) for c in cols))


def _print_rich(title: str, summary: list[str], ex: Explanation, Console: Any, Table: Any) -> None:
    console = Console()
    console.print(f"[bold]{title}[/bold]")
    for line in summary:
        console.print(line)
    for label, cols, rows in (
        ("blocks", _BLOCK_COLS, ex.block_rows),
        ("ops of the block that recomputes most", _OP_COLS, ex.op_rows),
    ):
        table = Table(title=label)
        for c in cols:
            table.add_column(
                c.replace("_", " "), justify="left" if c in ("block", "value", "kind", "plan", "decision") else "right"
            )
        for r in rows:
            table.add_row(*(_cell(c, r[c]) for c in cols))
        console.print(table)
