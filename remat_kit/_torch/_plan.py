"""Plan one input signature of a module: profile it, build its graph, solve for the budget.

`compile_plan` is what `auto` (_api.py) calls once per input signature; `solve_torch` asks the
core's solver for the least-recompute plan that fits under what the replay can run (its
constraints, `_replay.constraints_for_torch`), and (`_layerplan.by_time`) weighs it against the
fastest plan of whole layers (_layerplan.py).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from remat_kit._core.budget import Budget, format_bytes, parse_budget
from remat_kit._core.graph import CostGraph
from remat_kit._core.percall import cheapest_within
from remat_kit._core.plan import DecisionCode, Plan
from remat_kit._core.simulate import simulate
from remat_kit._core.solve import (
    Costs,
    InfeasibleBudgetError,
    PlanConstraints,
    block_menus,
    smallest_activation_bytes,
    solve,
)
from remat_kit._torch._device import default_device, device_of
from remat_kit._torch._graph import TorchGraph, build_graph, candidate_layers, segment
from remat_kit._torch._layerplan import as_run, by_time, fast_regions
from remat_kit._torch._limits import autocast_cast_bytes, floor_plan, infeasible_error, segment_spans, uses_fsdp
from remat_kit._torch._replay import Region, constraints_for_torch
from remat_kit._torch._replicate import profile_replicated
from remat_kit._torch._trace import OwnCheckpointingError, Profile, profile


@dataclasses.dataclass
class Entry:
    """Everything planned for one input signature."""

    plan: Plan
    tg: TorchGraph
    profile: Profile
    regions: dict[str, Region]
    signature: tuple


def signature(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What a plan depends on besides the module: input shapes, dtypes, flags, autocast."""
    leaves, spec = tree_flatten((args, kwargs))
    sig: list[Any] = [str(spec), module.training]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("T", tuple(x.shape), x.dtype, x.device, x.requires_grad))
        elif x is None or isinstance(x, (bool, int, float, str)):
            sig.append(x)
        else:
            sig.append(type(x).__name__)
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            sig.append(("autocast", device_type, torch.get_autocast_dtype(device_type)))
    return tuple(sig)


def refuse_hf_checkpointing(module: torch.nn.Module) -> None:
    """Raise when Hugging Face's own gradient checkpointing is on in `module` (its layers'
    `gradient_checkpointing` flag): each such layer discards its activations and recomputes them
    itself, reentrant or not, so remat_kit could not price a plan of it (a floor named on such a
    Llama measured 0.974 of the model's step against 0.966 named)."""
    flagged = [
        n or type(module).__name__
        for n, m in module.named_modules()
        if getattr(m, "gradient_checkpointing", None) is True
    ]
    if flagged:
        shown = ", ".join(f"`{n}`" for n in flagged[:3]) + (f" and {len(flagged) - 3} more" if len(flagged) > 3 else "")
        raise OwnCheckpointingError(
            f"remat_kit.auto: {type(module).__name__} has Hugging Face gradient checkpointing on "
            f"(gradient_checkpointing=True in {shown}): its layers already discard and recompute their "
            "activations, and remat_kit plans that itself. Call model.gradient_checkpointing_disable() before "
            "training (with the Trainer: TrainingArguments(gradient_checkpointing=False)), or leave remat_kit.auto out."
        )


def _profile(module: torch.nn.Module, args: tuple, kwargs: dict, call: Any = None, mode: str = "replicate") -> Profile:
    """Profile under FakeTensorMode, the code before the layers on real tensors where it can (so
    masks and checks on values take the real step's path); `mode` "replicate" (from four layers
    of a long identical stack when it can, see _replicate.py), "fake" (every op) or "real" (real
    tensors)."""
    refuse_hf_checkpointing(module)
    layers = candidate_layers(module)
    if mode == "real" or uses_fsdp(module):
        # FSDP2's unshard/reshard hooks keep state across calls; a fake run leaves fake
        # unsharded parameters behind. Profile with real tensors (one forward's memory, once),
        # and no backward there (it would reduce-scatter gradients).
        return profile(
            module, args, kwargs, fake=False, call=call, layers=layers, measure_backward=not uses_fsdp(module)
        )
    if mode == "replicate":
        found = profile_replicated(module, args, kwargs, call=call, real_prologue=True)
        if found is not None:
            return found
    try:
        return profile(module, args, kwargs, fake=True, call=call, layers=layers, real_prologue=True)
    except OwnCheckpointingError:
        raise  # the model, not the fake run: a real one would stop there too
    except Exception as e:  # an op without a fake kernel: profile with real tensors instead
        warnings.warn(
            f"remat_kit: profiling {type(module).__name__} under FakeTensorMode failed ({type(e).__name__}: "
            f"{str(e)[:200]}); profiling with real tensors once instead (uses the memory of one forward).",
            stacklevel=3,
        )
        return profile(module, args, kwargs, fake=False, call=call, layers=layers)


