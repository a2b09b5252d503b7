"""What the torch planner can reach: the least-memory plan, how many layers may share a region,
and the error for a budget below both."""

from __future__ import annotations

import torch

from remat_kit._core.budget import format_bytes
from remat_kit._core.graph import CostGraph, OpKind
from remat_kit._core.plan import Decision, Plan
from remat_kit._core.solve import InfeasibleBudgetError, segment_cap
from remat_kit._torch._graph import TorchGraph
from remat_kit._torch._trace import AUTOCAST_TAG


def uses_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def floor_plan(tg: TorchGraph) -> Plan:
    """Every checkpointable value recomputed; pinned values kept. Feasible by construction."""
    g = tg.graph
    names = [g.values[i].name for i in g.free_values if g.values[i].name not in tg.pinned]
    return Plan.from_decisions(g, dict.fromkeys(names, Decision.RECOMPUTE), solver="full")


def infeasible_error(
    module: torch.nn.Module,
    budget: object,
    tg: TorchGraph,
    offload: bool,
    least: int,
    grouped: bool,
    ungrouped_for_compile: bool = False,
) -> ValueError:
    """The error for a budget below `least` activation bytes, the least this planner reaches
    (with layers checkpointed together where that is smaller: `grouped`; without, because the
    model runs under torch.compile, where grouping would reach less: `ungrouped_for_compile`)."""
    held = autocast_cast_bytes(tg.graph)  # in both figures, as in solve_torch's limit
    baseline = tg.baseline_bytes + held
    least += held
    fraction = least / baseline if baseline else 1.0
    pinned = sum(tg.graph[n].num_bytes for n in tg.pinned if tg.graph.is_residual[tg.graph.index(n)])
    figures = dict(
        smallest_activation_bytes=least, baseline_activation_bytes=baseline, constant_bytes=tg.graph.constant_bytes
    )
    where = f" for {type(module).__name__} at this input"
    if len(tg.segments) == 1 and tg.segments[0].module is not None:
        return InfeasibleBudgetError.below(
            budget,
            **figures,
            where=where,
            why=f"{format_bytes(least)} of activations ({fraction:.1%} of no remat). remat_kit found no layers to "
            "checkpoint apart (no ModuleList / Sequential of layers, no submodules called once each in order), so "
            "the whole forward is one region, and its recompute runs at the start of its own backward, next to "
            "what that backward needs",
            remedies=[
                "hold the layers in an nn.ModuleList (or decorate the layer class: then the budget bounds "
                "what each call keeps)"
            ],
        )
    casts = f", and {format_bytes(held)} are autocast casts of the parameters (alive until the forward ends)"
    return InfeasibleBudgetError.below(
        budget,
        **figures,
        where=where,
        why=f"{format_bytes(least)} of activations ({fraction:.1%} of no remat) with every layer recomputed"
        f"{' (consecutive layers checkpointed together where that is smaller)' if grouped else ''}, "
        f"of which {format_bytes(pinned)} are saved outside the repeated layers (embeddings, head, loss) and "
        f"cannot be recomputed{casts if held else ''}",
        remedies=[
            *([] if offload else ["pass offload=True"]),
            "use a smaller batch",
            *(
                [
                    "run it eagerly, where consecutive layers that draw random numbers can share one checkpoint "
                    "region and reach less (under torch.compile such a region runs eagerly and would draw other "
                    "dropout masks than the compiled model)"
                ]
                if ungrouped_for_compile
                else []
            ),
        ],
    )


def autocast_cast_bytes(graph: CostGraph) -> int:
    """Bytes of autocast's casts of parameters in a profile made under autocast. The plan treats
    them as constants (the autocast cache decides when they are cast, not the plan), but they are
    memory of the step: every one is alive when the forward ends, with or without remat."""
    return sum(v.num_bytes for v in graph.values if v.name.startswith(AUTOCAST_TAG))


def segment_spans(
    module: torch.nn.Module, tg: TorchGraph, solver: str | None, compiling: bool = False
) -> tuple[int, frozenset[str]]:
    """(max layers per checkpoint region, blocks that join none) for the chain DP.

    Consecutive layers can share one checkpoint region (their boundaries recomputed) when nothing
    runs between them: no root code and no module hooks (FSDP's unshard) between layers. Under
    torch.compile (`compiling`) such a region runs eagerly, a graph break: layers that draw random
    numbers join none there, since eager dropout would draw other masks than compiled no remat.
    """
    layers = [s for s in tg.segments if s.module is not None]
    if (
        solver not in (None, "dp")
        or len(layers) < 3
        or uses_fsdp(module)
        or any(s.module is None and s.name.startswith("between") for s in tg.segments)
    ):
        return 1, frozenset()
    names = [s.name for s in tg.segments[: len(tg.graph.block_names)]]
    alone = {s.name for s in tg.segments if s.module is None and s.name in names}
    if compiling:
        graph = tg.graph
        alone |= {graph.block_names[v.block] for v in graph.values if v.kind is OpKind.RNG}
    return segment_cap(len(layers)), frozenset(alone)
