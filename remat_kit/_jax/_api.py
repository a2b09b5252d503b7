"""`auto` for JAX functions and Flax nnx / linen modules: trace, plan (cached per input
signature), and run the planned function."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from remat_kit._core.budget import budget_meaning, parse_budget
from remat_kit._core.graph import DeviceSpec, Role
from remat_kit._core.plan import Decision, Plan
from remat_kit._core.solve import InfeasibleBudgetError, check_solver
from remat_kit._jax import _plan, _plancache
from remat_kit._jax._graph import Traced, build
from remat_kit._jax._plan import choose
from remat_kit._jax._rules import Tracer
from remat_kit._jax._run import run_planned
from remat_kit._jax._sharding import divisor, input_shardings
from remat_kit._jax._trace import trace
from remat_kit._jax._verify import can_verify, specs_of, verified

_ATTR = "__remat_kit_auto__"


@dataclasses.dataclass
class Entry:
    traced: Traced
    plan: Plan
    decisions: dict[str, Decision]
    segments: tuple[tuple[str, ...], ...] = ()  # the plan's multi-block checkpoint units (Plan.segments)
    per_call: bool = False  # what the budget bounds: see `budget_meaning`

    @property
    def budget_meaning(self) -> str:
        return budget_meaning(self.per_call)


class Planner:
    """Budget, options and the per-signature plan cache shared by every call of one `auto` target."""

    def __init__(
        self,
        budget: object,
        *,
        offload: bool,
        solver: str | None,
        verify: bool = True,
        device: DeviceSpec | None = None,
        layer_class: bool = False,
    ):
        parse_budget(budget)  # raises ValueError naming `budget`
        check_solver(solver)
        for name, flag in (("offload", offload), ("verify", verify)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} must be True or False.")
        self.budget, self.offload, self.solver, self.verify, self.device = budget, offload, solver, verify, device
        self.layer_class = layer_class  # `auto` decorated a module class: each instance is one layer of a model
        self.cache: dict[Any, Plan] = {}
        self.per_call_keys: set[Any] = set()  # cache keys whose plan bounds one call (see `_per_call`)

    def prepare(self, f: Callable, args: tuple, kwargs: dict, num_param_args: int = 1):
        """Trace `f(*args, **kwargs)`, plan it (cached), and return (entry, flat dynamic args, rebuild)."""
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dyn = [i for i, x in enumerate(leaves) if _is_array(x)]
        static = tuple((i, _static_key(leaves[i])) for i in range(len(leaves)) if i not in set(dyn))
        num_param_leaves = len(jax.tree_util.tree_leaves(args[:num_param_args]))
        roles = [Role.PARAM if i < num_param_leaves else Role.INPUT for i in dyn]

        def flat_f(*dyn_vals):
            full = list(leaves)
            for i, v in zip(dyn, dyn_vals):
                full[i] = v
            a, kw = jax.tree_util.tree_unflatten(treedef, full)
            return f(*a, **kw)

        dyn_vals = [leaves[i] for i in dyn]
        shardings = input_shardings(dyn_vals)  # per device: the plan, a byte budget and the measure
        fn, out_tree = trace(flat_f, *dyn_vals)
        divisors = {
            vid: d for vid, x, s in zip(fn.invars, dyn_vals, shardings) if (d := divisor(s, jax.typeof(x).shape)) > 1
        }
        in_scan = _in_scan_body()
        key = (treedef, static, tuple(_signature(x, s) for x, s in zip(dyn_vals, shardings)), tuple(roles), in_scan)
        traced = build(fn, out_tree, roles, divisors)
        plan = self.cache.get(key)
        if plan is None:
            per_call = _per_call(traced, self.layer_class or in_scan)
            plan = self._plan(traced, dyn_vals, shardings, per_call)
            self.cache[key] = plan
            if per_call:
                self.per_call_keys.add(key)
        return Entry(
            traced=traced,
            plan=plan,
            decisions=plan.as_dict(),
            segments=plan.segments,
            per_call=key in self.per_call_keys,
        ), dyn_vals

    def _plan(self, traced: Traced, dyn_vals: list, shardings: list, per_call: bool) -> Plan:
        """The verified plan for one signature: from the on-disk cache when this program, budget and
        options were verified before (`_plancache.py`), else planned and verified, and stored."""
        if not (self.verify and can_verify(traced)):
            return choose(
                traced, self.budget, solver=self.solver, offload=self.offload, device=self.device, per_call=per_call
            )
        key = _plancache.program_key(
            traced,
            specs_of(dyn_vals, shardings),
            what="plan",
            budget=str(parse_budget(self.budget)),
            solver=self.solver,
            offload=self.offload,
            per_call=per_call,
            device=repr(self.device),
        )
        found = _plancache.load_plan(key, traced.graph, self.budget)
        if isinstance(found, InfeasibleBudgetError):
            raise found
        if found is not None:
            return found
        try:
            plan = self._verified_plan(traced, dyn_vals, shardings, per_call)
        except InfeasibleBudgetError as e:  # a verdict too: the next run raises it without compiling
            _plancache.store_plan(key, e)
            raise
        _plancache.store_plan(key, plan)
        return plan

    def _verified_plan(self, traced: Traced, dyn_vals: list, shardings: list, per_call: bool) -> Plan:
        """Plan, then verify by compiling (`_verify.py`) unless the plan keeps everything under a
        fractional budget."""
        parsed = parse_budget(self.budget)
        model = self._model(traced, per_call)
        verify = functools.partial(
            verified, traced, budget=self.budget, model=model, dyn_vals=dyn_vals, shardings=shardings
        )
        if not per_call and parsed.kind == "fraction" and parsed.value < 1.0:
            # Every plan under such a budget recomputes something, so it is verified, and the
            # verifier asks the model at its calibrated target: a plan at the raw budget first
            # would be one more solve, thrown away.
            return verify(None, warm=self._warm(model))
        floor = model.floor("bytes") if not per_call and parsed.kind == "bytes" else None
        if floor is not None and not floor.admits(parsed, traced.graph.constant_bytes):
            # Below the model's floor: what XLA compiles may still fit (see _verify's doc).
            return verify(model.least_memory(), below_floor=floor, warm=self._warm(model))
        plan = model.plan(self.budget)  # per call, below the floor: the model's verdict is the answer
        # A byte budget is checked even on a plan that keeps everything: the model's no-remat
        # figure is not the compiled step's (XLA adds buffers of its own).
        saves = plan.names(Decision.RECOMPUTE) + plan.names(Decision.OFFLOAD)
        if not (saves or parsed.kind == "bytes"):
            return plan
        return verify(plan, layer=per_call, warm=self._warm(model))

    @staticmethod
    def _warm(model: _plan.Model) -> Callable[[], object]:
        """The solve's budget-independent work for `verified` to run while no remat compiles on
        another thread: the model's floor, which builds what every later solve reuses (block
        menus, segment options, a scan's grouped options and its menu applied to every layer),
        cached on the graph and the model."""
        return model.floor

    def _model(self, traced: Traced, per_call: bool = False) -> _plan.Model:
        # The device's calibration is resolved here, before no remat's compile starts (`_warm`):
        # a microbenchmark timed beside a compile would measure the machine half-busy.
        device = self.device or _plan.default_device()
        return _plan.Model(traced, solver=self.solver, offload=self.offload, device=device, per_call=per_call)

    def call(self, f: Callable, args: tuple, kwargs: dict, num_param_args: int = 1) -> Any:
        entry, dyn_vals = self.prepare(f, args, kwargs, num_param_args)
        outs = run_planned(entry.traced, entry.decisions, dyn_vals, segments=entry.segments)
        return jax.tree_util.tree_unflatten(entry.traced.out_tree, outs)


def _per_call(traced: Traced, one_layer_of_many: bool) -> bool:
    """Whether the budget bounds one call's kept bytes rather than the whole step (issue 11).

    Only where the target is one layer that its caller repeats: a decorated module class, or a
    function traced as a `lax.scan` body, planned as one block without a scan of its own. A
    function or model instance is a whole step whatever structure is found, one block
    included (haiku's ResNet was one block and got the per-call meaning: 1.00 of no remat at
    budget 0.5, never checked against it)."""
    return one_layer_of_many and traced.graph.num_blocks == 1 and not traced.scans


def _in_scan_body() -> bool:
    """Whether the innermost tracing frame is a `lax.scan` body (under vmap/grad of it too).

    jax has no public query for the enclosing trace; `jax._src.core.trace_ctx` is read, and on a
    jax without it the call is taken as a whole step (the stricter meaning)."""
    try:
        from jax._src import core as jax_core

        trace = jax_core.trace_ctx.trace
    except (ImportError, AttributeError):  # pragma: no cover - depends on the jax version
        return False
    while trace is not None:
        frame = getattr(trace, "frame", None)
        if frame is not None:
            return getattr(getattr(frame, "debug_info", None), "traced_for", None) == "scan"
        trace = getattr(trace, "parent_trace", None)
    return False


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, Tracer)


def _static_key(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return ("id", id(x))


def _signature(x: Any, sharding: Any) -> tuple:
    """Shape, dtype and per-device layout: one plan per sharding, since bytes are per device."""
    aval = jax.typeof(x)
    return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)), sharding)


# -- targets -------------------------------------------------------------------------------------
def auto(target: Any, budget: object, *, offload: bool = False, solver: str | None = None, verify: bool = True) -> Any:
    """Wrap a JAX function, an nnx Module class or instance, or a linen Module class.

    `verify=True` (default) compiles the first call of each input signature with and without the
    plan and tightens the plan until the compiled temp memory fits (see `_verify.py`), and keeps
    the verdict on disk, so the next run of the same program compiles nothing more
    (`_plancache.py`: `REMAT_KIT_CACHE_DIR`, `REMAT_KIT_PLAN_CACHE=0` to turn it off); pass
    False to skip those compiles and trust the cost model alone.
    """
    kind = _target_kind(target)
    # A decorated class is a layer of a model its caller builds: its budget is per call (see `_per_call`).
    planner = Planner(
        budget, offload=offload, solver=solver, verify=verify, layer_class=kind in ("nnx_class", "linen_class")
    )
    if kind == "nnx_class":
        return _nnx_class(target, planner)
    if kind == "nnx_instance":
        target.__class__ = _nnx_class(type(target), planner)
        return target
    if kind == "linen_class":
        return _linen_class(target, planner)
    if kind == "linen_instance":
        raise ValueError(
            f"remat_kit.auto({type(target).__name__}(...)): a linen Module instance cannot be re-planned in place; "
            f"wrap the class instead: `{type(target).__name__} = remat_kit.auto({type(target).__name__}, budget=...)` "
            "or decorate its definition with `@remat_kit.auto(budget=...)`."
        )
    if not callable(target):
        raise ValueError(
            f"remat_kit.auto(target={target!r:.80}): expected a JAX function, a Flax nnx Module class or instance, "
            "a linen Module class, or a torch.nn.Module."
        )
    return _function(target, planner)


def _target_kind(target: Any) -> str:
    try:
        import flax.linen as nn
        from flax import nnx
    except ImportError:  # flax not installed: only plain functions
        return "function"
    if isinstance(target, type):
        if issubclass(target, nnx.Module):
            return "nnx_class"
        if issubclass(target, nn.Module):
            return "linen_class"
        return "function"
    if isinstance(target, nnx.Module):
        return "nnx_instance"
    if isinstance(target, nn.Module):
        return "linen_instance"
    return "function"


def _function(f: Callable, planner: Planner) -> Callable:
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        return planner.call(f, args, kwargs)

    setattr(wrapped, _ATTR, (planner, f))
    return wrapped


def _nnx_class(cls: type, planner: Planner) -> type:
    from flax import nnx

    original = getattr(cls, _ATTR, (None, cls))[1]
    call = original.__call__

    def __call__(self, *args, **kwargs):
        # nnx objects passed to the call (the `nnx.Rngs` a dropout draws from, a shared module)
        # are written by it as the module is: their state goes through the planned call with the
        # module's and comes back, so an RNG stream advances as it does without remat.
        nodes, (args, kwargs) = _take_nodes((args, kwargs))
        graphdef, state = nnx.split((self, *nodes))

        def pure(state, *args, **kwargs):
            before = _values(state)  # nnx.merge may hand the module these very variables
            module, *given = nnx.merge(graphdef, state)
            args, kwargs = _put_nodes((args, kwargs), given)
            out = call(module, *args, **kwargs)
            return out, _written(before, nnx.state((module, *given)))

        out, new_state = planner.call(pure, (state, *args), kwargs)
        nnx.update((self, *nodes), new_state)
        return out

    sub = type(
        original.__name__,
        (original,),
        {"__call__": __call__, "__module__": original.__module__, "__qualname__": original.__qualname__},
    )
    setattr(sub, _ATTR, (planner, original))
    return sub


@dataclasses.dataclass(frozen=True)
class _Node:
    """Where an nnx object stood among a call's arguments (`_take_nodes`)."""

    index: int


