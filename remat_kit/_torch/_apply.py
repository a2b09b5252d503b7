"""`auto` and `unwrap` for torch nn.Module: plan per input signature, apply per repeated layer.

`auto(model, budget)` replaces `model.forward` (an instance attribute, so `state_dict` keys and
parameter identity do not change) with a wrapper that, on a training call (grad enabled,
`model.training`), profiles the forward once per input signature, solves for the budget and
runs each planned layer as a non-reentrant checkpoint driven by the plan's op table
(_replay.py). Under `torch.no_grad()` or `model.eval()` the original forward runs untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from remat_kit._core.budget import Budget, format_bytes, parse_budget
from remat_kit._core.graph import CostGraph
from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import simulate
from remat_kit._core.solve import (
    Costs,
    InfeasibleBudgetError,
    block_menus,
    segment_cap,
    smallest_activation_bytes,
    solve,
)
from remat_kit._torch._device import default_device, device_of
from remat_kit._torch._graph import TorchGraph, build_graph, candidate_layers, segment
from remat_kit._torch._layerplan import (
    as_run,
    cheapest_layer_seconds,
    fastest_whole_layer_plan,
    mode_op_seconds,
    plain_when_faster,
    predicted_seconds,
)
from remat_kit._torch._profile import AUTOCAST_TAG, Profile, profile, user_tools_paused
from remat_kit._torch._replay import OpSequenceError, Region, SegmentRun, decisions_for_torch, regions, run_region
from remat_kit._torch._replicate import profile_replicated

_STATE = "_remat_kit_state"
_CLASS = "_remat_kit_class"


@dataclasses.dataclass
class Compiled:
    """Everything planned for one input signature."""

    plan: Plan
    tg: TorchGraph
    profile: Profile
    regions: dict[str, Region]
    signature: tuple


@dataclasses.dataclass
class _State:
    budget: object
    offload: bool
    solver: str | None
    original_forward: Any  # the instance attribute `forward` had before (None: the class's)
    plans: dict[tuple, Compiled] = dataclasses.field(default_factory=dict)
    active: Compiled | None = None
    profiling: bool = False
    restore_use_cache: list[Any] = dataclasses.field(default_factory=list)  # configs whose use_cache auto turned off
    wrapped_blocks: dict[str, tuple[torch.nn.Module, Any]] = dataclasses.field(default_factory=dict)
    segment: SegmentRun | None = None  # the multi-layer checkpoint region the forward is inside
    per_call: bool = False  # an instance of a decorated layer class: see _solve_one_region


# -- planning ---------------------------------------------------------------------------------
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


def _profile(module: torch.nn.Module, args: tuple, kwargs: dict, call: Any = None, mode: str = "replicate") -> Profile:
    """Profile under FakeTensorMode, the code before the layers on real tensors where it can (so
    masks and checks on values take the real step's path); `mode` "replicate" (from four layers
    of a long identical stack when it can, see _replicate.py), "fake" (every op) or "real" (real
    tensors)."""
    layers = candidate_layers(module)
    if mode == "real" or _uses_fsdp(module):
        # FSDP2's unshard/reshard hooks keep state across calls; a fake run leaves fake
        # unsharded parameters behind. Profile with real tensors (one forward's memory, once),
        # and no backward there (it would reduce-scatter gradients).
        return profile(
            module, args, kwargs, fake=False, call=call, layers=layers, measure_backward=not _uses_fsdp(module)
        )
    if mode == "replicate":
        found = profile_replicated(module, args, kwargs, call=call, real_prologue=True)
        if found is not None:
            return found
    try:
        return profile(module, args, kwargs, fake=True, call=call, layers=layers, real_prologue=True)
    except Exception as e:  # an op without a fake kernel: profile with real tensors instead
        warnings.warn(
            f"remat_kit: profiling {type(module).__name__} under FakeTensorMode failed ({type(e).__name__}: "
            f"{str(e)[:200]}); profiling with real tensors once instead (uses the memory of one forward).",
            stacklevel=3,
        )
        return profile(module, args, kwargs, fake=False, call=call, layers=layers)


def _uses_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _floor(tg: TorchGraph) -> Plan:
    """Every checkpointable value recomputed; pinned values kept. Feasible by construction."""
    g = tg.graph
    names = [g.values[i].name for i in g.free_values if g.values[i].name not in tg.pinned]
    return Plan.from_decisions(g, dict.fromkeys(names, Decision.RECOMPUTE), solver="full")


def _infeasible(
    module: torch.nn.Module, budget: object, tg: TorchGraph, offload: bool, least: int, grouped: bool
) -> ValueError:
    """The error for a budget below `least` activation bytes, the least this planner reaches
    (with layers checkpointed together where that is smaller: `grouped`)."""
    held = autocast_cast_bytes(tg.graph)  # in both figures, as in solve_torch's limit
    baseline = tg.baseline_bytes + held
    least += held
    fraction = least / baseline if baseline else 1.0
    pinned = sum(tg.graph[n].num_bytes for n in tg.pinned if tg.graph.is_residual[tg.graph.index(n)])
    need = math.ceil(fraction * 1000) / 1000
    if len(tg.segments) == 1 and tg.segments[0].module is not None:
        return InfeasibleBudgetError(
            f"budget={budget!r} is below the smallest feasible budget {need:g} for {type(module).__name__} at this "
            f"input: {format_bytes(least)} of activations ({fraction:.1%} of no remat). remat_kit found no layers to "
            "checkpoint apart (no ModuleList / Sequential of layers, no submodules called once each in order), so "
            "the whole forward is one region, and its recompute runs at the start of its own backward, next to "
            f"what that backward needs. Raise the budget to at least {need:g}, or hold the layers in an "
            "nn.ModuleList (or decorate the layer class: then the budget bounds what each call keeps).",
            smallest_fraction=fraction,
            smallest_bytes=least + tg.graph.constant_bytes,
        )
    return InfeasibleBudgetError(
        f"budget={budget!r} is below the smallest feasible budget {need:g} for {type(module).__name__} at this "
        f"input: {format_bytes(least)} of activations ({fraction:.1%} of no remat) with every layer recomputed"
        f"{' (consecutive layers checkpointed together where that is smaller)' if grouped else ''}, "
        f"of which {format_bytes(pinned)} are saved outside the repeated layers (embeddings, head, loss) and "
        f"cannot be recomputed"
        f"{f', and {format_bytes(held)} are autocast casts of the parameters (alive until the forward ends)' if held else ''}"
        f". Raise the budget to at least {need:g}{'' if offload else ' or pass offload=True'}, "
        "or use a smaller batch.",
        smallest_fraction=fraction,
        smallest_bytes=least + tg.graph.constant_bytes,
    )


def autocast_cast_bytes(graph: CostGraph) -> int:
    """Bytes of autocast's casts of parameters in a profile made under autocast. The plan treats
    them as constants (the autocast cache decides when they are cast, not the plan), but they are
    memory of the step: every one is alive when the forward ends, with or without remat."""
    return sum(v.num_bytes for v in graph.values if v.name.startswith(AUTOCAST_TAG))


def _segment_spans(module: torch.nn.Module, tg: TorchGraph, solver: str | None) -> tuple[int, frozenset[str]]:
    """(max layers per checkpoint region, blocks that join none) for the chain DP.

    Consecutive layers can share one checkpoint region (their boundaries recomputed) when nothing
    runs between them: no root code and no module hooks (FSDP's unshard) between layers.
    """
    layers = [s for s in tg.segments if s.module is not None]
    if (
        solver not in (None, "dp")
        or len(layers) < 3
        or _uses_fsdp(module)
        or any(s.module is None and s.name.startswith("between") for s in tg.segments)
    ):
        return 1, frozenset()
    names = [s.name for s in tg.segments[: len(tg.graph.block_names)]]
    return segment_cap(len(layers)), frozenset(s.name for s in tg.segments if s.module is None and s.name in names)


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
) -> Plan:
    """The least-recompute plan that fits `budget` and that the replay modes run exactly.

    The budget bounds the step's activation peak, whatever layers were found; only for one
    decorated layer class (`per_call`) planned as one region does it bound the kept bytes."""
    parsed = parse_budget(budget)
    graph = tg.graph
    if parsed.kind == "fraction" and parsed.value >= 1.0:
        return Plan.from_decisions(graph, {}, budget=str(parsed), solver="none")
    one_region = len(tg.segments) == 1 and tg.segments[0].module is not None
    if one_region and per_call:
        return _solve_one_region(module, tg, prof, parsed, budget, offload)
    baseline = tg.baseline_bytes
    limit = parsed.limit_activation_bytes(baseline, graph.constant_bytes)
    held = autocast_cast_bytes(graph)
    if parsed.kind == "fraction" and held:
        # The measured step holds autocast's parameter casts too, whatever the plan: the budget
        # is a fraction of no remat *with* them, so the plan's own share shrinks by their bytes.
        limit = math.floor(parsed.value * (baseline + held)) - held
        baseline += held  # (for the margin below)
    floor = _floor(tg).predicted_activation_bytes
    span, fixed_blocks = 1, frozenset()
    if limit < floor:
        # Below what one checkpoint per layer reaches only regions over several layers can fit.
        # (Above it they are left out: their options cost seconds to measure on deep stacks and
        # rarely beat per-layer plans there.)
        span, fixed_blocks = _segment_spans(module, tg, solver)
        if span > 1:
            floor = min(
                floor,
                smallest_activation_bytes(
                    tg.solver_graph, offload=offload, max_segment_blocks=span, fixed_blocks=fixed_blocks
                ),
            )
    if one_region:
        # Its recompute runs at the start of its own backward: the floor is the least peak of
        # any plan, not that of recomputing everything (about no remat's own peak).
        floor = min(floor, smallest_activation_bytes(tg.solver_graph, offload=offload))
    # Aim under the budget by the margin, but never under the least reachable (which is feasible).
    aim = wish = min(limit, max(limit - int(SAFETY_MARGIN * baseline), floor))

    def adjusted(aim: int) -> Plan | None:
        """The solver's plan for `aim`, adjusted to what the replay runs exactly (None: none)."""
        try:
            raw = solve(
                tg.solver_graph,
                Budget("bytes", float(graph.constant_bytes + aim)),
                solver=solver,
                offload=offload,
                max_segment_blocks=span,
                fixed_blocks=fixed_blocks,
                device=default_device(module),
            )
        except InfeasibleBudgetError:
            return None
        fixed = Plan.from_decisions(
            raw.graph_for(graph),
            decisions_for_torch(tg, raw, prof),
            budget=str(parsed),
            solver=raw.solver,
            device=default_device(module),
        )
        return None if set(simulate(graph, fixed).recomputed) & tg.pinned else fixed

    def measured_as(plan: Plan) -> Plan:
        # Its predictions then speak of what is measured: the casts in both figures; no remat's
        # figure is the one the budget was taken of (see TorchGraph.baseline_bytes).
        return dataclasses.replace(
            plan,
            predicted_activation_bytes=plan.predicted_activation_bytes + held,
            baseline_activation_bytes=tg.baseline_bytes + held,
        )

    for _ in range(6):
        fixed = adjusted(aim)
        if fixed is None:
            if aim < limit:  # the margin is a wish, the budget is the contract
                aim = limit
                continue
            break
        if fixed.predicted_activation_bytes <= limit:
            return measured_as(_by_time(module, tg, prof, fixed, wish, parsed))
        # The adjustments for torch pushed the plan over: ask the solver for a little less.
        aim -= fixed.predicted_activation_bytes - limit + max(1, limit // 50)
    # The least this planner reaches: the solver's least plan as the replay runs it (the solver
    # may keep a value an in-place op rewrites later, which the replay recomputes: ViT's dropout
    # masks, named floor 0.313 refused when passed back, 0.324 reached), or every layer
    # recomputed. The error names it, and a budget at it returns it here.
    least = min(
        (p for p in (adjusted(floor), dataclasses.replace(_floor(tg), budget=str(parsed))) if p is not None),
        key=lambda p: p.predicted_activation_bytes,
    )
    if least.predicted_activation_bytes <= limit:
        return measured_as(least)
    raise _infeasible(module, budget, tg, offload, least.predicted_activation_bytes, grouped=span > 1 or one_region)


def _by_time(module: torch.nn.Module, tg: TorchGraph, prof: Profile, plan: Plan, limit: int, parsed: Budget) -> Plan:
    """`plan`, or the fastest plan of whole layers that fits `limit` where that is predicted faster
    once the replay modes' per-op cost is counted (see _layerplan.py)."""
    device, op_seconds = default_device(module), mode_op_seconds(device_of(module).type)
    if op_seconds == 0.0:  # modes priced at nothing: the solver's plan is the fastest it knows
        return plan
    choose = plain_when_faster(device, op_seconds)
    regs = regions(tg, plan, prof, choose)
    if all(r.plain for r in regs.values()):
        return plan
    selective = predicted_seconds(plan, regs, device, op_seconds)
    if selective <= cheapest_layer_seconds(tg, device):  # no plan of whole layers can be faster
        return plan

    def make(decisions: dict[str, Decision]) -> Plan:
        raw = Plan.from_decisions(tg.graph, decisions)
        return Plan.from_decisions(
            tg.graph, decisions_for_torch(tg, raw, prof), budget=str(parsed), solver="whole layers", device=device
        )

    layered = fastest_whole_layer_plan(tg, make, limit, device)
    if layered is None or set(simulate(tg.graph, layered).recomputed) & tg.pinned:
        return plan
    faster = predicted_seconds(layered, regions(tg, layered, prof, choose), device, op_seconds) < selective
    return layered if faster else plan


def _solve_one_region(
    module: torch.nn.Module, tg: TorchGraph, prof: Profile, parsed: Budget, budget: object, offload: bool
) -> Plan:
    """A module without repeated layers is one checkpoint region, planned op by op.

    Its recompute runs at the start of its own backward, so no plan lowers the peak of this
    module alone much below its no-remat peak; what remat changes is what the module *keeps*
    from its forward to its backward, and that is what adds up when such modules are stacked
    (a decorated layer class). So here the budget bounds the kept bytes: a fraction of what no
    remat keeps, or bytes per call.
    """
    graph = tg.graph
    menu = block_menus(graph, Costs(graph, default_device(module)), offload)[0]
    keep_all = max(o.kept_bytes for o in menu)
    limit = math.floor(parsed.value * keep_all) if parsed.kind == "fraction" else int(parsed.value)
    names = {0: Decision.SAVE, 1: Decision.RECOMPUTE, 2: Decision.OFFLOAD}
    for option in sorted(menu, key=lambda o: (o.cost, o.num_ops)):
        if option.kept_bytes > limit:
            continue
        raw = Plan.from_decisions(graph, {graph.values[i].name: names[c] for i, c in option.codes})
        plan = Plan.from_decisions(
            graph, decisions_for_torch(tg, raw, prof), budget=str(parsed), solver=f"one region: {option.label}"
        )
        if simulate(graph, plan).kept_bytes_by_block[0] <= limit:
            return plan
    smallest = min(o.kept_bytes for o in menu)
    need = math.ceil(smallest / keep_all * 1000) / 1000 if keep_all else 1.0
    raise InfeasibleBudgetError(
        f"budget={budget!r} is below the smallest feasible budget {need:g} for {type(module).__name__}: it has no "
        f"repeated layers, so it is one region and the budget bounds what it keeps for its backward "
        f"({format_bytes(keep_all)} with no remat, at least {format_bytes(smallest)} with full recompute). "
        f"Raise the budget to at least {need:g}.",
        smallest_fraction=smallest / keep_all if keep_all else 1.0,
        smallest_bytes=smallest,
    )


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
) -> Compiled:
    """Profile `module` on these inputs (through `call`, default the module itself) and plan it."""
    prof = _profile(module, args, kwargs, call, mode)
    tg = build_graph(prof, segment(module, prof, whole_model=not per_call))
    plan = solve_torch(module, tg, prof, budget, offload=offload, solver=solver, per_call=per_call)
    device = default_device(module)
    regs = regions(tg, plan, prof, plain_when_faster(device, mode_op_seconds(device_of(module).type)))
    return Compiled(as_run(plan, regs, device), tg, prof, regs, signature(module, args, kwargs))


# -- applying ---------------------------------------------------------------------------------
def _needs_remat(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    if not (torch.is_grad_enabled() and module.training):
        return False
    if any(p.requires_grad for p in module.parameters()):
        return True
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_flatten((args, kwargs))[0])


class _BlockForward:
    """A layer's forward: a planned region while its root's forward runs, else the original.

    A class, not a closure, so `copy.deepcopy(model)` rebinds it to the copied module.
    """

    def __init__(self, state: _State, path: str, original: Any):
        self.state, self.path, self.original = state, path, original
        self.__wrapped__ = original  # inspect.signature (Hugging Face reads it) sees the original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state, compiled = self.state, self.state.active
        if state.segment is not None and state.segment.open:
            if not state.segment.expects(self.path):
                state.segment.close()
                raise OpSequenceError(
                    f"remat_kit: `{self.path}` was called inside the checkpoint region of layers "
                    f"{list(state.segment.region.members)}, out of the order the plan was made for. The forward "
                    "changed; remat_kit drops this plan and re-profiles."
                )
            return state.segment.layer(self.original, args, kwargs)
        region = compiled.regions.get(self.path) if compiled is not None else None
        if region is None:
            return self.original(*args, **kwargs)
        if region.members:
            state.segment = SegmentRun(region)
            return state.segment.start(self.original, args, kwargs)
        return run_region(region, self.original, args, kwargs)


def install_blocks(module: torch.nn.Module, state: _State, compiled: Compiled) -> None:
    for path in {p for key, region in compiled.regions.items() for p in (region.members or (key,))}:
        if path == "" or path in state.wrapped_blocks:
            continue
        block = module.get_submodule(path)
        previous = block.__dict__.get("forward")
        block.forward = _BlockForward(state, path, block.forward)
        state.wrapped_blocks[path] = (block, previous)


@torch._dynamo.disable  # planning is Python bookkeeping and a solver: never traced by torch.compile
def _plan_for(
    module: torch.nn.Module, state: _State, original: Any, args: tuple, kwargs: dict, mode: str = "replicate"
) -> tuple[Compiled, tuple]:
    key = signature(module, args, kwargs)
    compiled = state.plans.get(key)
    if compiled is None:
        state.profiling = True
        try:
            # The original forward, not the module: this call's hooks have run already (a second
            # run of them would be a second step to the user's tools, or apply a pre-hook twice).
            # Labelled, so that a torch.profiler trace of a first step shows where planning went
            # (the label is an op too: the user's dispatch modes must not see it either).
            # Planning draws no random numbers the step would see: calibration and profiling may
            # draw from the default generators, and the step that follows must draw what it would
            # have drawn without remat (the same dropout masks).
            cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
            with (
                user_tools_paused(),
                torch.profiler.record_function("remat_kit.plan"),
                torch.random.fork_rng(devices=cuda),
            ):
                compiled = compile_plan(
                    module,
                    args,
                    kwargs,
                    state.budget,
                    offload=state.offload,
                    solver=state.solver,
                    call=original,
                    mode=mode,
                    per_call=state.per_call,
                )
        finally:
            state.profiling = False
        state.plans[key] = compiled
        install_blocks(module, state, compiled)
    return compiled, key


class _RootForward:
    """The rematted module's forward (a class so that deepcopy rebinds it; see _BlockForward)."""

    def __init__(self, module: torch.nn.Module, state: _State, original: Any):
        self.module, self.state, self.original = module, state, original
        self.__wrapped__ = original

    # Planning and this bookkeeping run eagerly; torch.compile still compiles the frames called
    # from here (self._run and the forward), so they compile without a graph break (issue 12).
    @torch._dynamo.disable(recursive=False)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, state, original = self.module, self.state, self.original
        if state.active is not None or state.profiling or not _needs_remat(module, args, kwargs):
            return original(*args, **kwargs)  # eval / no_grad: no remat cost at all
        compiled, key = _plan_for(module, state, original, args, kwargs)
        rng = _rng_states(module)
        # A profile written out from four layers can miss a layer that differs only deep in the
        # stack, and a fake-tensor profile can take another path than real tensors (e.g. an SDPA
        # backend chosen from real strides). The replay refuses a different op sequence before
        # any wrong op index is applied; plan again from a fuller profile and run this call
        # again, from the same RNG state so that dropout draws what it would have drawn.
        while True:
            try:
                return self._run(compiled, args, kwargs)
            except OpSequenceError:
                state.plans.pop(key, None)
                prof = compiled.profile
                if not prof.fake:
                    raise
                mode, what = (
                    ("fake", "the whole forward under FakeTensorMode")
                    if prof.replicated_from
                    else ("real", "a real profile (uses one forward's memory once)")
                )
            warnings.warn(
                f"remat_kit: {type(module).__name__}'s op sequence differs from its profile; re-planning from {what}.",
                stacklevel=2,
            )
            compiled, key = _plan_for(module, state, original, args, kwargs, mode=mode)
            _restore_rng(rng)

    def _run(self, compiled: Compiled, args: tuple, kwargs: dict) -> Any:
        state, original = self.state, self.original
        if not compiled.regions:
            return original(*args, **kwargs)
        state.active = compiled
        try:
            root = compiled.regions.get("")
            out = run_region(root, original, args, kwargs) if root is not None else original(*args, **kwargs)
            if state.segment is not None and state.segment.open:
                raise OpSequenceError(
                    f"remat_kit: the forward ended inside the checkpoint region of layers "
                    f"{list(state.segment.region.members)}; the plan was made for a forward that runs all of them. "
                    "remat_kit drops this plan and re-profiles."
                )
            return out
        finally:
            if state.segment is not None:
                state.segment.close()
                state.segment = None
            state.active = None


@torch._dynamo.disable  # called from the eager root wrapper: never a frame of its own to compile
def _rng_states(module: torch.nn.Module) -> list[tuple[Any, torch.Tensor]]:
    states: list[tuple[Any, torch.Tensor]] = [("cpu", torch.get_rng_state())]
    for device in {p.device for p in module.parameters() if p.device.type not in ("cpu", "meta")}:
        states.append((device, torch.get_device_module(device.type).get_rng_state(device)))
    return states


def _restore_rng(states: list[tuple[Any, torch.Tensor]]) -> None:
    for device, st in states:
        if device == "cpu":
            torch.set_rng_state(st)
        else:
            torch.get_device_module(device.type).set_rng_state(st, device)


def auto(target: Any, budget: object, *, offload: bool = False, solver: str | None = None) -> Any:
    """Remat a module instance in place (returned), or every instance of a module class (decorator)."""
    parse_budget(budget)
    if isinstance(target, type) and issubclass(target, torch.nn.Module):
        return _decorate_class(target, budget, offload, solver)
    if not isinstance(target, torch.nn.Module):
        raise ValueError(
            f"remat_kit.auto(target={target!r:.80}): expected a torch.nn.Module instance or subclass, got "
            f"{type(target).__name__}."
        )
    if hasattr(target, _STATE):
        unwrap(target)  # re-applying replaces the old budget
    original = target.__dict__.get("forward")
    state = _State(budget, offload, solver, original)
    # A Hugging Face KV cache is updated by each layer's forward, so a replay would see a
    # different cache than the forward did (as with any activation checkpointing; HF turns it off
    # under gradient_checkpointing_enable too). Submodules may hold configs of their own (T5's
    # decoder stack has a copy, whose use_cache=True made the decoder build a cache that its
    # cross-attention fills in the forward and reads back in the recompute). unwrap restores them.
    configs = kv_cache_configs(target)
    if configs:
        warnings.warn(
            f"remat_kit.auto: setting {type(target).__name__}.config.use_cache=False (a KV cache "
            "cannot be replayed); pass use_cache=True explicitly for generation.",
            stacklevel=3,
        )
        for c in configs:
            c.use_cache = False
        state.restore_use_cache = configs
    object.__setattr__(target, _STATE, state)
    target.forward = _RootForward(target, state, target.forward)
    return target


def kv_cache_configs(module: torch.nn.Module) -> list[Any]:
    """The Hugging Face configs of `module` and its submodules (each once) with use_cache on."""
    configs = {
        id(c): c for m in module.modules() if getattr(c := getattr(m, "config", None), "use_cache", None) is True
    }
    return list(configs.values())


def _decorate_class(cls: type, budget: object, offload: bool, solver: str | None) -> type:
    if _CLASS in cls.__dict__:
        cls.__init__ = cls.__dict__[_CLASS]
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if type(self) is cls or not hasattr(self, _STATE):
            auto(self, budget, offload=offload, solver=solver)
            getattr(self, _STATE).per_call = True  # one layer of a caller's stack: see _solve_one_region

    cls.__init__ = __init__
    setattr(cls, _CLASS, original_init)
    return cls


def unwrap(target: Any) -> Any:
    """Undo `auto`: restore the original forward of the module (and its layers), or of a class."""
    if isinstance(target, type):
        if _CLASS not in target.__dict__:
            raise ValueError(f"remat_kit.unwrap({target.__name__}): this class was not decorated with remat_kit.auto.")
        target.__init__ = target.__dict__[_CLASS]
        delattr(target, _CLASS)
        return target
    state = getattr(target, _STATE, None) if isinstance(target, torch.nn.Module) else None
    if state is None:
        raise ValueError(
            f"remat_kit.unwrap(target={target!r:.80}): not a module rematted by remat_kit.auto; pass the module "
            "instance (or class) that auto returned."
        )
    for block, previous in state.wrapped_blocks.values():
        _restore_forward(block, previous)
    _restore_forward(target, state.original_forward)
    for config in state.restore_use_cache:
        config.use_cache = True
    object.__delattr__(target, _STATE)
    return target


def _restore_forward(module: torch.nn.Module, previous: Any) -> None:
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def state_of(module: torch.nn.Module) -> _State | None:
    return getattr(module, _STATE, None)
