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
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from remat_kit._core.budget import parse_budget
from remat_kit._torch._plan import Compiled, compile_plan, signature
from remat_kit._torch._plan import _floor as _floor  # (tests reach it here)
from remat_kit._torch._plan import _profile as _profile  # (benchmarks/torch_bench.py profiles through it)
from remat_kit._torch._plan import autocast_cast_bytes as autocast_cast_bytes
from remat_kit._torch._profile import user_tools_paused
from remat_kit._torch._replay import OpSequenceError, SegmentRun, run_region

_STATE = "_remat_kit_state"
_CLASS = "_remat_kit_class"


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


def _grouped_whole_layers(compiled: Compiled) -> bool:
    return compiled.plan.solver == "whole layers" and any(r.members for r in compiled.regions.values())


@torch._dynamo.disable  # planning is Python bookkeeping and a solver: never traced by torch.compile
def _plan_for(
    module: torch.nn.Module,
    state: _State,
    original: Any,
    args: tuple,
    kwargs: dict,
    mode: str = "replicate",
    compiling: bool = False,
) -> tuple[Compiled, tuple]:
    key = signature(module, args, kwargs)
    compiled = state.plans.get(key)
    if compiling and compiled is not None and _grouped_whole_layers(compiled):
        # Under torch.compile a region over several layers runs eagerly (a graph break): an eager
        # plan that chose one over regions of one layer each gets a compiled sibling without.
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
            compiled, key = _plan_for(module, state, original, args, kwargs, mode=mode, compiling=compiling)
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
