"""Per-op facts the cost graph needs: op kind, FLOPs, per-device bytes, and which operands the
op's backward reads (its residuals), the last asked of JAX itself rather than a hand table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from remat_kit._core.graph import OpKind

# `jax.core.Tracer` is the public spelling in jax 0.10 / 0.11; fall back to the private one if a
# later release drops it from `jax.core` (as it did `jax.core.get_aval` in 0.10).
Tracer = getattr(jax.core, "Tracer", None)
if Tracer is None:  # pragma: no cover - depends on the jax version
    from jax._src.core import Tracer

_VIEW = {
    "reshape",
    "broadcast_in_dim",
    "transpose",
    "squeeze",
    "expand_dims",
    "slice",
    "dynamic_slice",
    "copy",
    "copy_p",
    "name",
    "concatenate",
    "pad",
    "rev",
    "reduce_precision",
    "sharding_constraint",
    "optimization_barrier",
    "stop_gradient",
}
_RNG = {"random_bits", "random_split", "random_fold_in", "random_wrap", "random_unwrap", "random_seed", "threefry2x32"}
_REDUCE = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "argmax",
    "argmin",
    "cumsum",
    "cumlogsumexp",
    "cummax",
    "reduce_and",
    "reduce_or",
}
# Ops whose output XLA writes to a buffer of its own rather than fusing it into its consumers:
# matmul-like ops; and an expensive elementwise op read by a reduction and by another op (a
# softmax's exp: XLA duplicates cheap producers into each consuming fusion, not expensive ones).
_UNFUSED = {"dot_general", "conv_general_dilated", "ragged_dot", "sort"}
_EXPENSIVE = {"exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "erf", "pow", "atan2", "sin", "cos"}
_SUBJAXPRS = ("call_jaxpr", "fun_jaxpr", "jaxpr", "branches", "cond_jaxpr", "body_jaxpr")


def nbytes(aval: Any) -> int:
    shape = getattr(aval, "shape", None)
    if shape is None:
        return 0
    dtype = aval.dtype
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys): their storage is uint32 words
        itemsize = 8 if "key" in str(dtype) else 4
    return int(math.prod(shape)) * itemsize


def is_float(aval: Any) -> bool:
    try:
        return bool(jnp.issubdtype(aval.dtype, jnp.inexact))
    except TypeError:
        return False


def is_integer(aval: Any) -> bool:
    """Integers and booleans (not PRNG keys)."""
    try:
        return bool(jnp.issubdtype(aval.dtype, jnp.integer) or jnp.issubdtype(aval.dtype, jnp.bool_))
    except (TypeError, AttributeError):
        return False


def op_kind(prim: str, scope: str) -> OpKind:
    if prim in ("dot_general", "conv_general_dilated", "ragged_dot"):
        return OpKind.MATMUL
    if prim in _RNG:
        return OpKind.RNG
    if prim == "rsqrt" or "norm" in scope.lower():
        return OpKind.NORM
    if prim in _VIEW:
        return OpKind.VIEW
    if prim in _REDUCE:
        return OpKind.REDUCTION
    if prim == "gather":
        return OpKind.EMBEDDING
    return OpKind.ELEMENTWISE


def eqn_flops(eqn: Any) -> int:
    """FLOPs of one equation; call-like and loop primitives count their bodies (scans x length)."""
    prim = eqn.primitive.name
    out = [v.aval for v in eqn.outvars]
    ins = [v.aval for v in eqn.invars]
    if prim == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        k = math.prod(ins[0].shape[d] for d in lc)
        return 2 * int(math.prod(out[0].shape)) * int(k)
    if prim == "conv_general_dilated":
        rhs = ins[1].shape
        out_feat = rhs[eqn.params["dimension_numbers"].rhs_spec[0]] if eqn.params.get("dimension_numbers") else rhs[0]
        return 2 * int(math.prod(out[0].shape)) * int(math.prod(rhs) // max(out_feat, 1))
    inner = 0
    found = False
    for key in _SUBJAXPRS:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        subs = sub if isinstance(sub, (tuple, list)) else (sub,)
        for s in subs:
            jaxpr = getattr(s, "jaxpr", s)
            if hasattr(jaxpr, "eqns"):
                found = True
                inner = max(inner, jaxpr_flops(jaxpr)) if key == "branches" else inner + jaxpr_flops(jaxpr)
    if found:
        return inner * int(eqn.params.get("length", 1))
    if prim in _VIEW or prim in _RNG:
        return 0
    if prim in _REDUCE:
        return sum(int(math.prod(a.shape)) for a in ins if hasattr(a, "shape"))
    return sum(int(math.prod(a.shape)) for a in out if hasattr(a, "shape"))


def jaxpr_flops(jaxpr: Any) -> int:
    return sum(eqn_flops(e) for e in jaxpr.eqns)


def _hashable(params: dict) -> Any:
    try:
        key = tuple(sorted(params.items()))
        hash(key)
        return key
    except TypeError:
        return None


def backward_reads(eqn: Any, diff: tuple[bool, ...]) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Which operands (input positions) and outputs (output positions) the op's VJP keeps, as
    the op runs in a planned program: inside `jax.checkpoint` with `save_only_these_names`, its
    operands and outputs tagged by `checkpoint_name` (`_run.py`).

    Asked of JAX: trace a plain `jax.vjp` of the single equation and take the operands its
    residuals are computed from. A rule that reads its own output (tanh, exp, logistic, rsqrt:
    ``1 - y**2``) reads the primitive's raw output, which no name tags, so under the policy JAX
    recomputes the op from its operands in the backward and saves those (checked with
    `print_saved_residuals` on jax 0.10 and 0.12); an op's own output is never what it reads.
    Charged to the output, the model counted a saved tanh as serving its backward and a saved
    operand as free; the compiled step kept both (measured on the bench's GELU, one more
    (seq, 4d) buffer per layer than the model, `reports/jax/first_call.md`). The probe itself
    has no checkpoint, so it reads the same under `JAX_REMAT3`, whose checkpoint hides tags
    behind its own call primitive.
    Returns (input positions, output positions, exact) where `exact` is False for the fallback
    (the op cannot be differentiated in reverse mode: all operands and outputs).
    """
    key = _hashable(eqn.params)
    avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
    if key is None:
        return _reads(eqn, diff)
    full_key = (eqn.primitive, key, avals, diff)
    if full_key not in _READS_CACHE:
        if len(_READS_CACHE) > 8192:
            _READS_CACHE.clear()
        _READS_CACHE[full_key] = _reads(eqn, diff)
    return _READS_CACHE[full_key]


