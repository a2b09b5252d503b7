"""A flat view of a jaxpr: nested `jit` / `closed_call` / `checkpoint` calls inlined, one op per
equation, integer variable ids. The cost graph is built from it and the planned function is
re-run from it, so both see the same ops under the same stable names.

Kept as single ops (not inlined): `custom_jvp_call` / `custom_vjp_call` (their own derivative
rules must survive, e.g. `jax.nn.relu`, `jax.nn.softmax`), `scan` (its body is flattened into
`Op.body` so a scanned layer stack can be planned per layer), and every other higher-order
primitive (`while`, `cond`, `shard_map`), which is opaque to the planner.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

# jax renamed `pjit` to `jit` in the jaxpr (0.7); both spellings are inlined.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a Python or numpy scalar baked into the equation)."""

    val: Any
    aval: Any


@dataclasses.dataclass
class Op:
    eqn: Any  # the original JaxprEqn: primitive and params for re-binding
    ins: tuple  # int var ids or Lit
    outs: tuple[int, ...]
    scope: str  # the name stack (module path) the op was traced under
    body: FlatFn | None = None  # scan only: the flattened body

    @property
    def prim(self) -> str:
        return self.eqn.primitive.name


@dataclasses.dataclass
class FlatFn:
    invars: list[int]
    outvars: list  # int var ids or Lit
    ops: list[Op]
    avals: dict[int, Any]
    consts: dict[int, Any]  # var id -> constant value (closed-over arrays)


def flatten(closed: Any) -> FlatFn:
    """Flatten a ClosedJaxpr (from `jax.make_jaxpr`)."""
    b = _Builder()
    invars = [b.new(v.aval) for v in closed.jaxpr.invars]
    fn = FlatFn(invars=invars, outvars=[], ops=[], avals=b.avals, consts=b.consts)
    env: dict[Any, Any] = {}
    for v, c in zip(closed.jaxpr.constvars, closed.consts):
        env[v] = b.const(c, v.aval)
    env.update(zip(closed.jaxpr.invars, invars))
    fn.outvars = b.emit(closed.jaxpr, env, fn.ops, "")
    return fn


class _Builder:
    def __init__(self) -> None:
        self.avals: dict[int, Any] = {}
        self.consts: dict[int, Any] = {}

    def new(self, aval: Any) -> int:
        i = len(self.avals)
        self.avals[i] = aval
        return i

    def const(self, value: Any, aval: Any) -> int:
        i = self.new(aval)
        self.consts[i] = value
        return i

    def read(self, env: dict, atom: Any) -> Any:
        if isinstance(atom, jcore.Literal):
            return Lit(atom.val, atom.aval)
        return env[atom]

    def emit(self, jaxpr: Any, env: dict, ops: list[Op], scope: str) -> list:
        for eqn in jaxpr.eqns:
            ins = tuple(self.read(env, a) for a in eqn.invars)
            name_stack = str(eqn.source_info.name_stack)
            here = "/".join(s for s in (scope, name_stack) if s)
            key = _CALLS.get(eqn.primitive.name)
            if key is not None and key in eqn.params:
                inner = eqn.params[key]
                inner_jaxpr = getattr(inner, "jaxpr", inner)
                inner_env: dict[Any, Any] = {}
                for v, c in zip(inner_jaxpr.constvars, getattr(inner, "consts", ())):
                    inner_env[v] = self.const(c, v.aval)
                inner_env.update(zip(inner_jaxpr.invars, ins))
                outs = self.emit(inner_jaxpr, inner_env, ops, here)
                for v, o in zip(eqn.outvars, outs):
                    env[v] = o
                continue
            body = None
            if eqn.primitive.name == "scan":
                body = flatten(eqn.params["jaxpr"])
            outs = tuple(self.new(v.aval) for v in eqn.outvars)
            env.update(zip(eqn.outvars, outs))
            ops.append(Op(eqn=eqn, ins=ins, outs=outs, scope=here, body=body))
        return [self.read(env, a) for a in jaxpr.outvars]


def op_names(fn: FlatFn) -> list[str]:
    """Stable names, one per op: `<module path>/<primitive>:<index>`; the index is the op's position
    in the flat forward order, so names survive a re-trace of the same function and signature."""
    return [f"{op.scope + '/' if op.scope else ''}{op.prim}:{k}" for k, op in enumerate(fn.ops)]


def bind(op: Op, invals: Sequence[Any]) -> list[Any]:
    """Run one op's original equation on new operands (as `jax.core.eval_jaxpr` does)."""
    eqn = op.eqn
    bound = eqn.primitive.get_bind_params(eqn.params)
    # jax < 0.7 returned (subfuns, params); newer releases return the params alone.
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    ctx = getattr(eqn, "ctx", None)
    with ctx.manager if ctx is not None else contextlib.nullcontext():
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def run(
    fn: FlatFn,
    args: Sequence[Any],
    *,
    ops: Sequence[int] | None = None,
    env: dict[int, Any] | None = None,
    after: Callable[[int, list[Any]], list[Any]] | None = None,
    run_scan: Callable[[int, Op, list[Any]], list[Any]] | None = None,
) -> dict[int, Any]:
    """Evaluate (a subset of) the flat ops; returns the environment of var id -> value.

    `after(k, outs)` may replace op k's outputs (to tag them with `checkpoint_name`);
    `run_scan(k, op, invals)` runs scan ops (to re-plan their body).
    """
    env = {} if env is None else env
    if not env:
        env.update(fn.consts)
        env.update(zip(fn.invars, args))
    for k in range(len(fn.ops)) if ops is None else ops:
        op = fn.ops[k]
        invals = [a.val if isinstance(a, Lit) else env[a] for a in op.ins]
        if op.body is not None and run_scan is not None:
            outs = run_scan(k, op, invals)
        else:
            outs = bind(op, invals)
        if after is not None:
            outs = after(k, outs)
        env.update(zip(op.outs, outs))
    return env


def read_outs(fn: FlatFn, env: dict[int, Any]) -> list[Any]:
    return [a.val if isinstance(a, Lit) else env[a] for a in fn.outvars]


def trace(f: Callable, *args: Any) -> tuple[FlatFn, Any]:
    """Trace `f(*args)` (args flat arrays or ShapeDtypeStructs) to a flat function and its out tree."""
    out_tree = []

    def flat_f(*a):
        out = f(*a)
        leaves, tree = jax.tree_util.tree_flatten(out)
        out_tree.append(tree)
        return leaves

    closed = jax.make_jaxpr(flat_f)(*args)
    return flatten(closed), out_tree[0]
