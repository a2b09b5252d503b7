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
(`_optable._Table`): the op is matched by identity with the OpOverload seen at that index
before, and an op with nothing to keep or restore is called straight away, through no wrapper
(`_dynamo_skipper`). What the modes still cost is calibrated on them (_modecost.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat_kit._torch._optable import (
    CACHE,
    RUN,
    SKIP,
    OpSequenceError,
    Region,
    Step,
    _extent_bytes,
    _is_tensor_leaf,
)
from remat_kit._torch._trace import ignored

__all__ = ["CACHE", "RUN", "SKIP", "OpSequenceError", "Region", "Step"]


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


def _dynamo_skipper() -> Callable[[Any], None] | None:
    """How to tell dynamo to leave a code object's frames, and all they call, untraced (None
    where this torch cannot). TorchDispatchMode otherwise wraps `__torch_dispatch__` in
    `torch._disable_dynamo`, which costs every op two wrapper frames and four frame-hook swaps;
    a mark on the code costs nothing while dynamo is not running (the modes only ever run
    eagerly: under torch.compile a region is a checkpoint policy, _compiled.py)."""
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy

        skip = FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP)
    except (ImportError, AttributeError):
        return None
    return lambda code: set_code_exec_strategy(code, skip)


_SKIP_CODE = _dynamo_skipper()


def _index(mode: Any, func: Any, args: tuple) -> int | None:
    """The op index `func` takes in `mode`'s region (advancing it), or None: run it as is."""
    k, table = mode.k, mode.table
    if not (k < len(table.funcs) and table.funcs[k] is func):
        if ignored(func, args) or mode.state.unplanned_view(k, func):
            return None
    mode.k = k + 1
    return k


class _TableMode(TorchDispatchMode):
    """A region's op-indexed mode: ops the plan only passes on run through the table's per-op
    callables (`calls`, the forward's or the replay's); the rest go to the subclass's `_planned`."""

    def __init__(self, state: _State, calls: list):
        super().__init__()
        self.state, self.table, self.k = state, state.table, 0
        self.n, self.funcs, self.calls = len(self.table.funcs), self.table.funcs, calls

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return _SKIP_CODE is None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # The per-op path: the op seen at this index before, with nothing to keep.
        k = self.k
        if k < self.n and self.funcs[k] is func:
            self.k = k + 1
            call = self.calls[k]
            if call is not None:
                return call(*args, **kwargs) if kwargs else call(*args)
        else:
            k = _index(self, func, args)
            if k is None:
                return func(*args, **(kwargs or {}))
        return self._planned(k, func, args, kwargs or {})

    def _planned(self, k: int, func: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError


class _ForwardMode(_TableMode):
    def __init__(self, state: _State):
        super().__init__(state, state.table.forward_call)

    def _planned(self, k: int, func: Any, args: tuple, kwargs: dict) -> Any:
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


class _ReplayMode(_TableMode):
    def __init__(self, state: _State):
        super().__init__(state, state.table.replay_call)

    def __enter__(self):
        self.k = 0
        self.state.begin_replay()
        return super().__enter__()

    def _planned(self, k: int, func: Any, args: tuple, kwargs: dict) -> Any:
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


if _SKIP_CODE is not None:
    _SKIP_CODE(_TableMode.__torch_dispatch__.__code__)