_READS_CACHE: dict[Any, tuple[tuple[int, ...], tuple[int, ...], bool]] = {}


def _reads(eqn: Any, diff: tuple[bool, ...]):
    from remat_kit._jax._trace import Op, bind

    n_in, n_out = len(eqn.invars), len(eqn.outvars)
    everything = (tuple(range(n_in)), tuple(range(n_out)), False)
    if not any(diff) or not any(is_float(v.aval) for v in eqn.outvars):
        return (), (), True
    op = Op(eqn=eqn, ins=(), outs=(), scope="")

    def probe(*ins):
        def f(*d):
            it = iter(d)
            full = [next(it) if diff[i] else ins[i] for i in range(n_in)]
            return bind(op, full)

        out, vjp = jax.vjp(f, *[ins[i] for i in range(n_in) if diff[i]])
        return out, vjp

    specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    try:
        closed = jax.make_jaxpr(probe)(*specs)
    except Exception:  # no reverse-mode rule (while loops, some custom calls): assume it keeps everything
        return everything
    return _operands_behind(closed.jaxpr, n_out), (), True


def _operands_behind(jaxpr: Any, n_out: int) -> tuple[int, ...]:
    """The operands (input positions) the residuals of `_reads`'s probe are computed from: under a
    name policy each residual that is not an operand (the raw output, a derived value) is recomputed
    from them in the backward (see `backward_reads`). A residual built from constants alone costs
    no memory and reads nothing."""
    literal = jax.extend.core.Literal
    behind: dict[Any, frozenset[int]] = {v: frozenset((i,)) for i, v in enumerate(jaxpr.invars)}
    for e in jaxpr.eqns:
        deps = frozenset().union(*(behind.get(a, frozenset()) for a in e.invars if not isinstance(a, literal)))
        behind.update((v, deps) for v in e.outvars)
    reads: set[int] = set()
    for r in jaxpr.outvars[n_out:]:
        if isinstance(r, literal) or not hasattr(r.aval, "shape") or r.aval.shape == ():
            continue
        reads |= behind.get(r, frozenset())
    return tuple(sorted(reads))


def op_of(value_name: str) -> str:
    """The primitive that produced the cost graph's value `value_name` (named `<scope>/<prim>:<k>`,
    `#j` for its j-th output: `_trace.op_names`)."""
    return value_name.rsplit("/", 1)[-1].split("#", 1)[0].rsplit(":", 1)[0]


def materialised(op: str, consumer_ops: Iterable[str]) -> bool:
    """Whether XLA writes `op`'s output to a buffer of its own when these ops read it (`_UNFUSED`)."""
    if op in _UNFUSED:
        return True
    consumers = set(consumer_ops)
    return op in _EXPENSIVE and bool(consumers & _REDUCE) and bool(consumers - _REDUCE)
