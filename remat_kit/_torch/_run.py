"""Run a planned module: the root's and each planned layer's forward, swapped in by `auto`.

On a training call (grad enabled, `model.training`) the root's forward plans once per input
signature (`_plan.compile_plan`) and runs each planned layer as its region says: kept whole as
written, plain non-reentrant checkpoint, the op-indexed replay (_replay.py), or a selective-
checkpoint policy under torch.compile (_compiled.py). Under `torch.no_grad()` or `model.eval()`
the original forward runs untouched. The JAX counterpart is `_jax/_run.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from remat_kit._torch import _buffers
from remat_kit._torch._compiled import region_settings
from remat_kit._torch._modes import Region
from remat_kit._torch._plan import Entry, compile_plan, signature
from remat_kit._torch._replay import OpSequenceError, SegmentRun, kept_layer_checks, run_checked, run_region
from remat_kit._torch._trace import user_tools_paused


@dataclasses.dataclass
class _State:
    budget: object
    offload: bool
    solver: str | None
    original_forward: Any  # the instance attribute `forward` had before (None: the class's)
    plans: dict[tuple, Entry] = dataclasses.field(default_factory=dict)
    active: Entry | None = None
    profiling: bool = False
    restore_use_cache: list[Any] = dataclasses.field(default_factory=list)  # configs whose use_cache auto turned off
    wrapped_blocks: dict[str, tuple[torch.nn.Module, Any]] = dataclasses.field(default_factory=dict)
    segment: SegmentRun | None = None  # the multi-layer checkpoint region the forward is inside
    per_call: bool = False  # an instance of a decorated layer class: see _solve_one_region
    checked: set[tuple[int, str]] = dataclasses.field(default_factory=set)  # see _checked_once
    # id(entry) -> kept layers not checked yet against a written-out profile (kept_layer_checks)
    unchecked: dict[int, dict[str, Region]] = dataclasses.field(default_factory=dict)
    accelerators: dict[tuple, tuple[torch.device, ...]] = dataclasses.field(default_factory=dict)  # _accelerators
    ran: set[int] = dataclasses.field(default_factory=set)  # id(entry) of plans that ran a whole forward


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
            if compiled is not None and not torch.compiler.is_compiling():
                checks = state.unchecked.get(id(compiled))
                if checks and self.path in checks:  # a kept layer's first call (see _checked_once)
                    check = checks.pop(self.path)
                    if not checks:
                        del state.unchecked[id(compiled)]
                    return run_checked(check, self.original, args, kwargs)
            return self.original(*args, **kwargs)
        region = _checked_once(state, compiled, self.path, region)
        if region.members:
            buffers = [b for p in region.members for b in state.wrapped_blocks[p][0].buffers()]
            state.segment = SegmentRun(region, buffers)
            return state.segment.start(self.original, args, kwargs)
        return run_region(region, self.original, args, kwargs, list(state.wrapped_blocks[self.path][0].buffers()))


def _checked_once(state: _State, entry: Entry, path: str, region: Region) -> Region:
    """`region`, or on its first call the same region under the replay modes.

    A plan made from a profile written out from a few layers (`Profile.replicated_from`) holds
    for a layer only if that layer runs the ops the profile says. The replay modes check each op
    against the plan and raise `OpSequenceError` before a wrong one is applied (the root forward
    then re-plans from the whole forward); plain checkpoint checks nothing. So a region that runs
    as plain checkpoint runs once under the modes, which recompute exactly what plain checkpoint
    would need (plain is chosen only for regions that keep nothing inside), and plainly after.
    A layer the plan keeps whole runs its first call under the forward mode alone, which checks
    its ops (`kept_layer_checks`). Under torch.compile the region is a selective-checkpoint policy
    whatever `plain` says, and nothing is checked: a kept or plainly recomputed layer computes
    its own gradients whatever it runs; only its memory could differ from the plan's.
    """
    if not region.plain or not entry.profile.replicated_from or torch.compiler.is_compiling():
        return region
    mark = (id(entry), path)
    if mark in state.checked:
        return region
    state.checked.add(mark)
    return dataclasses.replace(region, plain=False)


def install_blocks(module: torch.nn.Module, state: _State, compiled: Entry) -> None:
    checks = kept_layer_checks(compiled.tg, compiled.profile, compiled.regions)
    if checks:
        state.unchecked[id(compiled)] = checks
    for path in {p for key, region in compiled.regions.items() for p in (region.members or (key,))} | set(checks):
        if path == "" or path in state.wrapped_blocks:
            continue
        block = module.get_submodule(path)
        previous = block.__dict__.get("forward")
        block.forward = _BlockForward(state, path, block.forward)
        state.wrapped_blocks[path] = (block, previous)


def _grouped_layers(compiled: Entry) -> bool:
    return any(r.members for r in compiled.regions.values())


@torch._dynamo.disable  # planning is Python bookkeeping and a solver: never traced by torch.compile
def _plan_for(
    module: torch.nn.Module,
    state: _State,
    original: Any,
    args: tuple,
    kwargs: dict,
    mode: str = "replicate",
    compiling: bool = False,
) -> tuple[Entry, tuple]:
    key = signature(module, args, kwargs)
    compiled = state.plans.get(key)
    if compiling and compiled is not None and _grouped_layers(compiled):
        # Under torch.compile a region over several layers runs eagerly (a graph break): an eager
        # plan with one gets a compiled sibling without (or the budget is refused there).
        key = (*key, "torch.compile")
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
                _buffers.kept(module.buffers()),
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
                    segments=not compiling,
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
        # Dynamo skips this frame but leaves its callback set for the frames it calls: set here
        # means torch.compile is tracing the caller.
        compiling = torch._C._dynamo.eval_frame.get_eval_frame_callback() not in (None, False)
        compiled, key = _plan_for(module, state, original, args, kwargs, compiling=compiling)
        rng = _rng_states(_accelerators(module, state, key))
        # Only a fake profile's plan can be refused mid-forward (below), only on its first run.
        kept = _buffers.copies(module.buffers()) if compiled.profile.fake and id(compiled) not in state.ran else None
        # A profile written out from four layers can miss a layer that differs only deep in the
        # stack, and a fake-tensor profile can take another path than real tensors (e.g. an SDPA
        # backend chosen from real strides). The replay refuses a different op sequence before
        # any wrong op index is applied; plan again from a fuller profile and run this call
        # again, from the same RNG state so that dropout draws what it would have drawn.
        while True:
            try:
                with region_settings() if compiling else contextlib.nullcontext():
                    out = self._run(compiled, args, kwargs)
                state.ran.add(id(compiled))
                return out
            except OpSequenceError:
                state.plans.pop(key, None)
                state.unchecked.pop(id(compiled), None)
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
            compiled, key = _plan_for(module, state, original, args, kwargs, mode=mode, compiling=compiling)
            _restore_rng(rng)
            _buffers.restore(kept or [])  # the refused run's BatchNorm updates are undone too

    def _run(self, compiled: Entry, args: tuple, kwargs: dict) -> Any:
        state, original = self.state, self.original
        if not compiled.regions:
            return original(*args, **kwargs)
        state.active = compiled
        try:
            root = compiled.regions.get("")
            if root is not None:
                out = run_region(
                    _checked_once(state, compiled, "", root), original, args, kwargs, list(self.module.buffers())
                )
            else:
                out = original(*args, **kwargs)
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


def _accelerators(module: torch.nn.Module, state: _State, key: tuple) -> tuple[torch.device, ...]:
    """The devices besides the CPU whose generators a step may draw from (the parameters'), found
    once per plan key (the key holds the inputs' devices): walking a module's parameters on every
    step is a visible share of a small model's step (reports/torch/tiny_peers.md)."""
    found = state.accelerators.get(key)
    if found is None:
        found = tuple({p.device for p in module.parameters() if p.device.type not in ("cpu", "meta")})
        state.accelerators[key] = found
    return found


@torch._dynamo.disable  # called from the eager root wrapper: never a frame of its own to compile
def _rng_states(devices: tuple[torch.device, ...]) -> list[tuple[Any, torch.Tensor]]:
    states: list[tuple[Any, torch.Tensor]] = [("cpu", torch.get_rng_state())]
    for device in devices:
        states.append((device, torch.get_device_module(device.type).get_rng_state(device)))
    return states


def _restore_rng(states: list[tuple[Any, torch.Tensor]]) -> None:
    for device, st in states:
        if device == "cpu":
            torch.set_rng_state(st)
        else:
            torch.get_device_module(device.type).set_rng_state(st, device)
