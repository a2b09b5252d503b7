"""Flat jaxpr -> CostGraph: one value per op output, per-device bytes, residuals asked of JAX,
blocks found from the model's own structure.

Blocks (the unit the chain solver plans and recomputes): every iteration of a top-level `scan`
(the scanned-layers pattern) is one block; outside scans, the ops are cut where a single
differentiable activation crosses (the residual stream between layers) and a new block starts at
every repetition of the most frequent segment that holds a matmul, i.e. at every layer of an
unrolled stack. Only values a gradient flows through count at a cut: a mask or position table
made from integer tokens is read by every layer and would hide every cut. A function with no
repetition is a chain of pieces of about √n ops cut at those points (`_pieces`); one of fewer
than 2 * MIN_PIECE_OPS ops (a layer) is one block.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

from remat_kit._core.graph import CostGraph, OpKind, Role, value
from remat_kit._jax._compat import scan_counts
from remat_kit._jax._rules import backward_reads, eqn_flops, is_float, nbytes, op_kind
from remat_kit._jax._sharding import divisors as stated_divisors
from remat_kit._jax._trace import FlatFn, Lit, op_names

MIN_PIECE_OPS = 16  # a function without repeated layers shorter than twice this is one block


@dataclasses.dataclass
class Traced:
    fn: FlatFn
    out_tree: Any
    graph: CostGraph
    names: list[str]  # top-level op names
    op_block: list[int]  # block of each top-level op (-1 for an expanded scan)
    out_names: dict[tuple[int, int], str]  # (top-level op, output) -> value name
    scans: dict[int, ScanInfo]  # expanded scans by top-level op index
    pieces: bool = False  # some blocks are pieces of an unrepeated run (`_pieces`), not layers


@dataclasses.dataclass
class ScanInfo:
    body_names: list[str]
    blocks: list[int]  # graph block of each iteration
    iter_names: list[dict[tuple[int, int], str]]  # per iteration: (body op, output) -> value name


class _Emitter:
    def __init__(self, divisors: dict[int, int]):
        self.rows: list[dict] = []
        self.grad: dict[str, bool] = {}
        self.kinds: dict[str, OpKind] = {}
        self.acts: set[str] = set()  # activation names (graph inputs and parameters are not)
        self.paramlike: set[str] = set()  # parameters and values computed from parameters alone
        self.div = divisors  # var id -> how many devices a value is split over

    def input(self, name: str, aval: Any, role: Role, divisor: int) -> str:
        self.rows.append(dict(name=name, num_bytes=nbytes(aval) // divisor, role=role, deps=(), bwd_reads=()))
        self.grad[name] = is_float(aval)
        if role is Role.PARAM:
            self.paramlike.add(name)
        return name

    def op(self, op: Any, in_names: list[str | None], base: str, module: str, block: int) -> list[str | None]:
        """Emit values for one op's outputs; `in_names[i]` is None for literals and constants."""
        eqn = op.eqn
        diff = tuple(
            n is not None and self.grad.get(n, False) and is_float(eqn.invars[i].aval) for i, n in enumerate(in_names)
        )
        out_names = [base if j == 0 else f"{base}#{j}" for j in range(len(eqn.outvars))]
        if all(n is None for n in in_names):
            return [None] * len(out_names)  # constant-folded by XLA: no memory of its own
        reads_in, reads_out, _ = backward_reads(eqn, diff)
        in_reads = [in_names[i] for i in reads_in if in_names[i] is not None]
        deps = tuple(dict.fromkeys(n for n in in_names if n is not None))
        div = max([self.div.get(a, 1) for a in op.ins if not isinstance(a, Lit)] + [1])
        kind = op_kind(op.prim, op.scope)
        named = [n for n in in_names if n is not None]
        if named and all(self.kinds.get(n) is OpKind.RNG for n in named):
            kind = OpKind.RNG  # bits -> uniform -> mask: the whole dropout-mask chain replays from the key
        self.kinds.update((n, kind) for n in out_names)
        flops = eqn_flops(eqn) // div // max(len(out_names), 1)
        in_bytes = sum(nbytes(v.aval) for v in eqn.invars) // div
        # XLA fuses the recompute of elementwise, view and reduction ops into the fusion that
        # consumes it, so it adds FLOPs but no memory traffic of its own; matmuls and gathers
        # read their operands again.
        moved = in_bytes if kind in (OpKind.MATMUL, OpKind.EMBEDDING) else 0
        # Slices, transposes and casts of parameters alone are held like the parameters (and are
        # usually fused into their consumers): not activations a plan decides about.
        from_params = (
            bool(named)
            and all(n in self.paramlike for n in named)
            and (kind is OpKind.VIEW or op.prim == "convert_element_type")
        )
        for j, (name, var) in enumerate(zip(out_names, eqn.outvars)):
            self.div[op.outs[j]] = self.div.get(op.outs[j], div)  # a sharding constraint's own split wins
            size = nbytes(var.aval) // self.div[op.outs[j]]
            if from_params:
                self.rows.append(dict(name=name, num_bytes=size, role=Role.INPUT, deps=(), bwd_reads=()))
                self.grad[name] = is_float(var.aval)
                self.paramlike.add(name)
                continue
            self.rows.append(
                dict(
                    name=name,
                    num_bytes=size,
                    kind=kind,
                    flops=flops,
                    deps=deps,
                    # an output may name only itself and earlier outputs (forward order)
                    bwd_reads=tuple(dict.fromkeys(in_reads + [out_names[k] for k in reads_out if k <= j])),
                    bytes_moved=moved + size if moved else 0,
                    module=module,
                    block=block,
                    requires_grad=is_float(var.aval) and any(diff),
                    act_act=op.prim == "dot_general"
                    and sum(n in self.acts and n not in self.paramlike for n in named) == 2,
                )
            )
            self.grad[name] = is_float(var.aval) and any(diff)
            self.acts.add(name)
        return out_names


