"""What the op-indexed replay modes (_modes.py) cost per op, calibrated on the modes themselves.

A selective region runs its forward under `_ForwardMode` and its recompute under `_ReplayMode`,
and every op of both goes through Python. How much that costs depends on what the plan does with
the op: one the forward passes straight on is cheaper than one whose output it keeps, and at
replay an op that runs, one handed back from the cache and one skipped (a placeholder) each cost
differently, on top of the modes' own entry and exit per region call. A pass-through
TorchDispatchMode times none of that (issue 12: the tiny MLP's selective plan was priced at the
pass-through's cost per op), so each term is timed here on the real modes, with a region made
from a small layer's own op sequence, once per device type per process. Between the large ops of
a real layer the same per-op path runs with colder caches: `cold_dispatch` measures by how much.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from remat_kit._torch._modes import CACHE, RUN, SKIP, Region, Step, _ForwardMode, _ReplayMode, _State
from remat_kit._torch._trace import ignored


@dataclasses.dataclass(frozen=True)
class ModeCost:
    """Seconds the modes add to one call of a selective region, per op by what the plan does."""

    frame: float = 0.0  # both modes' entry and exit, and the region's state, per region call
    forward: float = 0.0  # an op the forward passes straight on
    keep: float = 0.0  # an op whose outputs the forward keeps (or whose RNG state it notes)
    run: float = 0.0  # an op the replay runs
    cached: float = 0.0  # an op the replay hands back from the cache (instead of running it)
    skipped: float = 0.0  # an op the replay skips (a placeholder instead of running it)

    @classmethod
    def flat(cls, op_seconds: float) -> ModeCost:
        """The same cost for every op, no frame (a cost given as one number per op)."""
        return cls(0.0, op_seconds, op_seconds, op_seconds, op_seconds, op_seconds)

    def of(self, region: Region) -> float:
        """The modes' time for one call of `region`: every forward op, and the replay's ops up to
        the last one it computes or hands back (checkpoint stops the recompute there)."""
        forward = sum(
            self.keep if (s.cache or s.restore_rng or s.explicit_generator) else self.forward for s in region.steps
        )
        return self.frame / 2 + forward + self.replay_of(region)

    def forward_of(self, region: Region) -> float:
        """The part of `of` spent in the forward: `_ForwardMode`'s entry and exit and every op of
        the region passed on or kept (what a selective region costs a step besides its recompute)."""
        return self.of(region) - self.replay_of(region)

    def replay_of(self, region: Region) -> float:
        """The part of `of` spent in the recompute: `_ReplayMode`'s entry and exit and its ops up to
        the recompute's early stop."""
        total = self.frame / 2
        for s in region.steps[: region.last_replayed + 1]:
            total += self.run if s.action == RUN else self.cached if s.action == CACHE else self.skipped
        return total


def calibration_off(device_type: str) -> bool:
    off = os.environ.get("REMAT_KIT_CALIBRATE", "1").strip().lower() in ("0", "false", "no", "off")
    return off or device_type == "meta"  # meta: a model planned from shapes only, no device to time


