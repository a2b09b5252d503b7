"""Run a plan: the op table of each planned region (`regions`), and how a region runs.

A layer the plan keeps whole gets no region (it runs as the user wrote it). A region whose plan
keeps nothing inside it runs as plain non-reentrant `torch.utils.checkpoint` (no dispatch mode)
where that is predicted faster than skipping the ops its backward does not need (`regions(plain=)`,
priced in _layerplan.py); only there and in selective regions do the op-indexed modes of
_modes.py run, which keep and recompute exactly what the plan says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import noop_context_fn

from remat_kit._core.constraints import PlanConstraints
from remat_kit._core.graph import CostGraph
from remat_kit._core.plan import Decision, DecisionCode, Plan
from remat_kit._core.simulate import decision_codes, needed_and_recomputed
from remat_kit._torch import _buffers
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
    "constraints_for_torch",
    "decisions_for_torch",
    "kept_layer_checks",
    "regions",
    "run_checked",
    "run_region",
]
_SAVE, _OFFLOAD = int(DecisionCode.SAVE), int(DecisionCode.OFFLOAD)


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
    fates = _Fates(codes, needed, recomputed, readers)
    out: dict[str, Region] = {}
    for block, seg, segs in _units(tg, plan):
        if any(s.module is None for s in segs):
            continue
        real = _read_by_scalars(graph, profile.ops[seg.start : seg.stop])
        steps, active = [], False
        for op in profile.ops[seg.start : seg.stop]:
            step, runs_planned = _step(graph, op, block, fates, real)
            steps.append(step)
            active |= runs_planned
        _hand_back_where_allocated(steps, profile.ops[seg.start : seg.stop], seg.start)
        if active:
            members = tuple(s.module for s in segs) if len(segs) > 1 else ()
            region = Region(seg.name, seg.module, tuple(steps), members)
            if not region.needs_modes and (plain is None or plain(region)):
                region = dataclasses.replace(region, plain=True)
            out[seg.module] = region
    return out


def kept_layer_checks(tg: TorchGraph, profile: Profile, planned: dict[str, Region]) -> dict[str, Region]:
    """The layers of a plan made from a profile written out from a few layers
    (`Profile.replicated_from`) that no region covers, each as an op table to check its first call
    against (`run_checked`): every op runs as written, nothing is kept or skipped.

    Such a plan holds for a layer only if the layer runs the profiled ops; for a kept layer a
    different sequence means different activation memory than planned (its gradients are its
    own either way), so it is refused, as a region's is, and the step re-planned."""
    if not profile.replicated_from:
        return {}
    covered = {p for key, r in planned.items() for p in (r.members or (key,))}
    out: dict[str, Region] = {}
    for seg in tg.segments:
        if seg.module is None or seg.module == "" or seg.module in covered or seg.module in out:
            continue
        steps = tuple(
            Step(op.func, RUN, (), (), False, op.inplace, op.out_spec, op.out_leaves)
            for op in profile.ops[seg.start : seg.stop]
        )
        out[seg.module] = Region(seg.name, seg.module, steps)
    return out


