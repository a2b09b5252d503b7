"""The op table of a planned region and the two dispatch modes that run it by op index.

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

Every op of a region under these modes pays a trip through Python (issue 12: on small models
that trip, not the recompute, was the step time). So a region only runs here when its plan is
selective (`Region.needs_modes`); the per-op path is a lookup in a table made once per region
(`_Table`): the op is matched by identity with the OpOverload seen at that index before, and an
op with nothing to keep or restore is called straight away.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat_kit._torch._trace import ignored

RUN, CACHE, SKIP = "run", "cache", "skip"


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
    explicit_generator: bool = False  # an RNG op given a torch.Generator (checkpoint restores default ones only)
    flops: int = 0  # of the op (its outputs' values), to price running it where the modes would skip it
    bytes_moved: int = 0


@dataclasses.dataclass(frozen=True)
class Region:
    name: str  # block name
    module: str  # module path whose forward is checkpointed ("" = the root); the first of `members`
    steps: tuple[Step, ...]
    members: tuple[str, ...] = ()  # consecutive layers checkpointed as one region (a plan segment)
    plain: bool = False  # run as plain non-reentrant checkpoint, no dispatch mode (see needs_modes)

    @functools.cached_property
    def needs_modes(self) -> bool:
        """Whether the plan keeps anything inside the region (or draws from an explicit generator).

        If not, every op the backward needs is recomputed from the region's inputs: plain
        non-reentrant checkpoint can run it, whose `preserve_rng_state` replays the default
        generators' draws, with no dispatch mode at all. It also runs the ops the modes would skip
        (`skipped_but_run`), up to the last one whose output the backward saves; those die as
        they do in the forward, so its peak is the modes' peak (tests/test_torch_fastpath.py).
        """
        return any(s.cache or s.alias_of is not None or s.explicit_generator for s in self.steps)

    @functools.cached_property
    def skipped_but_run(self) -> tuple[Step, ...]:
        """Steps the modes skip that a plain checkpoint's recompute runs: every SKIP before the last
        step the replay runs or hands back (checkpoint's early stop ends the recompute there)."""
        return tuple(s for s in self.steps[: self.last_replayed + 1] if s.action == SKIP)

    @functools.cached_property
    def last_replayed(self) -> int:
        """Index of the last step whose output the replay computes or hands back (views, which
        own no value, left out): the recompute's early stop comes after it."""
        return max(
            (
                k
                for k, s in enumerate(self.steps)
                if s.action == CACHE or (s.action == RUN and (s.flops or s.bytes_moved))
            ),
            default=-1,
        )

    @functools.cached_property
    def table(self) -> _Table:
        return _Table(self.steps)


_TO_COPY = torch.ops.aten._to_copy.default


class _Table:
    """Per-op facts of a region, computed once and shared by every call of it."""

    def __init__(self, steps: tuple[Step, ...]):
        self.steps = steps
        self.names = [s.func for s in steps]
        # OpOverload seen at each index (filled on first match): later calls compare by identity,
        # not by formatting the op's name.
        self.funcs: list[Any] = [None] * len(steps)
        self.plain_forward = [not (s.cache or s.restore_rng or s.explicit_generator) for s in steps]
        self.plain_replay = [s.action == RUN and not s.explicit_generator for s in steps]
        self.single = [
            len(s.out_leaves) == 1 and s.out_spec.is_leaf() and _is_tensor_leaf(s.out_leaves[0]) for s in steps
        ]
        self.scratch_bytes: dict[torch.device, int] = {}
        for s in steps:
            if s.action == RUN or s.written or s.inplace:  # in-place ones return their target
                continue
            for leaf in s.out_leaves:
                if _is_tensor_leaf(leaf):
                    _, shp, strd, dt, dev = leaf
                    self.scratch_bytes[dev] = max(self.scratch_bytes.get(dev, 0), _extent_bytes(shp, strd, dt))

    def match(self, k: int, func: Any) -> bool:
        """Whether `func` is the op planned at index `k` (by identity once seen)."""
        if k >= len(self.funcs):
            return False
        if self.funcs[k] is func:
            return True
        if self.names[k] != str(func):
            return False
        # An autocast cast of a parameter is the same OpOverload as a planned cast but not an op
        # of the plan (see _trace.ignored): such ops are matched by name, after that check.
        if func is not _TO_COPY:
            self.funcs[k] = func
        return True


def _is_tensor_leaf(leaf: Any) -> bool:
    return isinstance(leaf, tuple) and bool(leaf) and leaf[0] == "t"


def _rng_device(step: Step) -> torch.device:
    for leaf in step.out_leaves:
        if _is_tensor_leaf(leaf):
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
        self.table = region.table
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.rng: dict[int, torch.Tensor] = {}
        # Explicit `torch.Generator`s a recomputed RNG op draws from (torch.bernoulli(p, generator=g)):
        # checkpoint's preserve_rng_state restores the default generators only.
        self.generators: dict[int, list[torch.Tensor]] = {}
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

    def placeholder(
        self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: torch.device, shared: bool
    ) -> torch.Tensor:
        """An uninitialised tensor of this layout; `shared` ones are views of the scratch buffer."""
        if not shared or _extent_bytes(shape, stride, dtype) == 0:
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)
        ref = self._scratch.get(device)
        storage = ref() if ref is not None else None
        if storage is None:
            size = max(self.table.scratch_bytes.get(device, 0), _extent_bytes(shape, stride, dtype))
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
        if self.table.match(k, func):
            return False
        return not any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments) and any(
            r.alias_info is not None for r in func._schema.returns
        )

    def step(self, k: int, func: Any, phase: str) -> Step:
        steps = self.region.steps
        if not self.table.match(k, func):
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


