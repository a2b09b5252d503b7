"""Per-device sizes under SPMD sharding: what one device holds of `auto`'s arguments and of the
values whose sharding the program states, so a plan and its byte budget are per device.

Where an argument's sharding is found, first match wins:

* a concrete `jax.Array` (`auto` called outside `jit`): its `.sharding`;
* a tracer whose aval carries a sharding (explicit axes, `jax.sharding.AxisType.Explicit`):
  `jax.typeof(x).sharding`; such programs state a sharding on every value, read by `divisors`;
* a tracer in the default auto mode carries none (its aval's mesh is empty: "the avals do not
  store accurate sharding information in the (default) auto mode", docs.jax.dev explicit
  sharding), and neither does `jax.sharding.get_abstract_mesh()` under `jit(in_shardings=...)`.
  There the enclosing `jax.jit`'s `in_shardings` (or the committed arrays it was called with)
  are read from that `jit`'s trace (`_enclosing_jit`), for the arguments that are that `jit`'s
  own inputs (through `grad` / `vjp` tracers). jax keeps those in locals of
  `jax._src.pjit._trace_for_jit` and `jax._src.interpreters.partial_eval.trace_to_jaxpr` (jax
  0.10, 0.11; `trace_to_jaxpr_nocache` under 0.12's tracing cache); if a release moves them,
  arguments count whole, and `_verify`'s compiles, which then measure global shapes, are the
  only check left (`tests/test_jax_sharding.py` catches such a move).

Inside the function, `with_sharding_constraint` states a value's sharding; other values take
the largest split of their operands (`_graph`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import jax

from remat_kit._jax._rules import Tracer
from remat_kit._jax._trace import FlatFn


def input_shardings(vals: Sequence[Any]) -> list[Any]:
    """Per argument, its `jax.sharding.Sharding` over more than one device, or None."""
    found: list[Any] = [None] * len(vals)
    pending = []
    for i, x in enumerate(vals):
        if isinstance(x, jax.Array) and not isinstance(x, Tracer):
            found[i] = _multi(getattr(x, "sharding", None))
        elif isinstance(x, Tracer) and _explicit(_aval_sharding(jax.typeof(x))):
            found[i] = _aval_sharding(jax.typeof(x))
        elif isinstance(x, Tracer):
            pending.append(i)
    if pending:
        jit_inputs = _enclosing_jit()
        for i in pending:
            found[i] = _multi(jit_inputs.get(id(_base(vals[i], jit_inputs))))
    return found


def divisor(sharding: Any, shape: Sequence[int]) -> int:
    """How many devices share a value of global `shape`: its size over one device's shard."""
    if sharding is None:
        return 1
    try:
        shard = sharding.shard_shape(tuple(shape))
    except Exception:  # an abstract or unspecified sharding says nothing about the split
        return 1
    return max(1, math.prod(shape) // max(1, math.prod(shard)))


def divisors(fn: FlatFn) -> dict[int, int]:
    """Split factors the program itself states: `with_sharding_constraint` outputs and values
    whose aval has an explicit-axes sharding (every value, in explicit mode)."""
    out: dict[int, int] = {}
    for vid, aval in fn.avals.items():
        sharding = _aval_sharding(aval)
        if _explicit(sharding) and (d := divisor(sharding, aval.shape)) > 1:
            out[vid] = d
    for op in fn.ops:
        if op.prim == "sharding_constraint":
            aval = fn.avals[op.outs[0]]
            out[op.outs[0]] = divisor(op.eqn.params.get("sharding"), aval.shape)
    return out


def spec(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    """The abstract argument to compile a measured step with: one device's view where sharded."""
    return jax.ShapeDtypeStruct(tuple(jax.typeof(x).shape), jax.typeof(x).dtype, sharding=sharding)


def _aval_sharding(aval: Any) -> Any:
    return getattr(aval, "sharding", None)


def _explicit(sharding: Any) -> bool:
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return False
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return any(t == explicit for t in getattr(mesh, "axis_types", ()))


def _multi(sharding: Any) -> Any:
    if isinstance(sharding, jax.sharding.Sharding) and len(sharding.device_set) > 1:
        return sharding
    return None


def _base(x: Any, known: dict[int, Any]) -> Any:
    """The enclosing jit's input tracer under `grad` / `vjp` / `jvp` tracers of it."""
    while id(x) not in known and isinstance(x, Tracer) and hasattr(x, "primal"):
        x = x.primal
    return x


# jax 0.12 wraps `trace_to_jaxpr` in a cache; the frame that holds `in_tracers` is the wrapped one.
_TRACE_FRAMES = ("trace_to_jaxpr", "trace_to_jaxpr_nocache")


def _enclosing_jit() -> dict[int, Any]:
    """id(input tracer) -> sharding, for the innermost `jax.jit` being traced (see the module doc)."""
    frame = sys._getframe(1)
    tracers = None
    while frame is not None:
        code, names = frame.f_code, frame.f_globals.get("__name__", "")
        if tracers is None and code.co_name in _TRACE_FRAMES and names.endswith("partial_eval"):
            tracers = getattr(frame.f_locals.get("in_tracers"), "vals", None)
        elif code.co_name == "_trace_for_jit" and names.endswith("pjit"):
            local = frame.f_locals
            shardings = local.get("in_shardings_flat")
            args = getattr(local.get("args_ft"), "vals", None)
            if tracers is None or shardings is None or args is None or not len(tracers) == len(shardings) == len(args):
                return {}
            out = {}
            for t, s, a in zip(tracers, shardings, args):
                if not isinstance(s, jax.sharding.Sharding) and isinstance(a, jax.Array) and not isinstance(a, Tracer):
                    s = a.sharding  # unspecified in_shardings: jit runs on the committed argument's sharding
                out[id(t)] = s
            return out
        frame = frame.f_back
    return {}
