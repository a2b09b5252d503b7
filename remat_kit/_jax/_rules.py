"""Per-op facts the cost graph needs: op kind, FLOPs, per-device bytes, and which operands the
op's backward reads (its residuals), the last asked of JAX itself rather than a hand table.
"""

from __future__ import annotations

import math
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

    Asked of JAX: trace `jax.vjp` of the single equation so wrapped and read which tagged values
    it saves. That is not what a plain `jax.vjp` keeps: a rule that reads its own output (tanh,
    exp, logistic, rsqrt: ``1 - y**2``) reads the primitive's raw output, which no name tags, so
    under the policy JAX recomputes the op from its operand in the backward and saves the operand.
    Charged to the output, the model counted a saved tanh as serving its backward and a saved
    operand as free; the compiled step kept both (measured on the bench's GELU, one more
    (seq, 4d) buffer per layer than the model, `reports/jax/first_call.md`).
    A residual traced to no tag (a derived one built from constants is skipped) is charged to
    the output of the same shape, else to the first same-shaped operand.
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
    from jax.ad_checkpoint import checkpoint_name

    from remat_kit._jax._trace import Op, bind

    n_in, n_out = len(eqn.invars), len(eqn.outvars)
    everything = (tuple(range(n_in)), tuple(range(n_out)), False)
    if not any(diff) or not any(is_float(v.aval) for v in eqn.outvars):
        return (), (), True
    op = Op(eqn=eqn, ins=(), outs=(), scope="")
    tags = [f"in{i}" for i in range(n_in)] + [f"out{j}" for j in range(n_out)]
    policy = jax.checkpoint_policies.save_only_these_names(*tags)

    def probe(*ins):
        def f(*d):
            it = iter(d)
            full = [checkpoint_name(next(it) if diff[i] else ins[i], tags[i]) for i in range(n_in)]
            return [checkpoint_name(o, tags[n_in + j]) for j, o in enumerate(bind(op, full))]

        return jax.vjp(jax.checkpoint(f, policy=policy), *[ins[i] for i in range(n_in) if diff[i]])

    specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    try:
        closed = jax.make_jaxpr(probe)(*specs)
    except Exception:  # no reverse-mode rule (while loops, some custom calls): assume it keeps everything
        return everything
    return _tagged_residuals(eqn, closed.jaxpr, n_out, tags)


def _tagged_residuals(eqn: Any, jaxpr: Any, n_out: int, tags: list[str]):
    """(input positions, output positions, True) of the residuals of `_reads`'s probe: each is
    an operand itself, or a tagged value (read back through the policy's `reduce_precision`)."""
    literal = jax.extend.core.Literal
    outs, res = jaxpr.outvars[:n_out], jaxpr.outvars[n_out:]
    in_pos = {v: i for i, v in enumerate(jaxpr.invars)}
    out_pos = {v: j for j, v in enumerate(outs) if not isinstance(v, literal)}
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    dynamic = set(jaxpr.invars)  # a derived residual built from constants alone costs no memory
    for e in jaxpr.eqns:
        if any(not isinstance(a, literal) and a in dynamic for a in e.invars):
            dynamic.update(e.outvars)
    reads_in: set[int] = set()
    reads_out: set[int] = set()
    for r in res:
        if isinstance(r, literal) or not hasattr(r.aval, "shape") or r.aval.shape == () or r not in dynamic:
            continue
        e = producer.get(r)
        while e is not None and e.primitive.name == "reduce_precision":
            r = e.invars[0]
            e = producer.get(r)
        tag = e.params.get("name") if e is not None and e.primitive.name == "name" else None
        if tag in tags:
            k = tags.index(tag)
            if k < len(eqn.invars):
                reads_in.add(k)
            else:
                reads_out.add(k - len(eqn.invars))
        elif r in in_pos:
            reads_in.add(in_pos[r])
        elif r in out_pos:
            reads_out.add(out_pos[r])
        else:
            shape = r.aval.shape
            j = next((j for j, v in enumerate(eqn.outvars) if v.aval.shape == shape), None)
            if j is not None:
                reads_out.add(j)
            else:
                i = next((i for i, v in enumerate(eqn.invars) if getattr(v.aval, "shape", None) == shape), None)
                reads_out.add(0) if i is None else reads_in.add(i)
    return tuple(sorted(reads_in)), tuple(sorted(reads_out)), True