def _with_generator_states(
    gens: list[torch.Generator], drawn: list[torch.Tensor], func: Any, args: tuple, kwargs: dict
) -> Any:
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


def _index(mode: Any, func: Any, args: tuple) -> int | None:
    """The op index `func` takes in `mode`'s region (advancing it), or None: run it as is."""
    k, table = mode.k, mode.table
    if not (k < len(table.funcs) and table.funcs[k] is func):
        if ignored(func, args) or mode.state.unplanned_view(k, func):
            return None
    mode.k = k + 1
    return k


class _ForwardMode(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state, self.table, self.k = state, state.table, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        k = _index(self, func, args)
        if k is None:
            return func(*args, **kwargs)
        if self.table.plain_forward[k] and self.table.funcs[k] is func:
            return func(*args, **kwargs)
        step = self.state.step(k, func, "the forward")
        if step.explicit_generator and step.action == RUN:
            self.state.generators[k] = [g.get_state() for g in _generators(args, kwargs)]
        out = func(*args, **kwargs)
        if step.cache:
            tensors = (
                [out] if self.table.single[k] else [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            )
            kept = []
            for j in step.cache:
                # An in-place op may write part of its storage (mambapy's pscan adds into slices
                # of X): what it leaves, and what the plan keeps, is the whole storage.
                t = _whole_storage(tensors[j]) if step.inplace else tensors[j].detach()
                if j in step.offload and t.device.type != "cpu":
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
                    t = host.copy_(t, non_blocking=True)
                kept.append(t)
            self.state.cache[k] = kept
        if step.restore_rng:
            self.state.rng[k] = _get_rng(_rng_device(step))
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
        self.state, self.table, self.k = state, state.table, 0

    def __enter__(self):
        self.k = 0
        self.state.begin_replay()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        k = _index(self, func, args)
        if k is None:
            return func(*args, **kwargs)
        if self.table.plain_replay[k] and self.table.funcs[k] is func:
            return func(*args, **kwargs)
        step = self.state.step(k, func, "the recompute")
        if step.action == RUN:
            drawn = self.state.generators.pop(k, None)
            if drawn is None:
                return func(*args, **kwargs)
            return _with_generator_states(_generators(args, kwargs), drawn, func, args, kwargs)
        if step.restore_rng:
            _set_rng(_rng_device(step), self.state.rng.pop(k))
        return self._hand_back(k, step, func, args, kwargs)

    def _hand_back(self, k: int, step: Step, func: Any, args: tuple, kwargs: dict) -> Any:
        """A CACHE or SKIP op's result: what the forward kept, or placeholders."""
        state = self.state
        if step.alias_of is not None and state.cache.get(step.alias_of):
            # The storage this op allocated, as the in-place ops after it left it: the kept one.
            _, shape, stride, dtype, device = step.out_leaves[0]
            kept = state.cache[step.alias_of][0].to(device, non_blocking=True)
            return tree_unflatten(
                [torch.empty(0, dtype=dtype, device=device).set_(kept.untyped_storage(), 0, shape, stride)],
                step.out_spec,
            )
        cached = dict(zip(step.cache, state.cache.pop(k, [])))
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
            if _is_tensor_leaf(leaf):
                _, shape, stride, dtype, device = leaf
                if j in cached:
                    t = cached[j]
                    leaves.append(t.to(device, non_blocking=True) if t.device != device else t)
                else:
                    leaves.append(state.placeholder(shape, stride, dtype, device, not step.written))
                j += 1
            else:
                leaves.append(leaf)
        return leaves[0] if self.table.single[k] else tree_unflatten(leaves, step.out_spec)