def _layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A small layer's elementwise, reduction and matmul ops, with no views, in-place or random
    ops, so every op can be run, kept, handed back or skipped."""
    h = F.layer_norm(x, (x.shape[-1],))
    h = torch.mm(F.gelu(h), w)
    h = torch.softmax(h, -1) * h
    return torch.tanh(h) + x


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, Any, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not ignored(func, args):
            leaves, spec = tree_flatten(out)
            meta = tuple(
                ("t", tuple(t.shape), tuple(t.stride()), t.dtype, t.device) if isinstance(t, torch.Tensor) else t
                for t in leaves
            )
            self.ops.append((str(func), spec, meta))
        return out


def _region(ops: list[tuple[str, Any, tuple[Any, ...]]], action: str) -> Region:
    def step(func: str, spec: Any, leaves: tuple[Any, ...]) -> Step:
        tensors = tuple(j for j, leaf in enumerate(leaves) if isinstance(leaf, tuple) and leaf[:1] == ("t",))
        return Step(func, action, tensors if action == CACHE else (), (), False, False, spec, leaves)

    return Region("calibration", "calibration", tuple(step(*op) for op in ops))


def _median_seconds(
    fn: Callable[[], Any], repeats: int, inner: int, sync: Callable[[], None], clock: Callable[[], float]
) -> float:
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        start = clock()
        for _ in range(inner):
            fn()
        sync()
        times.append((clock() - start) / inner)
    return statistics.median(times[1:])


def calibration_clock(device_type: str) -> tuple[torch.device, Callable[[], float], Callable[[], None]]:
    """The device, clock and sync that the modes' and regions' calibrations time by. On the CPU
    their work is this thread's (ops on tiny tensors run on it): its CPU time, which other
    processes on a loaded machine do not inflate as they do wall time."""
    device = torch.device(device_type) if device_type != "cuda" else torch.device("cuda", torch.cuda.current_device())
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return device, (time.perf_counter if device.type == "cuda" else time.thread_time), sync


@functools.cache
def mode_cost(device_type: str = "cpu", repeats: int = 7, inner: int = 20) -> ModeCost:
    """`ModeCost` timed on this device: `_layer` on tiny tensors run without a mode, then under
    `_ForwardMode` passing every op on and keeping every op, then under `_ReplayMode` running,
    handing back and skipping every op (medians of `repeats`). Nothing when calibration is off
    (``REMAT_KIT_CALIBRATE=0``: plans then price recompute alone)."""
    if calibration_off(device_type):
        return ModeCost()
    device, clock, sync = calibration_clock(device_type)
    # Constant inputs: calibration draws no random numbers (the step's dropout masks stay its own).
    x = torch.linspace(-1, 1, 32, device=device).reshape(4, 8).requires_grad_()
    w = torch.linspace(-1, 1, 64, device=device).reshape(8, 8).requires_grad_()
    recorder = _Recorder()
    with recorder:
        _layer(x, w)
    n = len(recorder.ops)
    plain, kept = _State(_region(recorder.ops, RUN)), _State(_region(recorder.ops, CACHE))
    skipped = _State(_region(recorder.ops, SKIP))
    with _ForwardMode(kept):  # fills the cache the replay hands back
        _layer(x, w)
    cache = dict(kept.cache)

    def under(mode: Callable[[], TorchDispatchMode]) -> Callable[[], Any]:
        def call() -> Any:
            with mode():
                return _layer(x, w)

        return call

    def replay(state: _State) -> Callable[[], Any]:
        def call() -> Any:
            # The replay pops what it hands back; a skipping one finds the kept storage to lay
            # its placeholders in, as in a selective region.
            state.cache = dict(cache) if state is not plain else {}
            with _ReplayMode(state):
                return _layer(x, w)

        return call

    empty = Region("calibration", "calibration", ())

    def frames() -> None:
        state = _State(empty)
        with _ForwardMode(state):
            pass
        with _ReplayMode(state):
            pass

    def timed(fn: Callable[[], Any]) -> float:
        return _median_seconds(fn, repeats, inner, sync, clock)

    without = timed(lambda: _layer(x, w))
    frame = timed(frames)

    def per_op(fn: Callable[[], Any], base: float) -> float:
        return max(0.0, (timed(fn) - frame / 2 - base) / n)

    return ModeCost(
        frame=frame,
        forward=per_op(under(lambda: _ForwardMode(plain)), without),
        keep=per_op(under(lambda: _ForwardMode(_State(kept.region))), without),
        run=per_op(replay(plain), without),
        cached=per_op(replay(kept), 0.0),
        skipped=per_op(replay(skipped), 0.0),
    )


COLD_BYTES = (2**20, 2**22, 2**24)  # the writes `cold_dispatch` times a tiny op after


@dataclasses.dataclass(frozen=True)
class ColdDispatch:
    """How much an op's fixed cost (dispatch, autograd, the modes' Python, checkpoint's hooks)
    grows when it runs right after an op that moved many bytes: that op evicted the interpreter's
    and the dispatcher's code and data from the caches. The modes' and regions' per-op costs are
    timed on tiny tensors, where all of it stays cached; in a layer whose ops move megabytes each
    the same path ran at well over its calibrated cost (reports/step_time_model.md).

    `points`: (bytes written just before, the tiny op's time over its time with nothing written)."""

    points: tuple[tuple[int, float], ...] = ()

    def factor(self, num_bytes: float) -> float:
        """The factor after an op moving `num_bytes`: interpolated in log(bytes) between the
        measured points, from 1 at no bytes up to the first point, held beyond the last (a
        larger write is not what a layer's ops do between two others)."""
        if not self.points or num_bytes <= 0:
            return 1.0
        (b0, f0), *rest = self.points
        if num_bytes <= b0:
            return 1.0 + (f0 - 1.0) * num_bytes / b0
        for b1, f1 in rest:
            if num_bytes <= b1:
                w = math.log(num_bytes / b0) / math.log(b1 / b0)
                return f0 + (f1 - f0) * w
            b0, f0 = b1, f1
        return f0


@functools.cache
def cold_dispatch(device_type: str = "cpu", repeats: int = 301) -> ColdDispatch:
    """`ColdDispatch` measured on this device: the median time of one tiny op with autograd
    recording (what every op of a recompute pays besides its kernel) right after an untimed write
    of each of `COLD_BYTES`, over its median time right after the same op; the sizes in turn in
    every round (timed in blocks, the factors moved by a third between runs on a loaded machine).
    Only a CPU runs the dispatch on the core the kernels evict; on a GPU the host's caches stay
    the host's: factor 1 there, and when calibration is off (``REMAT_KIT_CALIBRATE=0``)."""
    if calibration_off(device_type) or device_type != "cpu":
        return ColdDispatch()
    _, clock, _ = calibration_clock(device_type)
    tiny = torch.linspace(-1, 1, 8).requires_grad_()
    scratch = torch.empty(max(COLD_BYTES), dtype=torch.uint8)
    empty = []
    for _ in range(repeats):
        start = clock()
        empty.append(clock() - start)
    timer = statistics.median(empty)  # the clock's own cost, inside each interval below

    # Each size timed in turn within every repeat: load from other processes shifts them alike.
    sizes = (0, *COLD_BYTES)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(repeats + 1):  # the first round warms up
        for b in sizes:
            if b:
                scratch[:b].fill_(1)
            else:  # warm: right after the same op a few times (the last round's writes evicted it)
                for _ in range(3):
                    tiny.mul(1.0)
            start = clock()
            tiny.mul(1.0)
            times[b].append(clock() - start)

    def per_op(num_bytes: int) -> float:
        return max(statistics.median(times[num_bytes][1:]) - timer, 1e-9)

    warm = per_op(0)
    return ColdDispatch(tuple((b, max(1.0, per_op(b) / warm)) for b in COLD_BYTES))
