"""`auto`, `explain`, `plan_of`, `unwrap`: one front door that hands the target to its framework's adapter.

Adapters import lazily, so `import remat_kit` works with jax, torch, both or neither.
"""

from __future__ import annotations

import sys
from typing import Any

from remat_kit._core.budget import parse_budget
from remat_kit._core.plan import Plan
from remat_kit._core.solve import _check_solver


def _is_torch_module(target: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    module_type = torch.nn.Module
    return isinstance(target, module_type) or (isinstance(target, type) and issubclass(target, module_type))


def _adapter(target: Any):
    if _is_torch_module(target):
        from remat_kit import _torch

        return _torch
    try:
        from remat_kit import _jax
    except ImportError as e:  # jax missing: say what was passed and what is needed
        raise ImportError(
            f"remat_kit.auto/explain got {type(target).__name__} {target!r:.80}, which is not a torch.nn.Module, "
            f"so it needs JAX ({e}). Install it with `pip install 'remat_kit[jax]'`."
        ) from e
    return _jax


def auto(target: Any = None, /, budget: object = None, *, offload: bool = False, solver: str | None = None):
    """Plan and apply selective remat so a training step fits `budget` with the least recompute.

    Use as a decorator, ``@remat_kit.auto(budget=0.7)``, or a wrapper, ``remat_kit.auto(model, budget=0.7)``,
    on a JAX function, a Flax nnx / linen Module (class or instance) or a torch ``nn.Module``
    (class or instance). `budget` is a fraction of no-remat activation memory in (0, 1], or bytes
    per device for the whole step (an int, or a string like ``"12GiB"``). `offload=True` lets the
    plan move activations to host memory; `solver` is ``"dp"`` (default), ``"milp"`` or ``"greedy"``.
    """
    if budget is None and target is not None and not callable(target):
        target, budget = None, target  # auto(0.7) used as a decorator factory
    if budget is None:
        raise ValueError(
            "remat_kit.auto() needs budget=...: a fraction of no-remat activation memory in (0, 1] "
            "(e.g. auto(budget=0.7)) or bytes per device (e.g. auto(budget='12GiB'))."
        )
    parse_budget(budget)  # fail at decoration time, not at the first step
    _check_solver(solver)
    if not isinstance(offload, bool):
        raise ValueError(f"offload={offload!r} must be True or False.")

    def apply(obj: Any):
        return _adapter(obj).auto(obj, budget, offload=offload, solver=solver)

    return apply if target is None else apply(target)


def explain(target: Any, *example_args: Any, measure: bool = False, **kwargs: Any):
    """Print (and return) the per-layer, per-op table: bytes, recompute FLOPs, decision, predicted
    activation memory against no remat, and with `measure=True` the measured figures beside them."""
    return _adapter(target).explain(target, *example_args, measure=measure, **kwargs)


def unwrap(target: Any):
    """Undo `auto` on a module instance: restore its original forward (PyTorch)."""
    return _adapter(target).unwrap(target)


def plan_of(target: Any) -> list[Plan]:
    """The plans `auto` has made for `target` so far: a new list of `remat_kit.Plan`, one per input
    signature (shapes, dtypes, flags), in the order they were made, so the newest is last.

    `target` is what `auto` returned: a torch module instance (plans are per instance; a class
    decorated with `auto` plans each of its instances), a wrapped JAX function, or a wrapped Flax
    nnx / linen Module class or nnx instance (whose plans live on the class, shared by its instances).
    Planning happens on the first training call per input signature, so the list is empty before
    that (and stays empty under eval / no_grad in torch). Raises ValueError when `target` was not
    made by `auto`.

        model = remat_kit.auto(model, budget=0.5)
        model(tokens, targets).backward()
        plan = remat_kit.plan_of(model)[-1]     # the plan of the latest new input signature
    """
    if _is_torch_module(target):
        from remat_kit import _torch as adapter
    else:
        try:
            from remat_kit import _jax as adapter
        except ImportError:  # without jax, auto could not have wrapped it
            adapter = None
    plans = adapter.plan_of(target) if adapter is not None else None
    if plans is None:
        echo = " ".join(repr(target).split())  # a torch module's repr spans many lines
        raise ValueError(
            f"remat_kit.plan_of(target={echo:.80}): not made by remat_kit.auto, so it has no plans. Pass what "
            "auto returned: the rematted torch module (remat_kit.auto(model, budget=...)) or the wrapped JAX "
            "function / Flax module (f = remat_kit.auto(f, budget=...))."
        )
    return plans
