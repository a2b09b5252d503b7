"""Run a plan: the op table of each planned region (`regions`), and how a region runs.

A layer the plan keeps whole gets no region (it runs as the user wrote it). A region whose plan
keeps nothing inside it runs as plain non-reentrant `torch.utils.checkpoint` (no dispatch mode)
where that is predicted faster than skipping the ops its backward does not need (`regions(plain=)`,
priced in _layerplan.py); only there and in selective regions do the op-indexed modes of
_modes.py run, which keep and recompute exactly what the plan says.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import noop_context_fn

from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import decision_codes, needed_and_recomputed
from remat_kit._torch._compiled import run_compiled
from remat_kit._torch._graph import Segment, TorchGraph
from remat_kit._torch._modes import CACHE, RUN, SKIP, OpSequenceError, Region, Step, _ForwardMode, _ReplayMode, _State
from remat_kit._torch._trace import Profile

__all__ = [
    "CACHE",
    "RUN",
    "SKIP",
    "OpSequenceError",
    "Region",
    "SegmentRun",
    "Step",
    "_ForwardMode",
    "_ReplayMode",
    "_State",
    "decisions_for_torch",
    "regions",
    "run_region",
]
_OFFLOAD_CODE = 2


def _units(tg: TorchGraph, plan: Plan) -> list[tuple[int, Segment, list[Segment]]]:
    """(block of the plan's graph, the profile segment it spans, the segments it covers): one per
    layer, or one per plan segment of consecutive layers (spanning their ops, named "a+b")."""
    by_name = {s.name: s for s in tg.segments}
    groups = plan.segments or tuple((n,) for n in tg.graph.block_names)
    out = []
    for k, names in enumerate(groups):
        segs = [by_name[n] for n in names]
        out.append((k, dataclasses.replace(segs[0], name="+".join(names), stop=segs[-1].stop), segs))
    return out


def regions(
    tg: TorchGraph, plan: Plan, profile: Profile, plain: Callable[[Region], bool] | None = None
) -> dict[str, Region]:
    """The checkpoint regions a plan needs, keyed by (first) module path; regions that keep all are
    left out. A region that keeps nothing inside it runs as plain checkpoint where `plain(region)`
    says so (default: always)."""
    graph = plan.graph_for(tg.graph)
    codes = decision_codes(graph, plan)
    needed, recomputed = needed_and_recomputed(graph, codes)
    vals = graph.values
    # Only what a region's own backward ops or recomputed ops read is handed back: a layer's
    # output read by the next layer (or the head) is held there. Kept in the cache, it would
    # live on until this region's backward ends, past the backward that last reads it.
    readers = [
        {vals[r].block for r in graph.bwd_readers[i]} | {vals[c].block for c in graph.consumers[i] if recomputed[c]}
        for i in range(len(graph))
    ]
    out: dict[str, Region] = {}
    for block, seg, segs in _units(tg, plan):
        if any(s.module is None for s in segs):
            continue
        # Values a scalar read (`if x.sum() > 0`) sees decide control flow: they are recomputed
        # for real at replay, with everything they are computed from (placeholders would flip
        # the branch).
        real: set[str] = set()
        for op in reversed(profile.ops[seg.start : seg.stop]):
            if op.reads_scalar or any(o in real for o in op.outputs if o is not None):
                real.update(n for n in op.inputs if graph[n].is_activation)
        steps, active = [], False
        for op in profile.ops[seg.start : seg.stop]:
            idx = [graph.index(o) if o is not None else None for o in op.outputs]
            owned = [(j, i) for j, i in enumerate(idx) if i is not None]
            cache, offload = [], []
            if (
                not owned
                or any(recomputed[i] for _, i in owned)
                or op.reads_scalar
                or (real and any(graph.values[i].name in real for _, i in owned))
            ):
                action = RUN
            else:
                for j, i in owned:
                    if needed[i] and block in readers[i]:
                        cache.append(j)
                        if codes[i] == _OFFLOAD_CODE:
                            offload.append(j)
                action = CACHE if cache else SKIP
            active |= any(recomputed[i] or (needed[i] and codes[i] == _OFFLOAD_CODE) for _, i in owned)
            steps.append(
                Step(
                    op.func,
                    action,
                    tuple(cache),
                    tuple(offload),
                    op.is_rng and action != RUN,
                    op.inplace,
                    op.out_spec,
                    op.out_leaves,
                    explicit_generator=op.is_rng and op.draws_explicit_generator,
                    flops=sum(vals[i].flops for _, i in owned),
                    bytes_moved=sum(vals[i].bytes_moved for _, i in owned),
                )
            )
        # A kept value written in place (dropout's mask: empty_like, bernoulli_, div_) is handed
        # back where its storage is first allocated, so the replay holds one copy, not two.
        for k, op in enumerate(profile.ops[seg.start : seg.stop]):
            first = op.creator - seg.start if op.inplace and op.creator is not None else -1
            if not 0 <= first < k:
                continue
            steps[first] = dataclasses.replace(steps[first], written=True)
            if steps[k].action == CACHE and steps[first].action == SKIP and len(steps[first].out_leaves) == 1:
                steps[first] = dataclasses.replace(steps[first], alias_of=k)
        if active:
            members = tuple(s.module for s in segs) if len(segs) > 1 else ()
            region = Region(seg.name, seg.module, tuple(steps), members)
            if not region.needs_modes and (plain is None or plain(region)):
                region = dataclasses.replace(region, plain=True)
            out[seg.module] = region
    return out


# Dynamo cannot trace these dispatch modes. Under torch.compile the plan becomes torch's selective
# checkpoint policy (_compiled.py); only a region it cannot express runs here, as a graph break.
def run_region(region: Region, fn: Any, args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)` as a non-reentrant checkpoint that keeps and recomputes per `region`."""
    if torch.compiler.is_compiling():  # the plan as a policy dynamo traces (issue 12, _compiled.py)
        return run_compiled(region, fn, args, kwargs, eager=_run_region_eager)
    return _run_region_eager(region, fn, args, kwargs)


@torch._dynamo.disable
def _run_region_eager(region: Region, fn: Any, args: tuple, kwargs: dict) -> Any:
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=_contexts(region), preserve_rng_state=True, **kwargs
    )