@torch._dynamo.disable
def run_checked(region: Region, fn: Any, args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)` under the forward mode of `region`, which raises `OpSequenceError` if
    it dispatches other ops than the region's (and does nothing else with them)."""
    with _ForwardMode(_State(region)):
        return fn(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Fates:
    """Per value of the plan's graph: its code, whether the backward needs it, whether it is
    recomputed, and the blocks whose backward or recompute reads it."""

    codes: list[int]
    needed: list[bool]
    recomputed: list[bool]
    readers: list[set[int]]


def _read_by_scalars(graph: CostGraph, ops: Sequence[Any]) -> set[str]:
    """Values a scalar read (`if x.sum() > 0`) sees, with everything they are computed from: they
    decide control flow, so they are recomputed for real at replay (placeholders would flip the
    branch)."""
    real: set[str] = set()
    for op in reversed(ops):
        if op.reads_scalar or any(o in real for o in op.outputs if o is not None):
            real.update(n for n in op.inputs if graph[n].is_activation)
    return real


def _step(graph: CostGraph, op: Any, block: int, fates: _Fates, real: set[str]) -> tuple[Step, bool]:
    """The replay's step for one op, and whether the plan recomputes or offloads an output of it."""
    idx = [graph.index(o) if o is not None else None for o in op.outputs]
    owned = [(j, i) for j, i in enumerate(idx) if i is not None]
    needed, recomputed, codes = fates.needed, fates.recomputed, fates.codes
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
            if needed[i] and block in fates.readers[i]:
                cache.append(j)
                if codes[i] == _OFFLOAD:
                    offload.append(j)
        action = CACHE if cache else SKIP
    step = Step(
        op.func,
        action,
        tuple(cache),
        tuple(offload),
        op.is_rng and action != RUN,
        op.inplace,
        op.out_spec,
        op.out_leaves,
        explicit_generator=op.is_rng and op.draws_explicit_generator,
        flops=sum(graph.values[i].flops for _, i in owned),
        bytes_moved=sum(graph.values[i].bytes_moved for _, i in owned),
    )
    return step, any(recomputed[i] or (needed[i] and codes[i] == _OFFLOAD) for _, i in owned)


def _hand_back_where_allocated(steps: list[Step], ops: Sequence[Any], start: int) -> None:
    """A kept value written in place (dropout's mask: empty_like, bernoulli_, div_) is handed back
    where its storage is first allocated, so the replay holds one copy, not two."""
    for k, op in enumerate(ops):
        first = op.creator - start if op.inplace and op.creator is not None else -1
        if not 0 <= first < k:
            continue
        steps[first] = dataclasses.replace(steps[first], written=True)
        if steps[k].action == CACHE and steps[first].action == SKIP and len(steps[first].out_leaves) == 1:
            steps[first] = dataclasses.replace(steps[first], alias_of=k)


# Dynamo cannot trace these dispatch modes. Under torch.compile the plan becomes torch's selective
# checkpoint policy (_compiled.py); only a region it cannot express runs here, as a graph break.
def run_region(region: Region, fn: Any, args: tuple, kwargs: dict, buffers: Sequence[torch.Tensor] = ()) -> Any:
    """`fn(*args, **kwargs)` as a non-reentrant checkpoint that keeps and recomputes per `region`;
    the recompute leaves `buffers` (the region's modules') as the forward left them."""
    if torch.compiler.is_compiling():  # the plan as a policy dynamo traces (issue 12, _compiled.py)
        return run_compiled(region, fn, args, kwargs, eager=functools.partial(_run_region_eager, buffers=buffers))
    return _run_region_eager(region, fn, args, kwargs, buffers)


@torch._dynamo.disable
def _run_region_eager(region: Region, fn: Any, args: tuple, kwargs: dict, buffers: Sequence[torch.Tensor] = ()) -> Any:
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=_contexts(region, buffers), preserve_rng_state=True, **kwargs
    )


def _contexts(region: Region, buffers: Sequence[torch.Tensor] = ()) -> Any:
    """checkpoint's `context_fn` for `region`: none for a region that keeps nothing inside and
    writes no buffer; a recompute puts back what it wrote (BatchNorm's running statistics)."""
    if region.plain:
        inner = noop_context_fn
    else:
        state = _State(region)
        inner = lambda: (_ForwardMode(state), _ReplayMode(state))  # noqa: E731
    if not buffers:
        return inner

    def with_buffers() -> tuple[Any, Any]:
        forward, recompute = inner()
        return forward, _recompute_keeping(recompute, buffers)

    return with_buffers


@contextlib.contextmanager
def _recompute_keeping(recompute: Any, buffers: Sequence[torch.Tensor]) -> Iterator[None]:
    with _buffers.kept(buffers), recompute:
        yield


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

    def __init__(self, region: Region, buffers: Sequence[torch.Tensor] = ()):
        self.region, self.buffers = region, buffers
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
        head = [self._recompute, True, _contexts(self.region, self.buffers), "default", False] + (
            [True] if _HAS_EARLY_STOP else []
        )
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


def constraints_for_torch(tg: TorchGraph, profile: Profile) -> PlanConstraints:
    """What the replay modes can run, as constraints for the solver (so its plan runs as is):

    * pinned values (outside any checkpoint region) are saved: autograd keeps them there;
    * a value an in-place op rewrites later cannot be kept as it was: it is recomputed;
    * all outputs of one op share its fate: if one is recomputed the op runs, so its other
      needed outputs are recomputed too (the simulator counts the op's FLOPs once: they are on
      its first output).
    """
    key = ("torch_constraints", id(profile))
    cached = tg.graph._cache.get(key)
    if cached is not None and cached[0] is profile:
        return cached[1]
    names = {v.name for v in tg.graph.values if v.is_activation}
    groups = []
    for op in profile.ops:
        owned = frozenset(o for o in op.outputs if o is not None and o in names)
        if len(owned) > 1:
            groups.append(owned)
    found = PlanConstraints(
        must_save=tg.pinned & names,
        must_recompute=frozenset(n for n in profile.mutated_later if n in names and n not in tg.pinned),
        same_fate=tuple(groups),
    )
    tg.graph._cache[key] = (profile, found)  # the profile held, so its id stays its own
    return found


def decisions_for_torch(tg: TorchGraph, plan: Plan, profile: Profile) -> dict[str, Decision]:
    """A plan built by rule (whole layers, a test's hand-made plan) settled to what the replay
    runs (`constraints_for_torch`: pinned values saved, values rewritten in place recomputed, an
    op's needed outputs recomputed together). The solver's plans honour these as they come."""
    graph = plan.graph_for(tg.graph)
    codes = {graph.index(n): int(DecisionCode.of(d)) for n, d in plan.decisions if d is not Decision.SAVE}
    settled = constraints_for_torch(tg, profile).on(graph).settle(graph, codes, graph.activations)
    if settled is None:
        raise ValueError(
            "decisions_for_torch: the plan recomputes an output of an op whose other output is pinned (saved "
            "outside any checkpoint region); no plan the replay runs does that."
        )
    return {graph.values[i].name: DecisionCode(settled.get(i, _SAVE)).decision for i in graph.free_values}