def _take_nodes(tree: Any) -> tuple[list, Any]:
    """The nnx objects in `tree` (graph nodes: modules, `nnx.Rngs`), and `tree` with each replaced
    by a `_Node` marker (static to the planner: their state travels on its own)."""
    from flax.nnx import graph

    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=graph.is_graph_node)
    nodes, marked = [], []
    for x in leaves:
        if graph.is_graph_node(x):
            nodes.append(x)
            x = _Node(len(nodes) - 1)
        marked.append(x)
    return nodes, jax.tree_util.tree_unflatten(treedef, marked)


def _put_nodes(tree: Any, nodes: list) -> Any:
    """`_take_nodes` undone: each marker replaced by its (merged) nnx object."""
    return jax.tree_util.tree_map(lambda x: nodes[x.index] if isinstance(x, _Node) else x, tree)


def _raw(variable: Any) -> Any:
    return variable.get_raw_value() if hasattr(variable, "get_raw_value") else variable.value


def _values(state: Any) -> dict:
    """Path -> the value object each variable of nnx `state` holds now."""
    from flax import nnx

    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    return {path: _raw(v) for path, v in (flat.items() if isinstance(flat, dict) else flat)}


def _written(before: dict, after: Any) -> Any:
    """The part of nnx state `after` that a call wrote (a value other than the one it held before
    it, `_values`), which is all the caller's objects are updated with. Writing back the rest would
    assign variables the caller's trace may not mutate: a module merged inside `jax.grad` from
    state passed to it beside the parameters holds nnx.MultiHeadAttention's RNG streams as
    variables that only its own trace level may write (flax's `TraceContextError`), although the
    call never touched them."""
    from flax import nnx

    wrote = lambda path, v: _raw(v) is not before.get(path)  # noqa: E731
    return nnx.filter_state(after, wrote) if hasattr(nnx, "filter_state") else after.filter(wrote)


