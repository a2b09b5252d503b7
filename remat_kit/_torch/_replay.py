"""Run a plan: per-region op tables and the two dispatch modes a non-reentrant checkpoint enters.

Why not `create_selective_checkpoint_contexts` alone: torch's SAC replays *every* op of the
region up to its last saved tensor, including ops whose outputs no backward needs (the input of
a dropout whose mask is kept, say), and a cached RNG op does not advance the generator, so a
later recomputed dropout would draw a different mask. The memory model (remat_kit._core.simulate)
recomputes only what the backward needs. These modes do exactly that, by op index, like SAC:

* RUN: the op is recomputed (its output is needed and planned RECOMPUTE), or it is a view.
* CACHE: its needed outputs were kept (or offloaded) in the forward and are handed back.
* SKIP: nothing downstream needs it; an uninitialised placeholder of the right shape flows on.
  Placeholders share one buffer per device, so a replay does not hold every skipped output the
  region's code still refers to (the simulator counts none of them). The buffer is the storage
  of the largest value the region kept, which is alive through the replay anyway, or, if none
  is large enough, one allocation of the region's largest placeholder. Nothing writes into
  placeholders (nothing reads them but views): one that a later in-place op writes gets
  storage of its own.

An RNG op that is not RUN restores the generator state it left in the forward, so every
recomputed RNG op draws exactly the numbers it drew the first time (same masks, same gradients).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import _needed_and_recomputed, decision_codes
from remat_kit._torch._compiled import run_compiled
from remat_kit._torch._graph import Segment, TorchGraph
from remat_kit._torch._profile import Profile, ignored

RUN, CACHE, SKIP = "run", "cache", "skip"
_OFFLOAD_CODE = 2


class OpSequenceError(RuntimeError):
    """The forward dispatched different ops than the profile the plan was made from."""


@dataclasses.dataclass(frozen=True)
class Step:
    func: str
    action: str
    cache: tuple[int, ...]  # tensor-leaf indices kept in the forward
    offload: tuple[int, ...]  # of those, the ones moved to host memory
    restore_rng: bool
    inplace: bool
    out_spec: Any
    out_leaves: tuple[Any, ...]
    alias_of: int | None = None  # SKIP op allocating a storage whose final in-place version is kept
    written: bool = False  # a later in-place op writes its output: its placeholder is not shared


@dataclasses.dataclass(frozen=True)
class Region:
    name: str  # block name
    module: str  # module path whose forward is checkpointed ("" = the root); the first of `members`
    steps: tuple[Step, ...]
    members: tuple[str, ...] = ()  # consecutive layers checkpointed as one region (a plan segment)


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


def regions(tg: TorchGraph, plan: Plan, profile: Profile) -> dict[str, Region]:
    """The checkpoint regions a plan needs, keyed by (first) module path; regions that keep all are
    left out."""
    graph = plan.graph_for(tg.graph)
    codes = decision_codes(graph, plan)
    needed, recomputed = _needed_and_recomputed(graph, codes)
    vals = graph.values
    # Only what a region's own backward ops or recomputed ops read is handed back: a layer's
    # output read by the next layer (or the head) is held there. Kept in the cache, it would
    # live on until this region's backward ends, past the backward that last reads it.
    readers = [{vals[r].block for r in graph.bwd_readers[i]}
               | {vals[c].block for c in graph.consumers[i] if recomputed[c]} for i in range(len(graph))]
    out: dict[str, Region] = {}
    for block, seg, segs in _units(tg, plan):
        if any(s.module is None for s in segs):
            continue
        # Values a scalar read (`if x.sum() > 0`) sees decide control flow: they are recomputed
        # for real at replay, with everything they are computed from (placeholders would flip
        # the branch).
        real: set[str] = set()
        for op in reversed(profile.ops[seg.start:seg.stop]):
            if op.reads_scalar or any(o in real for o in op.outputs if o is not None):
                real.update(n for n in op.inputs if graph[n].is_activation)
        steps, active = [], False
        for op in profile.ops[seg.start:seg.stop]:
            idx = [graph.index(o) if o is not None else None for o in op.outputs]
            owned = [(j, i) for j, i in enumerate(idx) if i is not None]
            cache, offload = [], []
            if not owned or any(recomputed[i] for _, i in owned) or op.reads_scalar or (
                    real and any(graph.values[i].name in real for _, i in owned)):
                action = RUN
            else:
                for j, i in owned:
                    if needed[i] and block in readers[i]:
                        cache.append(j)
                        if codes[i] == _OFFLOAD_CODE:
                            offload.append(j)
                action = CACHE if cache else SKIP
            active |= any(recomputed[i] or (needed[i] and codes[i] == _OFFLOAD_CODE) for _, i in owned)
            steps.append(Step(op.func, action, tuple(cache), tuple(offload), op.is_rng and action != RUN,
                              op.inplace, op.out_spec, op.out_leaves))
        # A kept value written in place (dropout's mask: empty_like, bernoulli_, div_) is handed
        # back where its storage is first allocated, so the replay holds one copy, not two.
        for k, op in enumerate(profile.ops[seg.start:seg.stop]):
            first = op.creator - seg.start if op.inplace and op.creator is not None else -1
            if not 0 <= first < k:
                continue
            steps[first] = dataclasses.replace(steps[first], written=True)
            if steps[k].action == CACHE and steps[first].action == SKIP and len(steps[first].out_leaves) == 1:
                steps[first] = dataclasses.replace(steps[first], alias_of=k)
        if active:
            members = tuple(s.module for s in segs) if len(segs) > 1 else ()
            out[seg.module] = Region(seg.name, seg.module, tuple(steps), members)
    return out


def _rng_device(step: Step) -> torch.device:
    for leaf in step.out_leaves:
        if isinstance(leaf, tuple) and leaf and leaf[0] == "t":
            return leaf[4]
    return torch.device("cpu")


def _get_rng(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def _mutated_arg(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    for k, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return args[k] if k < len(args) else kwargs[a.name]
    raise OpSequenceError(f"{func} is marked in-place but mutates no argument")


def _whole_storage(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t`'s whole storage, as a flat uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _extent_bytes(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> int:
    if any(n == 0 for n in shape):
        return 0
    return dtype.itemsize * (1 + sum((n - 1) * s for n, s in zip(shape, stride)))


class _State:
    def __init__(self, region: Region):
        self.region = region
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.rng: dict[int, torch.Tensor] = {}
        # Explicit `torch.Generator`s a recomputed RNG op draws from (torch.bernoulli(p, generator=g)):
        # checkpoint's preserve_rng_state restores the default generators only.
        self.generators: dict[int, list[torch.Tensor]] = {}
        self._scratch_bytes: dict[torch.device, int] | None = None
        self._scratch: dict[torch.device, weakref.ref] = {}
        self._kept: dict[torch.device, weakref.ref] = {}  # largest kept storage per device

    def begin_replay(self) -> None:
        self._scratch = {}
        self._kept = {}
        for tensors in self.cache.values():
            for t in tensors:
                st, best = t.untyped_storage(), self._kept.get(t.device)
                if best is None or best() is None or st.nbytes() > best().nbytes():
                    self._kept[t.device] = weakref.ref(st)

    def placeholder(self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device, shared: bool) -> torch.Tensor:
        """An uninitialised tensor of this layout; `shared` ones are views of the scratch buffer."""
        if not shared or _extent_bytes(shape, stride, dtype) == 0:
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)
        if self._scratch_bytes is None:
            self._scratch_bytes = {}
            for step in self.region.steps:
                if step.action == RUN or step.written or step.inplace:  # in-place ones return their target
                    continue
                for leaf in step.out_leaves:
                    if isinstance(leaf, tuple) and leaf and leaf[0] == "t":
                        _, shp, strd, dt, dev = leaf
                        self._scratch_bytes[dev] = max(self._scratch_bytes.get(dev, 0), _extent_bytes(shp, strd, dt))
        ref = self._scratch.get(device)
        storage = ref() if ref is not None else None
        if storage is None:
            size = max(self._scratch_bytes.get(device, 0), _extent_bytes(shape, stride, dtype))
            kept = self._kept.get(device)
            storage = kept() if kept is not None else None
            if storage is None or storage.nbytes() < size:
                storage = torch.empty(size, dtype=torch.uint8, device=device).untyped_storage()
            self._scratch[device] = weakref.ref(storage)
        return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape, stride)

    def unplanned_view(self, k: int, func: Any) -> bool:
        """A view the plan does not list at this position: hook code of the user's tools dispatches
        them inside a region (ModTracker, under MemTracker and FlopCounterMode, takes `t.view_as(t)`
        of a leaf input to hook its gradient). A view allocates nothing and always runs, so it is
        run without taking an op index."""
        steps = self.region.steps
        if k < len(steps) and steps[k].func == str(func):
            return False
        return not any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments) and any(
            r.alias_info is not None for r in func._schema.returns)

    def step(self, k: int, func: Any, phase: str) -> Step:
        steps = self.region.steps
        if k >= len(steps) or steps[k].func != str(func):
            planned = steps[k].func if k < len(steps) else f"the end of the region ({len(steps)} ops)"
            raise OpSequenceError(
                f"remat_kit: during {phase} of `{self.region.module or 'the model'}` op #{k} is {func}, but the "
                f"plan was made for {planned}. The forward's op sequence changed (data-dependent control flow, "
                "or the module or its inputs changed without changing shapes); a plan indexed by op cannot be "
                "applied. remat_kit drops this plan and re-profiles on the next call; if the sequence changes "
                "on every call, use remat_kit.unwrap(model) and torch.utils.checkpoint for this module."
            )
        return steps[k]


def _generators(args: tuple, kwargs: dict) -> list[torch.Generator]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Generator)]


def _with_generator_states(gens: list[torch.Generator], drawn: list[torch.Tensor], func: Any, args: tuple,
                           kwargs: dict) -> Any:
    """Run `func` from the generator states it drew from in the forward, then put back the states
    the generators have now (the user may have drawn from them since)."""
    now = [g.get_state() for g in gens]
    try:
        for g, st in zip(gens, drawn):
            g.set_state(st)
        return func(*args, **kwargs)
    finally:
        for g, st in zip(gens, now):
            g.set_state(st)


class _ForwardMode(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state, self.k = state, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if ignored(func, args):
            return func(*args, **kwargs)
        if self.state.unplanned_view(self.k, func):
            return func(*args, **kwargs)
        step = self.state.step(self.k, func, "the forward")
        if step.action == RUN and (gens := _generators(args, kwargs)):
            self.state.generators[self.k] = [g.get_state() for g in gens]
        out = func(*args, **kwargs)
        if step.cache:
            tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            kept = []
            for j in step.cache:
                # An in-place op may write part of its storage (mambapy's pscan adds into slices
                # of X): what it leaves, and what the plan keeps, is the whole storage.
                t = _whole_storage(tensors[j]) if step.inplace else tensors[j].detach()
                if j in step.offload and t.device.type != "cpu":
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
                    t = host.copy_(t, non_blocking=True)
                kept.append(t)
            self.state.cache[self.k] = kept
        if step.restore_rng:
            self.state.rng[self.k] = _get_rng(_rng_device(step))
        self.k += 1
        return out

    def __exit__(self, *exc):
        done = self.k
        result = super().__exit__(*exc)
        if exc[0] is None and done != len(self.state.region.steps):
            raise OpSequenceError(
                f"remat_kit: the forward of `{self.state.region.module or 'the model'}` ran {done} ops, but the plan "
                f"was made for {len(self.state.region.steps)}. The op sequence changed (data-dependent control "
                "flow); remat_kit drops this plan and re-profiles on the next call."
            )
        return result


class _ReplayMode(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state, self.k = state, 0

    def __enter__(self):
        self.k = 0
        self.state.begin_replay()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if ignored(func, args):
            return func(*args, **kwargs)
        if self.state.unplanned_view(self.k, func):
            return func(*args, **kwargs)
        k = self.k
        self.k += 1
        step = self.state.step(k, func, "the recompute")
        if step.action == RUN:
            drawn = self.state.generators.pop(k, None)
            if drawn is None:
                return func(*args, **kwargs)
            return _with_generator_states(_generators(args, kwargs), drawn, func, args, kwargs)
        if step.restore_rng:
            _set_rng(_rng_device(step), self.state.rng.pop(k))
        if step.alias_of is not None and self.state.cache.get(step.alias_of):
            # The storage this op allocated, as the in-place ops after it left it: the kept one.
            _, shape, stride, dtype, device = step.out_leaves[0]
            kept = self.state.cache[step.alias_of][0].to(device, non_blocking=True)
            return tree_unflatten([torch.empty(0, dtype=dtype, device=device).set_(
                kept.untyped_storage(), 0, shape, stride)], step.out_spec)
        cached = dict(zip(step.cache, self.state.cache.pop(k, [])))
        if step.inplace:  # autograd returns the mutated argument; give its storage the kept contents
            target = _mutated_arg(func, args, kwargs)
            kept = next(iter(cached.values()), None)
            if kept is not None and kept.untyped_storage()._cdata != target.untyped_storage()._cdata:
                whole = _whole_storage(target)
                n = min(whole.numel(), kept.numel())
                whole[:n].copy_(kept[:n])
            return target if len(step.out_leaves) == 1 else tree_unflatten([target], step.out_spec)
        leaves, j = [], 0
        for leaf in step.out_leaves:
            if isinstance(leaf, tuple) and leaf and leaf[0] == "t":
                _, shape, stride, dtype, device = leaf
                if j in cached:
                    t = cached[j]
                    leaves.append(t.to(device, non_blocking=True) if t.device != device else t)
                else:
                    leaves.append(self.state.placeholder(shape, stride, dtype, device, not step.written))
                j += 1
            else:
                leaves.append(leaf)
        return tree_unflatten(leaves, step.out_spec)


# Dynamo cannot trace these dispatch modes. Under torch.compile the plan becomes torch's selective
# checkpoint policy (_compiled.py); only a region it cannot express runs here, as a graph break.
def run_region(region: Region, fn: Any, args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)` as a non-reentrant checkpoint that keeps and recomputes per `region`."""
    if torch.compiler.is_compiling():  # the plan as a policy dynamo traces (issue 12, _compiled.py)
        return run_compiled(region, fn, args, kwargs, eager=_run_region_eager)
    return _run_region_eager(region, fn, args, kwargs)