def build(fn: FlatFn, out_tree: Any, roles: list[Role], divisors: dict[int, int] | None = None) -> Traced:
    """The cost graph of `fn`; `roles[i]` says whether invar i is a parameter or an input."""
    divisors = {**(divisors or {}), **stated_divisors(fn)}
    em = _Emitter(divisors)
    env: dict[int, str | None] = {vid: None for vid in fn.consts}
    for i, (vid, role) in enumerate(zip(fn.invars, roles)):
        env[vid] = em.input(f"arg{i}", fn.avals[vid], role, divisors.get(vid, 1))
    names = op_names(fn)
    op_block = [-1] * len(fn.ops)
    out_names: dict[tuple[int, int], str] = {}
    scans: dict[int, ScanInfo] = {}
    block_names: list[str] = []
    pieces = False
    for kind, ops in _runs(fn):
        if kind == "scan":
            k = ops[0]
            scans[k] = _emit_scan(em, fn.ops[k], names[k], env, block_names)
            continue
        layers, repeated = _layers(fn, ops)
        pieces = pieces or (len(layers) > 1 and not repeated)
        for layer in layers:
            blk = len(block_names)
            block_names.append(names[layer[0]].rsplit(":", 1)[0] + f"@{blk}")
            for k in layer:
                op = fn.ops[k]
                outs = em.op(op, [None if isinstance(a, Lit) else env[a] for a in op.ins], names[k], op.scope, blk)
                op_block[k] = blk
                for j, (vid, n) in enumerate(zip(op.outs, outs)):
                    env[vid] = n
                    if n is not None:
                        out_names[(k, j)] = n
    _mark_attention(em.rows)
    # Blocks without activations (constants only) are dropped; the rest are renumbered densely.
    used = sorted({r["block"] for r in em.rows if "block" in r and r.get("role", Role.ACTIVATION) is Role.ACTIVATION})
    renumber = {b: i for i, b in enumerate(used)}
    for r in em.rows:
        if "block" in r:
            r["block"] = renumber.get(r["block"], 0)
    op_block = [renumber.get(b, -1) if b >= 0 else -1 for b in op_block]
    for info in scans.values():
        info.blocks = [renumber.get(b, -1) for b in info.blocks]
    vals = [value(**{k: v for k, v in r.items() if k != "act_act"}) for r in em.rows]
    graph = CostGraph(vals, block_names=[block_names[b] for b in used] or None)
    return Traced(
        fn=fn,
        out_tree=out_tree,
        graph=graph,
        names=names,
        op_block=op_block,
        out_names=out_names,
        scans=scans,
        pieces=pieces,
    )


def _runs(fn: FlatFn) -> list[tuple[str, list[int]]]:
    """Top-level ops split into runs of plain ops and single scans (with more than one step)."""
    runs: list[tuple[str, list[int]]] = []
    for k, op in enumerate(fn.ops):
        if op.body is not None and op.eqn.params.get("length", 0) > 1:
            runs.append(("scan", [k]))
        elif runs and runs[-1][0] == "plain":
            runs[-1][1].append(k)
        else:
            runs.append(("plain", [k]))
    return runs