def _linen_class(cls: type, planner: Planner) -> type:
    import flax.linen as nn
    from flax.core import lift

    def transform(fn, variables=True, rngs=True):
        def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
            def pure(variable_groups, rng_groups, *args, **kwargs):
                scope = scope_fn(variable_groups, rng_groups)
                y = fn(scope, *args, **kwargs)
                return y, repack_fn(scope)

            return planner.call(pure, (variable_groups, rng_groups, *args), kwargs)

        return lift.pack(inner, (variables,), (variables,), (rngs,), name="remat_kit_auto", enable_kwargs=True)

    sub = nn.transforms.lift_transform(transform, cls)
    # Linen names submodules after their class: keep the original name so parameter paths (and
    # checkpoints) are the same with and without auto.
    sub.__name__, sub.__qualname__ = cls.__name__, cls.__qualname__
    setattr(sub, _ATTR, (planner, cls))
    return sub


def unwrap(target: Any) -> Any:
    """Undo `auto`: the original function or class; an nnx instance gets its class back."""
    found = getattr(target, _ATTR, None) if not _is_module_instance(target) else getattr(type(target), _ATTR, None)
    if found is None:
        raise ValueError(f"remat_kit.unwrap({target!r:.80}): not made by remat_kit.auto; nothing to undo.")
    if _is_module_instance(target):
        target.__class__ = found[1]
        return target
    return found[1]


def _is_module_instance(target: Any) -> bool:
    return _target_kind(target) in ("nnx_instance", "linen_instance")


def planner_of(target: Any) -> tuple[Planner, Any] | None:
    obj = type(target) if _is_module_instance(target) else target
    return getattr(obj, _ATTR, None)


def plan_of(target: Any) -> list[Plan] | None:
    """The plans cached for `target`, one per input signature in the order they were made; None when
    `auto` did not make it (the front door says so). An nnx / linen class's plans are shared by
    all its instances: they live on the class, as its planner does."""
    found = planner_of(target)
    return None if found is None else list(found[0].cache.values())