# Measured against the simulator on 7 models x 7 budgets (tests/test_torch_memory_gap.py), the
# live-storage peak of a step is at most a few bytes above the prediction, now that replay
# placeholders share one buffer and regions hand back only what their own backward reads; the
# simulator errs on the high side elsewhere (layer-norm statistics, one gradient buffer per
# residual-add input). Plans still aim a little under the budget for what a CPU tracker cannot
# see on a GPU: allocator rounding, kernel workspaces.
SAFETY_MARGIN = 0.02


def solve_torch(
    module: torch.nn.Module,
    tg: TorchGraph,
    prof: Profile,
    budget: object,
    *,
    offload: bool,
    solver: str | None,
    per_call: bool = False,
    segments: bool = True,
) -> Plan:
    """The least-recompute plan that fits `budget` and that the replay modes run as it comes (the
    solver takes what they can run as constraints: `constraints_for_torch`).

    The budget bounds the step's activation peak, whatever layers were found; only for one
    decorated layer class (`per_call`) planned as one region does it bound the kept bytes. One
    solve, aimed a margin under the budget; where the margin leaves nothing, one more at the
    budget itself."""
    parsed = parse_budget(budget)
    graph = tg.graph
    if parsed.kind == "fraction" and parsed.value >= 1.0:
        return Plan.from_decisions(graph, {}, budget=str(parsed), solver="none")
    one_region = len(tg.segments) == 1 and tg.segments[0].module is not None
    constraints = constraints_for_torch(tg, prof)
    if one_region and per_call:
        return _solve_one_region(module, tg, parsed, budget, offload, constraints)
    limit, held, measure = _activation_limit(tg, parsed)
    margin = int(SAFETY_MARGIN * measure)
    # The margin is what the memory model may miss, so a plan predicted within it of the budget
    # is not one the budget can be promised with: every plan aims the margin under the budget,
    # and the floor an InfeasibleBudgetError names is the least reachable plus the margin (passed
    # back, it plans that least plan with the margin to spare). Before, the floor had none: on
    # HF MobileNetV2 the named floor measured 0.443 of no remat at 0.405 (reports/conformance.md).
    aim = limit - margin
    core = _configure(module, tg, solver, offload, constraints, aim, segments)
    plan = core.at(aim, parsed)
    if plan is None:
        ungrouped = not segments and segment_spans(module, tg, solver) != segment_spans(module, tg, solver, True)
        raise infeasible_error(
            module,
            budget,
            tg,
            offload,
            min(core.smallest() + margin, tg.baseline_bytes),  # no remat (1.0) is always feasible
            grouped=core.span > 1 or one_region,
            ungrouped_for_compile=ungrouped,
        )
    span_by_time = segment_spans(module, tg, None)[0] if segments else 1
    plan = by_time(module, tg, prof, plan, aim, parsed, span_by_time)
    # Its predictions then speak of what is measured: the casts in both figures; no remat's
    # figure is the one the budget was taken of (see TorchGraph.baseline_bytes).
    return dataclasses.replace(
        plan,
        predicted_activation_bytes=plan.predicted_activation_bytes + held,
        baseline_activation_bytes=tg.baseline_bytes + held,
    )


@dataclasses.dataclass(frozen=True)
class _CoreSolve:
    """The core's solver as configured for one torch graph: regions of up to `span` layers
    (`fixed_blocks` join none), the replay's constraints."""

    tg: TorchGraph
    solver: str | None
    offload: bool
    span: int
    fixed_blocks: frozenset[str]
    constraints: PlanConstraints
    device: Any

    def smallest(self) -> int:
        """The least activation bytes the solver reaches under the same constraints."""
        return smallest_activation_bytes(
            self.tg.solver_graph,
            offload=self.offload,
            device=self.device,  # the menus the solver reads: their options depend on the prices
            max_segment_blocks=self.span,
            fixed_blocks=self.fixed_blocks,
            constraints=self.constraints,
        )

    def at(self, aim: int, parsed: Budget) -> Plan | None:
        """The solver's plan within `aim` activation bytes, priced on the true graph (the solver's
        graph prices pinned values out of reach), or None where none fits."""
        graph = self.tg.graph
        try:
            found = solve(
                self.tg.solver_graph,
                Budget("bytes", float(graph.constant_bytes + aim)),
                solver=self.solver,
                offload=self.offload,
                max_segment_blocks=self.span,
                fixed_blocks=self.fixed_blocks,
                device=self.device,
                constraints=self.constraints,
            )
        except InfeasibleBudgetError:
            return None
        return Plan.from_decisions(
            found.graph_for(graph), found.as_dict(), budget=str(parsed), solver=found.solver, device=self.device
        )