def _emit_scan(em: _Emitter, op: Any, base: str, env: dict, block_names: list[str]) -> ScanInfo:
    """Emit a top-level scan unrolled, one block per iteration, and its stacked outputs."""
    p = op.eqn.params
    (nc, ncarry), body, length = scan_counts(p), op.body, p["length"]
    body_names = op_names(body)
    outer = [None if isinstance(a, Lit) else env[a] for a in op.ins]
    carry = outer[nc : nc + ncarry]
    ys: list[list[str | None]] = [[] for _ in range(len(op.outs) - ncarry)]
    info = ScanInfo(body_names=body_names, blocks=[], iter_names=[])
    order = range(length - 1, -1, -1) if p.get("reverse") else range(length)
    # The body numbers its variables on its own: its split factors live in a dict of their own,
    # seeded from the operands' (a carry's from the previous iteration's output).
    outer_div, body_div = em.div, stated_divisors(body)
    in_div = [1 if isinstance(a, Lit) else outer_div.get(a, 1) for a in op.ins]
    out_div: list[int] = []
    for it in order:
        em.div = {**dict(zip(body.invars, in_div)), **body_div}
        blk = len(block_names)
        block_names.append(f"{base}[{it}]")
        names, res = _emit_iteration(
            em, body, body_names, f"{base}[{it}]", blk, outer[:nc] + carry + outer[nc + ncarry :]
        )
        out_div = [1 if isinstance(a, Lit) else em.div.get(a, 1) for a in body.outvars]
        in_div[nc : nc + ncarry] = out_div[:ncarry]
        carry = res[:ncarry]
        for j, n in enumerate(res[ncarry:]):
            ys[j].append(n)
        info.blocks.append(blk)
        info.iter_names.append(names)
    em.div = outer_div
    for vid, d in zip(op.outs, out_div):
        em.div.setdefault(vid, d)
    for vid, n in zip(op.outs[:ncarry], carry):
        env[vid] = n
    for j, vid in enumerate(op.outs[ncarry:]):
        env[vid] = _emit_stacked(em, op, f"{base}/ys{j}", ncarry + j, ys[j], base, len(block_names) - 1)
    return info


def _emit_iteration(
    em: _Emitter, body: Any, body_names: list[str], prefix: str, blk: int, invals: list[str | None]
) -> tuple[dict[tuple[int, int], str], list[str | None]]:
    """One iteration of a scan body as block `blk`: its values' names by (body op, output), and
    the names of the body's outputs."""
    benv: dict[int, str | None] = {vid: None for vid in body.consts}
    benv.update(zip(body.invars, invals))
    names: dict[tuple[int, int], str] = {}
    for m, bop in enumerate(body.ops):
        module = prefix + (f"/{bop.scope}" if bop.scope else "")
        ins = [None if isinstance(a, Lit) else benv[a] for a in bop.ins]
        for j, (vid, n) in enumerate(zip(bop.outs, em.op(bop, ins, f"{prefix}/{body_names[m]}", module, blk))):
            benv[vid] = n
            if n is not None:
                names[(m, j)] = n
    return names, [None if isinstance(a, Lit) else benv[a] for a in body.outvars]


def _emit_stacked(
    em: _Emitter, op: Any, name: str, k: int, deps: list[str | None], module: str, block: int
) -> str | None:
    """The scan's output `k`, the per-iteration `deps` stacked: a view of them (None if none is a value)."""
    deps = [n for n in deps if n is not None]
    if not deps:
        return None
    vid = op.outs[k]
    em.rows.append(
        dict(
            name=name,
            num_bytes=nbytes(op.eqn.outvars[k].aval) // em.div.get(vid, 1),
            kind=OpKind.VIEW,
            deps=tuple(deps),
            bwd_reads=(),
            module=module,
            block=block,
            requires_grad=any(em.grad.get(d, False) for d in deps),
        )
    )
    em.grad[name] = any(em.grad.get(d, False) for d in deps)
    return name


