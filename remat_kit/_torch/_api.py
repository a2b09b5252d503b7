"""`auto`, `unwrap` and `plan_of` for torch nn.Module: the adapter's front door.

`auto(model, budget)` replaces `model.forward` (an instance attribute, so `state_dict` keys and
parameter identity do not change) with the planned forward of `_run.py`, which plans once per
input signature (`_plan.py`) and runs each planned layer as its plan says. The JAX counterpart
is `_jax/_api.py`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from remat_kit._core.budget import parse_budget
from remat_kit._core.plan import Plan
from remat_kit._torch._limits import autocast_cast_bytes as autocast_cast_bytes
from remat_kit._torch._plan import _profile as _profile  # (benchmarks/torch_bench.py profiles through it)
from remat_kit._torch._plan import refuse_hf_checkpointing
from remat_kit._torch._run import _RootForward, _State

_STATE = "_remat_kit_state"
_CLASS = "_remat_kit_class"


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
    refuse_hf_checkpointing(target)  # checked again when planning: it may be turned on after this
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


def plan_of(target: Any) -> list[Plan] | None:
    """The plans `auto` made for a module instance, one per input signature in the order they were
    made (a re-plan moves to the end); None when `target` is not rematted (the front door says so)."""
    if isinstance(target, type):
        raise ValueError(
            f"remat_kit.plan_of(target={target.__name__}): a torch module class has no plans; each instance is "
            f"planned on its own first training calls. Pass the instance, e.g. remat_kit.plan_of(model) for "
            f"model = {target.__name__}(...)."
        )
    state = state_of(target) if isinstance(target, torch.nn.Module) else None
    return None if state is None else [compiled.plan for compiled in state.plans.values()]
