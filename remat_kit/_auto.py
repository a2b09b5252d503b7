"""`auto`, `explain`, `plan_of`, `unwrap`: one front door that hands the target to its framework's adapter.

Adapters import lazily, so `import remat_kit` works with jax, torch, both or neither.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol, TypeVar, overload

from remat_kit._core.budget import BudgetLike, parse_budget
from remat_kit._core.plan import Plan
from remat_kit._core.solve import check_solver

_T = TypeVar("_T")


class Explanation(Protocol):
    """What `explain` returns: each adapter's own dataclass, printable as the table `explain` printed."""

    @property
    def plan(self) -> Plan:
        """The plan `auto` would apply (or has applied) on these inputs."""
        ...

    @property
    def budget_meaning(self) -> str:
        """What the budget bounds for this plan: the whole step, or one call of a layer."""
        ...


def _is_torch_module(target: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    module_type = torch.nn.Module
    return isinstance(target, module_type) or (isinstance(target, type) and issubclass(target, module_type))


def _adapter(target: Any) -> ModuleType:
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


@overload
def auto(
    target: None = None, /, budget: BudgetLike | None = None, *, offload: bool = False, solver: str | None = None
) -> Callable[[_T], _T]: ...
@overload
def auto(target: float | str, /, *, offload: bool = False, solver: str | None = None) -> Callable[[_T], _T]: ...
@overload
def auto(target: _T, /, budget: BudgetLike, *, offload: bool = False, solver: str | None = None) -> _T: ...
def auto(target: Any = None, /, budget: Any = None, *, offload: bool = False, solver: str | None = None) -> Any:
    """Plan and apply selective remat so a training step fits `budget` with the least recompute.

    Use as a decorator, ``@remat_kit.auto(budget=0.7)``, or a wrapper, ``remat_kit.auto(model, budget=0.7)``,
    on a JAX function, a Flax nnx / linen Module (class or instance) or a torch ``nn.Module``
    (class or instance). `budget` is a fraction of no-remat activation memory in (0, 1], or bytes
    per device for the whole step (an int, or a string like ``"12GiB"``). `offload=True` lets the
    plan move activations to host memory; `solver` is ``"dp"`` (default), ``"milp"`` or ``"greedy"``.

    Returns what it was given, rematted: the module instance (changed in place), the class, or a
    function with the same signature; as a decorator factory (no target), the decorator.
    """
    if budget is None and target is not None and not callable(target):
        target, budget = None, target  # auto(0.7) used as a decorator factory
    if budget is None:
        raise ValueError(
            "remat_kit.auto() needs budget=...: a fraction of no-remat activation memory in (0, 1] "
            "(e.g. auto(budget=0.7)) or bytes per device (e.g. auto(budget='12GiB'))."
        )
    parse_budget(budget)  # fail at decoration time, not at the first step
    check_solver(solver)
    if not isinstance(offload, bool):
        raise ValueError(f"offload={offload!r} must be True or False.")

    def apply(obj: Any) -> Any:
        return _adapter(obj).auto(obj, budget, offload=offload, solver=solver)

    return apply if target is None else apply(target)


def explain(target: Any, *example_args: Any, measure: bool = False, **kwargs: Any) -> Explanation:
    """Print (and return) the per-layer, per-op table: bytes, recompute FLOPs, decision, predicted
    activation memory against no remat, and with `measure=True` the measured figures beside them."""
    return _adapter(target).explain(target, *example_args, measure=measure, **kwargs)


def unwrap(target: _T) -> _T:
    """Undo `auto`: a torch module instance gets its original forward back (returned), a decorated
    class its original ``__init__``; for a JAX function or Flax class, the original is returned."""
    result: _T = _adapter(target).unwrap(target)
    return result


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
    plans: list[Plan] | None = None
    if _is_torch_module(target):
        from remat_kit import _torch

        plans = _torch.plan_of(target)
    else:
        try:
            from remat_kit import _jax
        except ImportError:  # without jax, auto could not have wrapped it
            pass
        else:
            plans = _jax.plan_of(target)
    if plans is None:
        echo = " ".join(repr(target).split())  # a torch module's repr spans many lines
        raise ValueError(
            f"remat_kit.plan_of(target={echo:.80}): not made by remat_kit.auto, so it has no plans. Pass what "
            "auto returned: the rematted torch module (remat_kit.auto(model, budget=...)) or the wrapped JAX "
            "function / Flax module (f = remat_kit.auto(f, budget=...))."
        )
    return plans