def _contexts(region: Region) -> Any:
    """checkpoint's `context_fn` for `region`: none for a region that keeps nothing inside."""
    if region.plain:
        return noop_context_fn
    state = _State(region)
    return lambda: (_ForwardMode(state), _ReplayMode(state))


_checkpoint_generator = torch.utils.checkpoint._checkpoint_without_reentrant_generator
_HAS_EARLY_STOP = "early_stop" in inspect.signature(_checkpoint_generator).parameters


class SegmentRun:
    """One checkpoint region over consecutive layers (a plan segment), entered at the first layer's
    call and left after the last layer's: the parent's loop calls the layers one by one, so the
    region is torch's non-reentrant checkpoint generator held open across those calls.

    The recompute runs the layers again in order; a layer's arguments that were outputs of an
    earlier layer of the segment (matched by identity in the forward, held by weak reference so
    no boundary is kept alive) are replaced by the recomputed ones, the others (masks, position
    embeddings: made before the segment) are reused.
    """

    def __init__(self, region: Region):
        self.region = region
        self.forwards: list[Any] = []
        self.calls: list[tuple[Any, list[Any], dict[int, tuple[int, int]]]] = []
        self._outputs: list[list[weakref.ref | None]] = []
        self._gen: Any = None

    @property
    def open(self) -> bool:
        return self._gen is not None

    def expects(self, path: str) -> bool:
        return (
            self.open
            and len(self.forwards) < len(self.region.members)
            and self.region.members[len(self.forwards)] == path
        )

    @torch._dynamo.disable
    def start(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        # fn, preserve_rng_state, context_fn, determinism_check, debug[, early_stop], *args
        head = [self._recompute, True, _contexts(self.region), "default", False] + ([True] if _HAS_EARLY_STOP else [])
        self._gen = _checkpoint_generator(*head, *args, **kwargs)
        next(self._gen)
        return self._run(fn, args, kwargs)

    @torch._dynamo.disable
    def layer(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        kept: list[Any] = []
        inner: dict[int, tuple[int, int]] = {}
        for li, leaf in enumerate(leaves):
            hit = None
            if isinstance(leaf, torch.Tensor):
                hit = next(
                    (
                        (k, j)
                        for k, outs in enumerate(self._outputs)
                        for j, ref in enumerate(outs)
                        if ref is not None and ref() is leaf
                    ),
                    None,
                )
            if hit is None:
                kept.append(leaf)
            else:
                inner[li] = hit
                kept.append(None)
        self.calls.append((spec, kept, inner))
        return self._run(fn, args, kwargs)

    def _run(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            self.close()
            raise
        self.forwards.append(fn)
        self._outputs.append([weakref.ref(t) if isinstance(t, torch.Tensor) else None for t in tree_flatten(out)[0]])
        if len(self.forwards) == len(self.region.members):
            self._outputs = []
            gen, self._gen = self._gen, None
            try:
                next(gen)
            except StopIteration:
                pass
        return out

    def _recompute(self, *args: Any, **kwargs: Any) -> Any:
        out = self.forwards[0](*args, **kwargs)
        outs = [tree_flatten(out)[0]]
        for k, (spec, kept, inner) in enumerate(self.calls, start=1):
            leaves = list(kept)
            for li, (layer, j) in inner.items():
                leaves[li] = outs[layer][j]
            a, kw = tree_unflatten(leaves, spec)
            out = self.forwards[k](*a, **kw)
            outs.append(tree_flatten(out)[0])
        return out

    def close(self) -> None:
        """Leave the region without finishing it (an error, or a forward that stopped early)."""
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()


def decisions_for_torch(tg: TorchGraph, plan: Plan, profile: Profile) -> dict[str, Decision]:
    """Adjust a solver's plan to what these modes can run exactly.

    * All outputs of one op share its fate: if one is recomputed the op runs, so its other needed
      outputs are recomputed too (the simulator then counts the op's FLOPs once, as torch does).
    * A value an in-place op rewrites later cannot be kept as it was: recompute it.
    * Pinned values (outside any checkpoint region) are kept.
    """
    graph = plan.graph_for(tg.graph)
    dec = {n: d for n, d in plan.decisions}
    for name in tg.pinned:
        if dec.get(name) is not None and dec[name] is not Decision.SAVE:
            dec[name] = Decision.SAVE
    for name in profile.mutated_later:
        if name in dec and name not in tg.pinned and dec[name] is not Decision.RECOMPUTE:
            dec[name] = Decision.RECOMPUTE
    free = {graph.values[i].name for i in graph.free_values}
    for _ in range(3):  # coupling can cascade through shared deps; a few rounds settle it
        codes = decision_codes(graph, {n: d for n, d in dec.items() if n in free})
        _, recomputed = needed_and_recomputed(graph, codes)
        changed = False
        for op in profile.ops:
            owned = [o for o in op.outputs if o is not None]
            if len(owned) > 1 and any(recomputed[graph.index(o)] for o in owned):
                for o in owned:
                    if o in free and o not in tg.pinned and dec.get(o) is not Decision.RECOMPUTE:
                        dec[o], changed = Decision.RECOMPUTE, True
        if not changed:
            break
    return {n: d for n, d in dec.items() if n in free}
