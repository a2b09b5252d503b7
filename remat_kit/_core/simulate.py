"""Exact peak-memory simulator for a (graph, plan) over one forward and one backward pass.

The memory model (what the solvers optimise against; later checked against measured memory):

* Forward, in graph order: computing value t allocates it; a value is freed after its last
  forward consumer unless it is *kept*. Kept = needed by the backward and planned SAVE, or forced
  (a block boundary: the carry of a scanned layer; a graph output).
* Needed by the backward: residuals (read by the backward op of a value that receives a gradient),
  plus the inputs of every value that is recomputed (transitively, inside its block).
* Backward, block by block from the last: (1) reload the block's OFFLOADed values; (2) recompute
  its needed RECOMPUTE values in forward order, each freed after its last use; (3) run the block's
  backward ops in reverse order. The backward op of t allocates the gradient buffers of t's
  inputs that are not allocated yet, then frees t's gradient and every value whose last use it
  was. This is how `jax.checkpoint` per block and non-reentrant `torch.utils.checkpoint` behave.
* Parameters, their gradients and inputs are a constant (`graph.constant_bytes`).

A moment's memory is measured after its allocations and before its frees. Deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from remat_kit._core.graph import CostGraph, DeviceSpec
from remat_kit._core.plan import Decision, DecisionCode, Plan

# Plain ints in the event loop's arrays (`DecisionCode` is the one map to decisions).
_SAVE, _RECOMPUTE, _OFFLOAD = (int(c) for c in DecisionCode)


@dataclasses.dataclass(frozen=True)
class SimResult:
    peak_bytes: int  # whole step: activation peak + parameters, their gradients, inputs
    activation_bytes: int  # peak of activations and activation gradients
    baseline_activation_bytes: int  # the same for no remat
    recompute_flops: int
    recompute_seconds: float  # time of the recompute (roofline + per-op overhead) plus offload transfers
    num_recomputed_ops: int
    offload_bytes: int
    kept_bytes_by_block: tuple[int, ...]  # bytes each block keeps from its forward to its backward
    peak_moment: str  # where the peak happens, e.g. "backward of block3: recompute attn.softmax"
    recomputed: tuple[str, ...]
    timeline: tuple[tuple[str, int, int], ...] = ()  # (moment, block, activation bytes) if asked

    @property
    def activation_fraction(self) -> float:
        return self.activation_bytes / self.baseline_activation_bytes if self.baseline_activation_bytes else 1.0


def decision_codes(graph: CostGraph, plan: Plan | Mapping[str, Decision | str] | None) -> list[int]:
    """Per-value decision codes (SAVE for non-activations and unlisted values)."""
    codes = [_SAVE] * len(graph)
    if plan is None:
        return codes
    if isinstance(plan, Plan):
        plan.check_graph(graph)
        items = plan.decisions
    else:
        items = tuple((name, Decision(d)) for name, d in plan.items())
    for name, d in items:
        i = graph.index(name)
        code = int(DecisionCode.of(d))
        if code != _SAVE and not graph.values[i].is_activation:
            raise ValueError(
                f"plan: {name!r} is a {graph.values[i].role.value}, only activations can be {Decision(d).value}d."
            )
        if code != _SAVE and graph.is_forced[i]:
            what = "a block boundary" if graph.is_boundary[i] else "a graph output"
            raise ValueError(
                f"plan: {name!r} is {what}, which is always kept; plans may decide only graph.free_values."
            )
        codes[i] = code
    return codes


def needed_and_recomputed(graph: CostGraph, codes: list[int]) -> tuple[list[bool], list[bool]]:
    st = _static(graph)
    needed = list(st.needed0)
    recomputed = [False] * len(needed)
    deps, is_act = st.deps, st.is_act
    for i in reversed(graph.activations):  # deps come earlier, so one reverse pass closes the set
        if needed[i] and codes[i] == _RECOMPUTE:
            recomputed[i] = True
            for j in deps[i]:
                if is_act[j]:
                    needed[j] = True
    return needed, recomputed


@dataclasses.dataclass(frozen=True)
class _Static:
    """Per-graph index arrays the event loop reads (cached: the solvers run it thousands of times
    on the same graphs and windows)."""

    size: list[int]
    deps: list[tuple[int, ...]]
    bwd_reads: list[tuple[int, ...]]
    is_act: list[bool]
    block: list[int]
    needed0: list[bool]  # residuals and forced values: needed whatever the plan
    later_block: list[int]  # forced values: the earliest later block that reads them (own block if none)
    workspace: list[int]  # bytes a value's backward holds for a moment besides gradients
    holds: list[tuple[int, ...]]  # values a value's making keeps alive (Value.holds)
    any_holds: bool


def _static(graph: CostGraph) -> _Static:
    key = "simulate_static"
    if key not in graph._cache:
        vals = graph.values
        block = [v.block for v in vals]
        graph._cache[key] = _Static(
            size=[v.num_bytes for v in vals],
            deps=[tuple(graph.index(d) for d in v.deps) for v in vals],
            bwd_reads=[tuple(graph.index(d) for d in v.bwd_reads) for v in vals],
            is_act=[v.is_activation for v in vals],
            block=block,
            needed0=[graph.is_residual[i] or graph.is_forced[i] for i in range(len(vals))],
            later_block=[
                min(
                    (block[c] for c in (*graph.consumers[i], *graph.bwd_readers[i]) if block[c] > block[i]),
                    default=block[i],
                )
                for i in range(len(vals))
            ],
            workspace=[v.bwd_workspace_bytes for v in vals],
            holds=[tuple(graph.index(d) for d in v.holds) for v in vals],
            any_holds=any(v.holds for v in vals),
        )
    return graph._cache[key]


def simulate(
    graph: CostGraph,
    plan: Plan | Mapping[str, Decision | str] | None = None,
    *,
    device: DeviceSpec | None = None,
    timeline: bool = False,
) -> SimResult:
    """Simulate one training step under `plan` (None = no remat) and return its peak memory and cost."""
    device = device or DeviceSpec()
    if isinstance(plan, Plan):
        graph = plan.graph_for(graph)
    codes = decision_codes(graph, plan)
    peak, moment, kept_by_block, trace = _run(graph, codes, timeline)
    needed, recomputed = needed_and_recomputed(graph, codes)
    rec = [i for i in graph.activations if recomputed[i]]
    off = [i for i in graph.activations if needed[i] and codes[i] == _OFFLOAD]
    vals = graph.values
    flops = sum(vals[i].flops for i in rec)
    seconds = sum(device.value_seconds(vals[i]) for i in rec)
    offload_bytes = sum(vals[i].num_bytes for i in off)
    seconds += 2 * offload_bytes / device.host_bandwidth
    if plan is None or not any(codes):
        baseline = peak
    else:
        baseline = baseline_activation_bytes(graph)
    return SimResult(
        peak_bytes=peak + graph.constant_bytes,
        activation_bytes=peak,
        baseline_activation_bytes=baseline,
        recompute_flops=flops,
        recompute_seconds=seconds,
        num_recomputed_ops=len(rec),
        offload_bytes=offload_bytes,
        kept_bytes_by_block=tuple(kept_by_block),
        peak_moment=moment,
        recomputed=tuple(vals[i].name for i in rec),
        timeline=tuple(trace),
    )


def baseline_activation_bytes(graph: CostGraph) -> int:
    """Activation peak of no remat (cached on the graph)."""
    key = "baseline_activation_bytes"
    if key not in graph._cache:
        graph._cache[key] = _run(graph, [_SAVE] * len(graph), False)[0]
    return graph._cache[key]


def shared_with_own_block(graph: CostGraph) -> list[bool]:
    """Per value: kept for later blocks *and* read by ops of its own block that a plan may
    recompute (T5's position bias: made in the first layer, used there and by every later layer).

    Such a value's life depends on its own block's plan: if the block recomputes a reader, the
    value lives until that block's backward; if not, it dies after the last later block reads it.
    The chain DP prices a block with the blocks before it fixed, so it cannot see the difference;
    it (and the op-level program) count such a value alive until its own block's backward, an
    upper bound (`_run(..., hold_shared=True)`). Cached on the graph."""
    key = "shared_with_own_block"
    if key not in graph._cache:
        vals = graph.values
        graph._cache[key] = [
            graph.is_forced[i]
            and vals[i].is_activation
            and any(vals[c].block == vals[i].block and not graph.is_forced[c] for c in graph.consumers[i])
            for i in range(len(vals))
        ]
    return graph._cache[key]


def _run(graph: CostGraph, codes: list[int], want_trace: bool | str, hold_shared: bool = False):
    """The event loop. Returns (activation peak, peak moment label, kept bytes per block, trace).
    `want_trace="raw"`: instead of a trace, per block [its forward peak, its backward peak] (what
    the chain DP's option measurements read).
    `hold_shared`: values `shared_with_own_block` live at least until their own block's backward
    (the solvers' upper bound; the simulator's own answer is without it)."""
    n = len(graph.values)
    st = _static(graph)
    needed, recomputed = needed_and_recomputed(graph, codes)
    kept = [st.is_act[i] and needed[i] and codes[i] == _SAVE for i in range(n)]
    offloaded = [st.is_act[i] and needed[i] and codes[i] == _OFFLOAD for i in range(n)]
    rec = _Recorder(graph, want_trace)
    kept_by_block = _forward(graph, st, kept, rec)
    moments, frees_at = _backward_timeline(graph, st, kept, offloaded, recomputed, hold_shared)
    _backward(graph, st, offloaded, moments, frees_at, rec)
    return rec.peak, rec.peak_label(), kept_by_block, rec.trace


class _Recorder:
    """Live bytes through the step, its peak and where it happens (and a trace where asked).

    Labels are built only where they are read (a new peak, or a full trace): the solvers run the
    loop thousands of times, and formatting a label per moment was most of its time."""

    def __init__(self, graph: CostGraph, want_trace: bool | str):
        self.live = 0
        self.peak = 0
        self.peak_at: tuple[str, int, int] | None = None
        self.raw = want_trace == "raw"
        self.want_trace = want_trace
        self.trace: list = [[0, 0] for _ in range(graph.num_blocks)] if self.raw else []
        self.label = _labeller(graph)

    def record(self, what: str, i: int, block: int, live: int) -> None:
        if self.raw:  # per block: [forward peak, backward peak]
            side = self.trace[block]
            k = what != "forward"
            if live > side[k]:
                side[k] = live
        elif self.want_trace:
            self.trace.append((self.label(what, i, block), block, live))
        if live > self.peak:
            self.peak, self.peak_at = live, (what, i, block)

    def peak_label(self) -> str:
        return "nothing" if self.peak_at is None else self.label(*self.peak_at)


def _forward(graph: CostGraph, st: _Static, kept: list[bool], rec: _Recorder) -> list[int]:
    """The forward in graph order; returns the bytes each block keeps for its backward."""
    size, block_of = st.size, st.block
    free_after: list[list[int]] = [[] for _ in range(len(graph.values))]
    for i in graph.activations:
        if not kept[i]:
            free_after[graph.last_fwd_use[i]].append(i)
    kept_by_block = [0] * graph.num_blocks
    live, record = rec.live, rec.record
    for t in graph.activations:
        live += size[t]
        record("forward", t, block_of[t], live)
        for u in free_after[t]:
            live -= size[u]
        if kept[t]:
            kept_by_block[block_of[t]] += size[t]
    rec.live = live
    return kept_by_block


def _backward_timeline(
    graph: CostGraph,
    st: _Static,
    kept: list[bool],
    offloaded: list[bool],
    recomputed: list[bool],
    hold_shared: bool,
) -> tuple[list[tuple[str, int, int]], list[list[int]]]:
    """The backward's moments in order (what, value index or block, block), and per moment the
    values whose last use it is."""
    moments: list[tuple[str, int, int]] = []
    first_moment_of_block: dict[int, int] = {}
    for b in reversed(range(graph.num_blocks)):
        members = graph.block_members[b]
        first_moment_of_block[b] = len(moments)
        moments.append(("reload", b, b))
        moments.extend(("recompute", t, b) for t in members if recomputed[t])
        moments.extend(("backward", t, b) for t in reversed(members) if graph.gets_grad[t])
    last_use = [-1] * len(graph.values)
    for m, (what, t, _b) in enumerate(moments):
        if what == "reload":
            continue
        for j in st.deps[t] if what == "recompute" else st.bwd_reads[t]:
            last_use[j] = m  # moments are increasing, so the last write wins
    if st.any_holds:
        _held_in_recompute(graph, st, moments, last_use)
    shared = shared_with_own_block(graph) if hold_shared else None
    for i in graph.activations:
        if graph.is_forced[i]:
            # Kept for later blocks: alive at least until the backward of the last of them to run
            # (the earliest in forward order) begins; an output until its own block's backward.
            last_use[i] = max(last_use[i], first_moment_of_block[st.later_block[i]])
            if shared is not None and shared[i]:  # through the last moment before its own block's backward
                last_use[i] = max(last_use[i], first_moment_of_block[st.block[i]] - 1)
    frees_at: list[list[int]] = [[] for _ in range(len(moments) + 1)]
    for i in graph.activations:
        if kept[i] or offloaded[i] or recomputed[i]:
            frees_at[max(last_use[i], 0)].append(i)
    return moments, frees_at


def _held_in_recompute(graph: CostGraph, st: _Static, moments: list, last_use: list[int]) -> None:
    """A recompute runs the block's code again, so a module call's inputs stay alive until the
    call's last op has run again, or, where that op is not recomputed, the last op recomputed
    before it (the recompute stops once it has what the backward needs)."""
    at: dict[int, int] = {t: m for m, (what, t, _b) in enumerate(moments) if what == "recompute"}
    for b in range(graph.num_blocks):
        latest = -1
        for t in graph.block_members[b]:
            latest = at.get(t, latest)
            if latest >= 0:
                for j in st.holds[t]:
                    last_use[j] = max(last_use[j], latest)


def _backward(
    graph: CostGraph,
    st: _Static,
    offloaded: list[bool],
    moments: list[tuple[str, int, int]],
    frees_at: list[list[int]],
    rec: _Recorder,
) -> None:
    """Run the backward's moments: reloads, recomputes, and backward ops with their gradients."""
    size, deps, workspace = st.size, st.deps, st.workspace
    grad_live = [False] * len(graph.values)
    gets_grad = graph.gets_grad
    live, record = rec.live, rec.record
    # Cotangent seeds of the outputs that receive gradients, alive from the start of the backward.
    for i in graph.activations:
        if graph.is_output[i] and gets_grad[i]:
            grad_live[i] = True
            live += size[i]
    for m, (what, t, b) in enumerate(moments):
        if what == "reload":
            for i in graph.block_members[t]:
                if offloaded[i]:
                    live += size[i]
            record("reload", -1, b, live)
        elif what == "recompute":
            live += size[t]
            record("recompute", t, b, live)
        else:
            for j in deps[t]:
                if gets_grad[j] and not grad_live[j]:
                    grad_live[j] = True
                    live += size[j]
            live += workspace[t]
            record("grad", t, b, live)
            live -= workspace[t]
            grad_live[t] = False
            live -= size[t]
        for i in frees_at[m]:
            live -= size[i]
    rec.live = live


def _labeller(graph: CostGraph):
    def label(what: str, i: int, block: int) -> str:
        if what == "forward":
            return f"forward {graph.values[i].name}"
        prefix = f"backward of {graph.block_names[block]}: "
        if what == "reload":
            return prefix + "reload"
        return prefix + (
            f"recompute {graph.values[i].name}" if what == "recompute" else f"grad of {graph.values[i].name}"
        )

    return label