@torch._dynamo.disable
def _run_region_eager(region: Region, fn: Any, args: tuple, kwargs: dict) -> Any:
    state = _State(region)

    def context_fn():
        return _ForwardMode(state), _ReplayMode(state)

    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=context_fn, preserve_rng_state=True, **kwargs
    )


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
        self.state = _State(region)
        self.forwards: list[Any] = []
        self.calls: list[tuple[Any, list[Any], dict[int, tuple[int, int]]]] = []
        self._outputs: list[list[weakref.ref | None]] = []
        self._gen: Any = None

    @property
    def open(self) -> bool:
        return self._gen is not None

    def expects(self, path: str) -> bool:
        return self.open and len(self.forwards) < len(self.region.members) and self.region.members[len(self.forwards)] == path

    @torch._dynamo.disable
    def start(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        def context_fn():
            return _ForwardMode(self.state), _ReplayMode(self.state)

        # fn, preserve_rng_state, context_fn, determinism_check, debug[, early_stop], *args
        head = [self._recompute, True, context_fn, "default", False] + ([True] if _HAS_EARLY_STOP else [])
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
                hit = next(((k, j) for k, outs in enumerate(self._outputs) for j, ref in enumerate(outs)
                            if ref is not None and ref() is leaf), None)
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
        self._outputs.append([weakref.ref(t) if isinstance(t, torch.Tensor) else None
                              for t in tree_flatten(out)[0]])
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
        _, recomputed = _needed_and_recomputed(graph, codes)
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