def _layers(fn: FlatFn, ops: list[int]) -> tuple[list[list[int]], bool]:
    """Split a run of plain ops into blocks at repeated layers (see the module docstring); and
    whether repeated layers were found."""
    if len(ops) < 2:
        return ([ops] if ops else []), False
    last_use: dict[int, int] = {}
    for k in ops:
        for a in fn.ops[k].ins:
            if not isinstance(a, Lit):
                last_use[a] = k
    # Only values a gradient flows through count: float values computed from float inputs or
    # parameters. An attention mask or a position table made from integer tokens (Flax lm1b's
    # `decoder_mask`), and dropout bits made from a key, are read by every layer but carry no
    # gradient; they are kept like constants and must not hide the cuts between layers. Nor do
    # values only waiting to be returned (batch-norm statistics a model returns as new state:
    # haiku's ResNet was one block): the function's outputs are not uses here.
    diff = {v for v in fn.invars if is_float(fn.avals[v])}
    live: set[int] = set()
    cuts = []
    for k in ops:
        op = fn.ops[k]
        if any(a in diff for a in op.ins if not isinstance(a, Lit)):
            diff.update(v for v in op.outs if is_float(fn.avals[v]))
            live.update(v for v in op.outs if v in diff and last_use.get(v, -1) > k)
        live = {v for v in live if last_use.get(v, -1) > k}
        if len(live) <= 1:
            cuts.append(k)
    segments, start = [], 0
    pos = {k: i for i, k in enumerate(ops)}
    for k in cuts:
        segments.append(ops[start : pos[k] + 1])
        start = pos[k] + 1
    if start < len(ops):
        segments.append(ops[start:])
    sigs = [
        tuple(
            (fn.ops[k].prim, tuple(tuple(fn.avals[v].shape) for v in fn.ops[k].outs if hasattr(fn.avals[v], "shape")))
            for k in seg
        )
        for seg in segments
    ]
    with_matmul = [s for s in sigs if any(p in ("dot_general", "conv_general_dilated") for p, _ in s)]
    common = Counter(with_matmul).most_common(1)
    if not common or common[0][1] < 2:
        return _pieces(segments), False
    starts = [i for i, s in enumerate(sigs) if s == common[0][0]]
    period = min(b - a for a, b in zip(starts, starts[1:]))
    bounds = [0] + [s for s in starts if s > 0] + [starts[-1] + period]
    blocks = [sum(segments[a:b], []) for a, b in zip(bounds, bounds[1:]) if a < b]
    tail = sum(segments[bounds[-1] :], [])
    return [b for b in blocks + [tail] if b], True


def _pieces(segments: list[list[int]]) -> list[list[int]]:
    """No repeated layer: the run as a chain of pieces cut where one value crosses, each of at
    least max(MIN_PIECE_OPS, √n) ops (n ops in all), so a layer-sized function stays one block
    and a long unrepeated program becomes about √n pieces of √n ops: one checkpoint per piece
    keeps ~√n boundaries and recomputes one piece at a time (Chen et al. 2016), and the chain DP
    plans each piece with its own menu (never one op-level program over the whole graph)."""
    total = sum(len(seg) for seg in segments)
    least = max(MIN_PIECE_OPS, math.isqrt(total - 1) + 1 if total else 0)
    pieces: list[list[int]] = []
    for seg in segments:
        if pieces and len(pieces[-1]) < least:
            pieces[-1] = pieces[-1] + seg
        else:
            pieces.append(list(seg))
    if len(pieces) > 1 and len(pieces[-1]) < least:  # a short tail joins the piece before it
        tail = pieces.pop()
        pieces[-1] = pieces[-1] + tail
    return pieces


def _mark_attention(rows: list[dict]) -> None:
    """Megatron's "attention core": activation x activation matmuls (scores, context) and every
    value on a path between two of them in the same block (softmax, its dropout)."""
    by_block: dict[int, list[dict]] = {}
    for r in rows:
        if "block" in r:
            by_block.setdefault(r["block"], []).append(r)
    for members in by_block.values():
        members = [r for r in members if r.get("role", Role.ACTIVATION) is Role.ACTIVATION]
        dots = [r["name"] for r in members if r.get("act_act")]
        if len(dots) < 2:
            continue
        after: set[str] = set(dots)
        for r in members:
            if any(d in after for d in r["deps"]):
                after.add(r["name"])
        before: set[str] = set(dots)
        for r in reversed(members):
            if r["name"] in before:
                before.update(r["deps"])
        for r in members:
            if r.get("act_act") or (r["name"] in after and r["name"] in before and r["kind"] is not OpKind.VIEW):
                r["kind"] = OpKind.ATTENTION if r["kind"] is not OpKind.RNG else OpKind.RNG