def _configure(
    module: torch.nn.Module,
    tg: TorchGraph,
    solver: str | None,
    offload: bool,
    constraints: PlanConstraints,
    limit: int,
    segments: bool = True,
) -> _CoreSolve:
    """The solver for this graph and `limit`. `segments` False: planned under torch.compile
    (see `segment_spans`)."""
    span, fixed_blocks = 1, frozenset[str]()
    if limit < floor_plan(tg).predicted_activation_bytes:
        # Below what one checkpoint per layer reaches only regions over several layers can fit.
        # (Above it they are left out: their options cost seconds to measure on deep stacks and
        # rarely beat per-layer plans there.)
        span, fixed_blocks = segment_spans(module, tg, solver, compiling=not segments)
    return _CoreSolve(tg, solver, offload, span, fixed_blocks, constraints, default_device(module))


def _activation_limit(tg: TorchGraph, parsed: Budget) -> tuple[int, int, int]:
    """(the plan's activation limit, autocast's parameter casts held whatever the plan, no remat's
    activation bytes as the budget measures them)."""
    graph = tg.graph
    limit = parsed.limit_activation_bytes(tg.baseline_bytes, graph.constant_bytes)
    held = autocast_cast_bytes(graph)
    if parsed.kind == "fraction" and held:
        # The measured step holds autocast's parameter casts too, whatever the plan: the budget
        # is a fraction of no remat *with* them, so the plan's own share shrinks by their bytes.
        limit = math.floor(parsed.value * (tg.baseline_bytes + held)) - held
        return limit, held, tg.baseline_bytes + held
    return limit, held, tg.baseline_bytes


def _solve_one_region(
    module: torch.nn.Module,
    tg: TorchGraph,
    parsed: Budget,
    budget: object,
    offload: bool,
    constraints: PlanConstraints,
) -> Plan:
    """A module without repeated layers is one checkpoint region, planned op by op.

    Its recompute runs at the start of its own backward, so no plan lowers the peak of this
    module alone much below its no-remat peak; what remat changes is what the module *keeps*
    from its forward to its backward, and that is what adds up when such modules are stacked
    (a decorated layer class). So here the budget bounds the kept bytes: a fraction of what no
    remat keeps, or bytes per call. The menu's options honour the replay's constraints.
    """
    graph = tg.graph
    menu = block_menus(graph, Costs(graph, default_device(module)), offload, constraints)[0]
    keep_all = _keep_all_bytes(graph)
    option = cheapest_within(menu, parsed, keep_all)
    if option is not None:
        decisions = {graph.values[i].name: DecisionCode(c).decision for i, c in option.codes}
        return Plan.from_decisions(graph, decisions, budget=str(parsed), solver=f"one region: {option.label}")
    smallest = min(o.kept_bytes for o in menu)
    raise InfeasibleBudgetError.below(
        budget,
        smallest_activation_bytes=smallest,
        baseline_activation_bytes=keep_all,
        per_call=True,
        where=f" for {type(module).__name__}",
        why="it has no repeated layers, so it is one region and the budget bounds what it keeps for its backward "
        f"({format_bytes(keep_all)} with no remat, at least {format_bytes(smallest)} with full recompute)",
    )


def _keep_all_bytes(graph: CostGraph) -> int:
    """What a one-region module keeps for its backward with no remat."""
    return simulate(graph).kept_bytes_by_block[0]


def compile_plan(
    module: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    budget: object,
    *,
    offload: bool = False,
    solver: str | None = None,
    call: Any = None,
    mode: str = "replicate",
    per_call: bool = False,
    segments: bool = True,
) -> Entry:
    """Profile `module` on these inputs (through `call`, default the module itself) and plan it."""
    prof = _profile(module, args, kwargs, call, mode)
    tg = build_graph(prof, segment(module, prof, whole_model=not per_call))
    plan = solve_torch(module, tg, prof, budget, offload=offload, solver=solver, per_call=per_call, segments=segments)
    device = default_device(module)
    regs = fast_regions(module, tg, plan, prof, device)
    return Entry(as_run(plan, regs, device, device_of(module).type), tg, prof, regs, signature(module, args, kwargs))
