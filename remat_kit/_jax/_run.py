"""Run a traced function under a plan: `checkpoint_name` tags on what the plan saves, one
`jax.checkpoint` with `save_only_these_names` (or `save_and_offload_only_these_names`) per
checkpointed unit: a block, or a plan segment of consecutive blocks (`Plan.segments`, Chen et
al.'s √n / rotor's multi-block segments). A segment is one checkpoint region over all its ops,
so the boundaries inside it are not tagged and are recomputed from the segment's input in its
backward, exactly as the core's regrouped graph simulates it. On a scan, segments of g
iterations (`scan_group`) regroup the loop: the scanned inputs are reshaped to (L/g, g, ...),
each loop step runs g layers under one checkpoint, and the stacked outputs are reshaped back
(their gradients come back in the (L, ...) layout by the reshape's transpose).

Why blocks outside a scan get a custom VJP: up to jax 0.10, XLA:CPU ran a plain
`jax.checkpoint`'s recompute of unrolled layers early, during the forward (it has no data
dependence on the backward pass, and its `optimization_barrier` is expanded away before
scheduling), so it freed no memory; from jax 0.11 the CPU scheduler keeps it in the backward
(tests/test_jax_auto.py checks both), but the GPU scheduler has the same problem
(jax-ml/jax#20763), so the ordering is kept on every version. The fix
makes every residual the recompute starts from depend on the block's output cotangent
(``r + 0 * ct[0]``; XLA keeps ``x * 0`` for floats because of NaN semantics), so the recompute
of block b cannot start before the backward reaches block b. Inside `scan`, the loop already
orders it, and the body gets a plain `jax.checkpoint`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from remat_kit._core.graph import Role
from remat_kit._core.plan import Decision
from remat_kit._jax._compat import scan_counts
from remat_kit._jax._graph import Traced
from remat_kit._jax._rules import is_float, is_integer
from remat_kit._jax._trace import FlatFn, Lit, read_outs, run


def policy_for(saved: Sequence[str], offloaded: Sequence[str]) -> Any:
    if offloaded:
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(saved),
            names_which_can_be_offloaded=list(offloaded),
            offload_src="device",
            offload_dst="pinned_host",
        )
    return jax.checkpoint_policies.save_only_these_names(*saved)


def saved_values_are_pinned() -> bool:
    """Whether a saved value goes through an `optimization_barrier` before its tag (`_tagger`).

    Why: under `jax_remat3` (`JAX_REMAT3=1`) a value a policy saves is passed on, forward and as
    the residual, as ``reduce_precision(x)`` (jax-ml/jax#22244; a no-op on its own dtype). XLA:CPU
    duplicates a unary elementwise op into every consumer freely, so a saved residual-stream
    ``x = h + f(h)`` is fused into each of its readers and never stored: the step keeps the
    summands instead, one more buffer per saved value, or every layer's branch output through a
    chain of them (reports/jax/first_call.md, "JAX_REMAT3"; tests/test_jax_segments.py). The
    barrier stores `x` as one buffer, which is what the plan saves and the cost model counts.
    Without `jax_remat3` nothing is inserted: what compiles there is unchanged."""
    return bool(getattr(jax.config, "jax_remat3", False))


def _tagger(names_by_out: dict[tuple[int, int], str], decisions: dict[str, Decision]):
    pin = saved_values_are_pinned()

    def after(k: int, outs: list[Any]) -> list[Any]:
        tagged = []
        for j, x in enumerate(outs):
            name = names_by_out.get((k, j))
            if name is not None and decisions.get(name, Decision.SAVE) is not Decision.RECOMPUTE:
                x = checkpoint_name(jax.lax.optimization_barrier(x) if pin else x, name)
            tagged.append(x)
        return tagged

    return after


def run_planned(
    traced: Traced,
    decisions: dict[str, Decision],
    flat_args: Sequence[Any],
    *,
    segments: Sequence[Sequence[str]] = (),
    unroll_scans: bool | int = False,
) -> list[Any]:
    """Evaluate the traced function on `flat_args` with `decisions` applied.

    `segments` is the plan's grouping of blocks into checkpointed units (`Plan.segments`, block
    names; () = one unit per block). `unroll_scans` is for counting FLOPs (XLA's cost analysis
    counts a loop body once): True unrolls the planned scans fully, an int k runs k layers per
    loop step."""
    fn = traced.fn
    env: dict[int, Any] = dict(fn.consts)
    if decisions or segments:
        flat_args = _as_inputs(flat_args)
    env.update(zip(fn.invars, flat_args))
    uses_after = _last_uses(fn)
    for seg_block, ops in _units(traced, segments):
        if seg_block is None:  # an expanded scan
            run(
                fn,
                (),
                ops=ops,
                env=env,
                run_scan=lambda k, op, invals: _run_scan(
                    traced, k, op, invals, decisions, unroll_scans, group=scan_group(traced, k, segments)
                ),
            )
            continue
        names = [traced.out_names.get((k, j)) for k in ops for j in range(len(fn.ops[k].outs))]
        if all(n is None or decisions.get(n, Decision.SAVE) is Decision.SAVE for n in names):
            run(fn, (), ops=ops, env=env)
            continue
        _run_block(traced, ops, env, decisions, uses_after)
    return read_outs(fn, env)


def _as_inputs(args: Sequence[Any]) -> list[Any]:
    """The integer arguments behind an `optimization_barrier`: inputs to XLA, as in `_verify`'s
    measuring compiles. In the user's step some are constants (the counter of an `nnx.Rngs` made
    in the step, a token array closed over), and XLA compiled the same plan larger there: 0.818 of
    no remat at budget 0.8 against 0.75 measured (tests/test_jax_flax.py). The barrier moves no
    data. Floats and keys pass as they are: a float argument behind it is a new value JAX's VJP
    keeps (the residual count `_fit` calibrates by would change), and a key behind it is cloned by
    `random_clone`, which has no derivative rule."""
    args = list(args)
    ints = [i for i, a in enumerate(args) if is_integer(a)]
    for i, a in zip(ints, jax.lax.optimization_barrier([args[i] for i in ints])):
        args[i] = a
    return args


def _units(traced: Traced, segments: Sequence[Sequence[str]] = ()) -> list[tuple[int | None, list[int]]]:
    """Top-level ops in runs, one per checkpointed unit: (first block of the unit, op indices);
    (None, [k]) for an expanded scan. Ops of no block (-1: constants only) between two ops of one
    merged segment run inside it, so a segment stays one region."""
    unit_of = _unit_of_block(traced, segments)
    units = [None if k in traced.scans else unit_of.get(b, b) for k, b in enumerate(traced.op_block)]
    known = [k for k, u in enumerate(units) if u is not None and u >= 0]
    for a, b in itertools.pairwise(known):
        if b > a + 1 and units[a] == units[b] and all(units[k] == -1 for k in range(a + 1, b)):
            units[a + 1 : b] = [units[a]] * (b - a - 1)
    runs: list[tuple[int | None, list[int]]] = []
    for k, u in enumerate(units):
        if u is None:
            runs.append((None, [k]))
        elif runs and runs[-1][0] == u:
            runs[-1][1].append(k)
        else:
            runs.append((u, [k]))
    return runs


def scan_group(traced: Traced, k: int, segments: Sequence[Sequence[str]]) -> int:
    """Layers per loop step of the scan at top-level op `k` under the plan's `segments`: 1 when the
    plan checkpoints its iterations one by one, g when every segment over them spans g consecutive
    iterations of that scan alone (g dividing the scan's length)."""
    if not segments:
        return 1
    names = [traced.graph.block_names[b] for b in traced.scans[k].blocks]
    mine = set(names)
    spans = [seg for seg in segments if mine.intersection(seg)]
    sizes = {len(seg) for seg in spans}
    if [n for seg in spans for n in seg] != names or len(sizes) != 1 or len(names) % next(iter(sizes)):
        raise ValueError(
            f"plan segments {[list(s) for s in spans]!r} do not split the scan's iterations {names} into equal "
            "runs of consecutive iterations (g layers per loop step, g dividing its length); re-plan for this "
            "function and input signature."
        )
    return sizes.pop()


def _unit_of_block(traced: Traced, segments: Sequence[Sequence[str]]) -> dict[int, int]:
    """Block index -> the first block of its plan segment (only blocks in merged segments)."""
    if not segments:
        return {}
    index = {n: b for b, n in enumerate(traced.graph.block_names)}
    flat = [n for seg in segments for n in seg]
    if flat != list(traced.graph.block_names):
        raise ValueError(
            f"plan segments {[list(s) for s in segments]!r} do not cover this function's blocks "
            f"{list(traced.graph.block_names)} in order; re-plan for this function and input signature."
        )
    out: dict[int, int] = {}
    for seg in segments:
        if len(seg) > 1:
            first = index[seg[0]]
            out.update((index[n], first) for n in seg)
    return out


def _last_uses(fn: FlatFn) -> dict[int, int]:
    last: dict[int, int] = {}
    for k, op in enumerate(fn.ops):
        for a in op.ins:
            if not isinstance(a, Lit):
                last[a] = k
    for a in fn.outvars:
        if not isinstance(a, Lit):
            last[a] = len(fn.ops)
    return last


def _run_block(
    traced: Traced, ops: list[int], env: dict[int, Any], decisions: dict[str, Decision], last: dict[int, int]
) -> None:
    fn = traced.fn
    defined = {v for k in ops for v in fn.ops[k].outs}
    inputs = list(dict.fromkeys(a for k in ops for a in fn.ops[k].ins if not isinstance(a, Lit) and a not in defined))
    outputs = [v for v in dict.fromkeys(v for k in ops for v in fn.ops[k].outs) if last.get(v, -1) > ops[-1]]
    block_names = [n for k in ops for j in range(len(fn.ops[k].outs)) if (n := traced.out_names.get((k, j)))]
    saved = [n for n in block_names if decisions.get(n, Decision.SAVE) is Decision.SAVE]
    offloaded = [n for n in block_names if decisions.get(n, Decision.SAVE) is Decision.OFFLOAD]
    tag = _tagger(traced.out_names, decisions)

    def block_fn(*invals):
        local = dict(zip(inputs, invals))
        run(fn, (), ops=ops, env=local, after=tag)
        return [local[v] for v in outputs]

    # Parameters and constants need no ordering: only activations get the cotangent dependence.
    params = {vid for i, vid in enumerate(fn.invars) if traced.graph[f"arg{i}"].role is Role.PARAM}
    exempt = [a in fn.consts or a in params for a in inputs]
    rematted = ordered_remat(block_fn, policy_for(saved, offloaded), exempt)
    outs = rematted(*[env[a] for a in inputs])
    env.update(zip(outputs, outs))


def ordered_remat(f: Any, policy: Any, exempt: Sequence[bool]) -> Any:
    """`jax.checkpoint(f, policy=policy)` whose recompute waits for the output cotangent."""
    ck = jax.checkpoint(f, policy=policy)

    @jax.custom_vjp
    def g(*args):
        return f(*args)

    def fwd(*args):
        out, vjp = jax.vjp(ck, *args)
        leaves, tree = jax.tree_util.tree_flatten(vjp)
        skip = [any(leaf is a for a, e in zip(args, exempt) if e) for leaf in leaves]
        # Static facts for the backward live in this closure (a fresh one per call site).
        static.append((skip, tree))
        return out, leaves

    def bwd(leaves, cts):
        skip, tree = static[0]
        floats = [c for c in jax.tree_util.tree_leaves(cts) if is_float(c) and c.size]
        if floats:
            dep = jnp.ravel(floats[0])[0] * 0
            leaves = [
                leaf if s or not is_float(leaf) or leaf.ndim == 0 else leaf + dep.astype(leaf.dtype)
                for leaf, s in zip(leaves, skip)
            ]
        return tuple(jax.tree_util.tree_unflatten(tree, leaves)(cts))

    static: list[tuple[list[bool], Any]] = []
    g.defvjp(fwd, bwd)
    return g


def _run_scan(
    traced: Traced,
    k: int,
    op: Any,
    invals: list[Any],
    decisions: dict[str, Decision],
    unroll: bool | int = False,
    group: int = 1,
) -> list[Any]:
    """Re-run a top-level scan with its body under one uniform per-layer plan; with `group` g > 1,
    g layers per loop step under one checkpoint (the plan's segments of g iterations): the scanned
    inputs are reshaped to (L/g, g, ...), the step runs its g layers in a Python loop, and its
    outputs are reshaped back, so gradients w.r.t. stacked inputs come back as (L, ...)."""
    from remat_kit._jax._trace import bind

    info = traced.scans[k]
    p = op.eqn.params
    body_decisions, rematted = _body_decisions(traced, info, decisions, group)
    if not rematted and not unroll:
        return bind(op, invals)
    body = op.body
    tag = _tagger(
        {key: info.body_names[key[0]] + (f"#{key[1]}" if key[1] else "") for key in info.iter_names[0]}, body_decisions
    )
    (nc, ncarry), length = scan_counts(p), p["length"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]

    def layer(carry, x, consts=consts):
        env = run(body, list(consts) + list(carry) + list(x), after=tag)
        outs = read_outs(body, env)
        return outs[:ncarry], outs[ncarry:]

    step = layer if group == 1 else _grouped_step(layer, group, p["reverse"], [jnp.shape(a)[1:] for a in xs])
    if group > 1:  # size-1 axes dropped: XLA:CPU gives (L/g, g, 1, ...) a layout that copies the stacked gradients
        xs = [jnp.reshape(a, (length // group, group, *(d for d in jnp.shape(a)[1:] if d != 1))) for a in xs]
    if rematted:
        step = _checkpointed_step(step, body_decisions, p.get("unroll", 1), unroll, ncarry, consts, group)
    # `unroll` True: fully; an int k > 1: k layers per loop step (FLOPs by difference, see benchmarks)
    steps = p.get("unroll", 1) if not unroll else (unroll if unroll is True else max(1, unroll // group))
    carry, ys = jax.lax.scan(step, list(init), list(xs), length=length // group, reverse=p["reverse"], unroll=steps)
    if group > 1:
        ys = [jnp.reshape(y, (length, *jnp.shape(y)[2:])) for y in ys]
    return list(carry) + list(ys)


def _body_decisions(
    traced: Traced, info: Any, decisions: dict[str, Decision], group: int
) -> tuple[dict[str, Decision], bool]:
    """The scan body's decisions by body-local name (the first iteration's: the plan is uniform;
    in a group, the first iteration's carry out is an inner boundary), and whether the body is
    checkpointed at all."""
    first = info.iter_names[0]
    graph = traced.graph

    def local(m: int, j: int) -> str:
        return info.body_names[m] + (f"#{j}" if j else "")

    body = {local(m, j): decisions.get(name, Decision.SAVE) for (m, j), name in first.items()}
    rematted = group > 1 or any(d is not Decision.SAVE for d in body.values())
    if rematted:
        # Slices and casts of the scanned parameters are not activations (the graph holds them as
        # inputs): a checkpointed body re-slices them in its backward rather than saving them, which
        # would stack a copy of every layer's parameters as residuals.
        body.update(
            {local(m, j): Decision.RECOMPUTE for (m, j), name in first.items() if not graph[name].is_activation}
        )
    return body, rematted


def _checkpointed_step(
    step: Any,
    body_decisions: dict[str, Decision],
    user_unroll: bool | int,
    unroll: bool | int,
    ncarry: int,
    consts: Sequence[Any],
    group: int,
) -> Any:
    """The loop step under the body's plan: unrolled (for counting FLOPs, or by the user, as
    penzai's LayerStack scans with unroll=True), straight-line code where XLA would run a plain
    checkpoint's recompute in the forward, as on unrolled layers (see the module doc), so it
    is ordered; inside a rolled scan the loop orders the recompute and no CSE prevention is
    needed."""
    saved = [n for n, d in body_decisions.items() if d is Decision.SAVE]
    offloaded = [n for n, d in body_decisions.items() if d is Decision.OFFLOAD]
    policy = policy_for(saved, offloaded)
    if unroll is True or (
        not unroll and (user_unroll is True or (not isinstance(user_unroll, bool) and user_unroll > 1))
    ):
        return _flat_ordered(step, policy, ncarry, consts)
    return jax.checkpoint(step, policy=policy, prevent_cse=group > 1)


def _grouped_step(layer: Any, group: int, reverse: bool, shapes: Sequence[tuple]) -> Any:
    """One loop step of `group` layers: iteration j of the step gets slice j of each scanned input,
    in its per-layer `shapes` (in reverse order for a reverse scan, as the scan itself runs them)."""

    def step(carry, xg, **consts):
        ys: list[Any] = [None] * group
        for j in reversed(range(group)) if reverse else range(group):
            carry, ys[j] = layer(carry, [jnp.reshape(a[j], shape) for a, shape in zip(xg, shapes)], **consts)
        return carry, [jnp.stack([y[i] for y in ys]) for i in range(len(ys[0]))]

    return step


def _flat_ordered(step: Any, policy: Any, ncarry: int, consts: Sequence[Any] = ()) -> Any:
    """`step` under `ordered_remat`; the scan's consts are passed in explicitly (a custom VJP may
    not close over values it is differentiated with respect to: parameters a body closes over)."""
    nc = len(consts)

    def flat(*vals):
        carry, ys = step(list(vals[nc : nc + ncarry]), list(vals[nc + ncarry :]), consts=list(vals[:nc]))
        return list(carry) + list(ys)

    def wrapped(carry, x):
        rematted = ordered_remat(flat, policy, [True] * nc + [False] * (len(carry) + len(x)))
        outs = rematted(*consts, *carry, *x)
        return outs[:ncarry], outs[ncarry:]

    return wrapped
