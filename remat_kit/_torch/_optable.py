"""The op table of a planned region: what the replay modes (_modes.py) do with each op by index.

Made once per region (`regions` in _replay.py) and shared by every call of it; `_Table` holds the
per-op facts the modes' per-op path reads, so that path is a list lookup (issue 12: every op of a
selective region pays a trip through Python, which on small models was the step time).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

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
_OP_OVERLOAD = torch._ops.OpOverload  # its __call__ is `self._op(*args, **kwargs)`; subclasses differ


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
        # The op to call straight away at index k once matched (None: through the step's logic):
        # the OpOverload's C++ callable, one Python frame less than calling the OpOverload.
        self.forward_call: list[Any] = [None] * len(steps)
        self.replay_call: list[Any] = [None] * len(steps)
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
            call = func._op if type(func) is _OP_OVERLOAD else func
            self.forward_call[k] = call if self.plain_forward[k] else None
            self.replay_call[k] = call if self.plain_replay[k] else None
        return True


def _is_tensor_leaf(leaf: Any) -> bool:
    return isinstance(leaf, tuple) and bool(leaf) and leaf[0] == "t"


def _extent_bytes(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> int:
    if any(n == 0 for n in shape):
        return 0
    return dtype.itemsize * (1 + sum((n - 1) * s for n, s in zip(shape, stride)))
