"""Budget solvers: the least-recompute plan whose simulated activation peak fits the budget.

* ``"dp"`` (default): per-block menus from the op-level 0-1 program at several caps, chained by
  the exact dynamic program (chain_dp.py). Identical blocks share one menu.
* ``"milp"``: one op-level 0-1 program over the whole graph (exact under the memory model; for
  graphs up to a few thousand values).
* ``"greedy"``: recompute the values with the most bytes per unit of recompute time first;
  a fast baseline.

Every solver returns a Plan whose prediction the simulator produced; a plan over the limit is
never returned.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from remat_kit._core import chain_dp, ladder
from remat_kit._core.budget import Budget, format_bytes, parse_budget
from remat_kit._core.graph import CostGraph, DeviceSpec
from remat_kit._core.milp import solve_milp
from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import (
    _OFFLOAD,
    _RECOMPUTE,
    _SAVE,
    _needed_and_recomputed,
    _run,
    baseline_activation_bytes,
)

SOLVERS = ("dp", "milp", "greedy")
_NAMES = {_SAVE: Decision.SAVE, _RECOMPUTE: Decision.RECOMPUTE, _OFFLOAD: Decision.OFFLOAD}
NUM_CAPS = 8  # kept-bytes levels per block menu
MILP_MENU_WORK = 1_000  # (free values)² of the unrepeated blocks given op-level menus (op_level_blocks): ~0.3 s
MILP_LAYER_WORK = 20_000  # (free values)² up to which a repeated block (a layer) gets op-level menus


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest activation memory any plan reaches."""

    def __init__(self, message: str, *, smallest_fraction: float, smallest_bytes: int):
        super().__init__(message)
        self.smallest_fraction = smallest_fraction
        self.smallest_bytes = smallest_bytes


class Costs:
    """Integer recompute / offload costs per value (picoseconds of roofline time)."""

    def __init__(self, graph: CostGraph, device: DeviceSpec):
        self.graph = graph
        vals = graph.values
        self.recompute = [round(device.seconds(v.flops, v.bytes_moved) * 1e12) for v in vals]
        self.offload = [round(2 * v.num_bytes / device.host_bandwidth * 1e12) for v in vals]

    def of(self, codes: Sequence[int] | Mapping[int, int]) -> tuple[int, int]:
        """(cost, number of recomputed ops) of a decision vector, as the simulator runs it: a full
        one, or a mapping {value index: code} of the values not saved (O(its size): block menus
        price thousands of options on graphs of thousands of values)."""
        if isinstance(codes, Mapping):
            return self._of_sparse(codes)
        needed, recomputed = _needed_and_recomputed(self.graph, list(codes))
        cost, ops = 0, 0
        for i in self.graph.activations:
            if recomputed[i]:
                cost += self.recompute[i]
                ops += 1
            elif needed[i] and codes[i] == _OFFLOAD:
                cost += self.offload[i]
        return cost, ops

    def _of_sparse(self, codes: Mapping[int, int]) -> tuple[int, int]:
        graph, vals = self.graph, self.graph.values
        wanted: set[int] = set()  # read by a recomputed value (the simulator's `needed`)
        cost, ops = 0, 0
        for i in sorted((i for i, c in codes.items() if c != _SAVE), reverse=True):  # deps come earlier
            if not vals[i].is_activation or not (graph.is_residual[i] or graph.is_forced[i] or i in wanted):
                continue
            if codes[i] == _RECOMPUTE:
                cost += self.recompute[i]
                ops += 1
                wanted.update(graph.index(d) for d in vals[i].deps)
            elif codes[i] == _OFFLOAD:
                cost += self.offload[i]
        return cost, ops


def solve(
    graph: CostGraph,
    budget: object,
    *,
    solver: str | None = None,
    offload: bool = False,
    device: DeviceSpec | None = None,
    max_segment_blocks: int = 1,
    fixed_blocks: Collection[str] = (),
) -> Plan:
    """The plan with the least recompute time whose activation memory fits `budget`.

    Args:
      graph: the cost graph of one training step.
      budget: a float in (0, 1] (fraction of no-remat activation memory), or bytes for the whole
        step's peak (an int or a string such as ``"12GiB"``).
      solver: ``"dp"`` (default), ``"milp"`` or ``"greedy"``.
      offload: allow OFFLOAD decisions (host memory) besides SAVE and RECOMPUTE.
      device: roofline constants pricing recompute time; ``DeviceSpec()`` by default.
      max_segment_blocks: with ``solver="dp"``, also consider checkpointing up to this many
        consecutive blocks as one segment (dropping the boundaries inside it, as √n and rotor
        do). The plan's `segments` then says which blocks go together; 1 = one block each.
      fixed_blocks: names of blocks that never join a multi-block segment (code a framework runs
        outside any checkpoint region: embeddings, head, loss).

    Raises:
      ValueError: a malformed budget or solver name.
      InfeasibleBudgetError: the budget is below what full recompute (and offload, if allowed)
        reaches; the message names the smallest feasible budget.
    """
    parsed = parse_budget(budget)
    solver = _check_solver(solver)
    if not isinstance(offload, bool):
        raise ValueError(f"offload={offload!r} must be True or False.")
    if not isinstance(max_segment_blocks, int) or isinstance(max_segment_blocks, bool) or max_segment_blocks < 1:
        raise ValueError(f"max_segment_blocks={max_segment_blocks!r} must be an int >= 1 (1 = one block per segment).")
    if max_segment_blocks > 1 and solver != "dp":
        raise ValueError(f"max_segment_blocks={max_segment_blocks} needs solver='dp', not solver={solver!r}.")
    unknown = set(fixed_blocks) - set(graph.block_names)
    if unknown:
        raise ValueError(f"fixed_blocks={sorted(fixed_blocks)!r} names blocks the graph does not have: {sorted(unknown)!r} "
                         f"(blocks: {list(graph.block_names)!r}).")
    spans = (max_segment_blocks, frozenset(fixed_blocks))
    device = device or DeviceSpec()
    costs = Costs(graph, device)
    baseline = baseline_activation_bytes(graph)
    segments = None
    limit = parsed.limit_activation_bytes(baseline, graph.constant_bytes)
    codes: list[int] | None
    if parsed.kind == "fraction" and parsed.value == 1.0:
        codes = [_SAVE] * len(graph)  # no remat fits its own memory by definition
    elif solver == "dp":
        found = _solve_dp(graph, limit, costs, offload, spans)
        codes, segments = found if found is not None else (None, None)
    elif solver == "milp":
        res = solve_milp(graph, limit=limit, rec_cost=costs.recompute, off_cost=costs.offload if offload else None)
        codes = None if res is None else _codes_from_milp(graph, res)
    else:
        codes = _solve_greedy(graph, limit, costs)
    if codes is None:
        raise _infeasible(graph, parsed, budget, costs, offload, baseline, spans)
    target = graph if segments is None else graph.regroup(segments)
    decisions = {target.values[i].name: _NAMES[codes[i]] for i in target.free_values}
    plan = Plan.from_decisions(target, decisions, device=device, budget=str(parsed), solver=solver)
    if plan.predicted_activation_bytes > limit:  # the solvers' contract; never hand out an over-budget plan
        raise RuntimeError(
            f"solver {solver!r} returned a plan of {plan.predicted_activation_bytes} activation bytes over the "
            f"limit {limit}; this is a remat_kit bug, please report it with the graph."
        )
    return plan


def _check_solver(solver: str | None) -> str:
    if solver is None:
        return "dp"
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not a solver; pass one of {list(SOLVERS)} or None (= 'dp').")
    return solver


def _codes_from_milp(graph: CostGraph, res) -> list[int]:
    codes = [_SAVE] * len(graph)
    for i in res.recompute:
        codes[i] = _RECOMPUTE
    for i in res.offload:
        codes[i] = _OFFLOAD
    return codes


# -- chain DP ---------------------------------------------------------------------------------
def block_menus(graph: CostGraph, costs: Costs, offload: bool) -> list[list[chain_dp.BlockOption]]:
    """Per-block option menus; blocks with the same signature share one (shifted) menu."""
    key = ("menus", offload, tuple(costs.recompute))
    if key in graph._cache:
        return graph._cache[key]
    menus: list[list[chain_dp.BlockOption]] = []
    by_signature: dict[tuple, tuple[int, list[chain_dp.BlockOption]]] = {}
    sigs = [chain_dp.block_signature(graph, blk) for blk in range(graph.num_blocks)]
    exact = op_level_blocks(graph, sigs)
    for blk, sig in enumerate(sigs):
        if sig in by_signature:
            rep, menu = by_signature[sig]
            shift = graph.block_members[blk][0] - graph.block_members[rep][0]
            menus.append([o.at(graph, blk, shift) for o in menu])
            continue
        menu = _menu_for_block(graph, blk, costs, offload, blk in exact)
        by_signature[sig] = (blk, menu)
        menus.append(menu)
    graph._cache[key] = menus
    return menus


def op_level_work(graph: CostGraph, blk: int) -> int:
    """What the op-level programs of one block menu cost, in (free values)²: the program has a
    variable per value and moment of the block's backward."""
    return sum(not graph.is_forced[i] for i in graph.block_members[blk]) ** 2


def op_level_blocks(graph: CostGraph, sigs: Sequence[tuple] | None = None) -> set[int]:
    """The blocks whose menus come from the op-level program (the others get ladder menus only).

    Programs are spent where they serve most: a block whose signature repeats (a layer: one menu
    serves every copy) up to `MILP_LAYER_WORK` each; the other blocks, smallest first, while
    their total stays within `MILP_MENU_WORK`. So a transformer's layer gets exact menus, and
    neither a chain of hundreds of distinct blocks nor one block of thousands of values builds
    programs it cannot afford (nor one past `milp.MAX_VARIABLES`).
    """
    sigs = sigs if sigs is not None else [chain_dp.block_signature(graph, b) for b in range(graph.num_blocks)]
    count = Counter(sigs)
    first = {}
    for blk, sig in enumerate(sigs):
        first.setdefault(sig, blk)
    spent, chosen = 0, set()
    for blk in sorted(first.values(), key=lambda b: (-count[sigs[b]], op_level_work(graph, b), b)):
        work = op_level_work(graph, blk)
        if count[sigs[blk]] > 1 and work <= MILP_LAYER_WORK:
            chosen.add(blk)  # a layer's menu: its programs are paid once for every copy
        elif spent + work <= MILP_MENU_WORK:
            chosen.add(blk)
            spent += work
    return chosen


def _menu_for_block(graph: CostGraph, blk: int, costs: Costs, offload: bool, exact: bool = True) -> list[chain_dp.BlockOption]:
    free = [i for i in graph.block_members[blk] if not graph.is_forced[i]]
    candidates: dict[tuple, str] = {}

    def add(codes: dict[int, int], label: str) -> None:
        key = tuple(sorted((i, c) for i, c in codes.items() if c != _SAVE))
        candidates.setdefault(key, label)

    add({}, "keep all")
    add({i: _RECOMPUTE for i in free}, "full recompute")
    if offload:
        add({i: _OFFLOAD for i in free if graph.is_residual[i]}, "offload all")
    measured = [_measure(graph, blk, dict(k), costs, label) for k, label in candidates.items()]
    lo = min(o.kept_bytes for o in measured)
    hi = max(o.kept_bytes for o in measured)
    min_local = min(o.local_peak for o in measured)
    free_set = set(free)
    if not exact:
        # Only where no program runs: the cheapest-per-byte rungs are mostly elementwise values
        # that XLA fuses into the backward and never stores, so next to the programs' options they
        # win in the model and buy nothing compiled (Flax lm1b at 0.5: 0.444 of no remat with the
        # programs' menus, no plan under 0.58 with the rungs added).
        for codes, label in ladder.ladder(graph, range(blk, blk + 1), costs.recompute, free_set.__contains__):
            k = tuple(sorted(codes.items()))
            if k not in candidates:
                candidates[k] = label
                measured.append(_measure(graph, blk, codes, costs, label))
    if free and hi > lo and exact:
        # The block's program runs on its window (the block and its neighbours), which has the
        # same local memory as the whole graph (see chain_dp.window) and is much smaller.
        win = chain_dp.window(graph, blk)
        sub, offset = win.graph, win.offset
        back = {j: i for i, j in win.index_map.items()}
        sub_rec = [costs.recompute[back[j]] if j in back else 0 for j in range(len(sub))]
        sub_off = [costs.offload[back[j]] if j in back else 0 for j in range(len(sub))]

        def solve_block(cap: int, local_limit: int | None) -> chain_dp.BlockOption | None:
            res = solve_milp(
                sub, limit=local_limit, rec_cost=sub_rec, off_cost=sub_off if offload else None,
                blocks=[blk - offset], kept_cap=cap, backward_bytes=win.earlier_seed_bytes,
            )
            if res is None:
                return None
            codes = {back[j]: c for j, c in enumerate(_codes_from_milp(sub, res)) if back.get(j) in free_set}
            key = tuple(sorted((i, c) for i, c in codes.items() if c != _SAVE))
            if key not in candidates:
                candidates[key] = f"selective (kept <= {format_bytes(cap)})"
                measured.append(_measure(graph, blk, codes, costs, candidates[key]))
            return next(o for o in measured if o.codes == key)

        # Caps from loose to tight. The optimum under a looser cap that also fits a tighter one is
        # the optimum there too, so it is reused instead of solved again. Under each cap: the
        # cheapest plan, and if its local peak is above the least any option reaches, also the
        # cheapest under both caps (that matters for the block where the peak is).
        last: dict[int | None, chain_dp.BlockOption | None] = {}
        for step in reversed(range(1, NUM_CAPS)):
            cap = lo + (hi - lo) * step // NUM_CAPS
            for local_limit in (None, min_local):
                if local_limit in last and (last[local_limit] is None or last[local_limit].kept_bytes <= cap):
                    option = last[local_limit]  # infeasible stays infeasible; a fitting optimum stays optimal
                else:
                    option = last[local_limit] = solve_block(cap, local_limit)
                if option is not None and option.local_peak <= min_local:
                    break
    return _pareto(measured)


def _measure(graph: CostGraph, blk: int, codes: dict[int, int], costs: Costs, label: str) -> chain_dp.BlockOption:
    return chain_dp.measure_option(graph, blk, codes, costs.of, label)


def _pareto(options: list[chain_dp.BlockOption]) -> list[chain_dp.BlockOption]:
    """Drop options no better than another in kept bytes, both local peaks and (cost, ops) at once
    (both peaks, not L: L depends on the position, and a menu serves every identical block)."""

    def key(o: chain_dp.BlockOption) -> tuple[int, int, int, int, int]:
        return (o.kept_bytes, o.forward_peak, o.backward_peak, o.cost, o.num_ops)

    out = []
    for o in options:
        ko = key(o)
        dominated = any(
            key(p) != ko and all(a <= b for a, b in zip(key(p)[:3], ko[:3])) and key(p)[3:] <= ko[3:]
            for p in options
        )
        if not dominated and all(key(p) != ko for p in out):
            out.append(o)
    return out


def segment_cap(num_blocks: int) -> int:
    """A default `max_segment_blocks` for a chain of `num_blocks` (adapters use it).

    For n equal blocks the memory-optimal uniform segment is about √n long (n/k kept boundaries
    against k blocks' recompute transient; Chen et al. 2016); twice that leaves the DP room for
    uneven chains and for the rotor-style mix of short and long segments, while the segment
    options stay O(n·2√n) (identical runs of blocks share them) instead of O(n²).
    """
    if num_blocks < 3:
        return 1
    return min(num_blocks, max(2, math.ceil(2 * math.sqrt(num_blocks))))


def segment_options(graph: CostGraph, costs: Costs, max_span: int,
                    fixed: frozenset[str] = frozenset()) -> list[list[chain_dp.BlockOption]]:
    """Per start block: full recompute of 2..max_span consecutive blocks merged into one segment
    (blocks named in `fixed` join none).

    The boundaries inside a segment are dropped and recomputed from the segment's input, as in
    Chen et al.'s √n checkpointing and rotor's DP: less kept memory, a bigger backward transient.
    """
    out: list[list[chain_dp.BlockOption]] = [[] for _ in range(graph.num_blocks)]
    seen: dict[tuple, tuple[int, chain_dp.BlockOption]] = {}
    sigs = [chain_dp.block_signature(graph, b) for b in range(graph.num_blocks)]
    for first in range(graph.num_blocks):
        if graph.block_names[first] in fixed:
            continue
        for last in range(first + 1, min(first + max_span, graph.num_blocks)):
            if graph.block_names[last] in fixed:
                break
            members = [i for b in range(first, last + 1) for i in graph.block_members[b]]
            key = tuple(sigs[first:last + 1])
            if key in seen:  # the same blocks again (a transformer's layers): shift the codes
                base, option = seen[key]
                out[first].append(option.at(graph, first, members[0] - base))
                continue
            inside = set(members)
            codes = {
                i: _RECOMPUTE for i in members
                if not graph.is_output[i]
                and all(c in inside for c in (*graph.consumers[i], *graph.bwd_readers[i]))
            }
            option = chain_dp.measure_option(
                graph, first, codes, costs.of, f"segment of {last - first + 1} blocks", last=last,
            )
            seen[key] = (members[0], option)
            out[first].append(option)
    return out


def _solve_dp(graph: CostGraph, limit: int, costs: Costs, offload: bool, spans: tuple[int, frozenset[str]]):
    """(codes, segments or None) of the least-cost path, or None when nothing fits."""
    options = _dp_options(graph, costs, offload, spans)
    found = chain_dp.solve_chain(options, limit)
    if found is None:
        return None
    path = found[0]
    codes = [_SAVE] * len(graph)
    segments = []
    for start, k in path:
        option = options[start][k]
        for i, c in option.codes:
            codes[i] = c
        segments.append(list(graph.block_names[start:start + option.span]))
    merged = any(len(seg) > 1 for seg in segments)
    return codes, (segments if merged else None)


def _dp_options(graph: CostGraph, costs: Costs, offload: bool,
                spans: tuple[int, frozenset[str]]) -> list[list[chain_dp.BlockOption]]:
    """Block menus, plus segment options when `spans` = (max blocks per segment, fixed blocks) allows."""
    max_span, fixed = spans
    menus = block_menus(graph, costs, offload)
    if max_span <= 1:
        return menus
    key = ("segments", max_span, fixed, tuple(costs.recompute))
    if key not in graph._cache:
        graph._cache[key] = segment_options(graph, costs, max_span, fixed)
    return [menu + extra for menu, extra in zip(menus, graph._cache[key])]


# -- greedy -----------------------------------------------------------------------------------
def _solve_greedy(graph: CostGraph, limit: int, costs: Costs) -> list[int] | None:
    """Recompute the top-k residuals by bytes per cost; the least k that fits (binary search)."""
    order = sorted(
        (i for i in graph.free_values if graph.is_residual[i]),
        key=lambda i: (-graph.values[i].num_bytes / (costs.recompute[i] + 1), i),
    )

    def codes_for(k: int) -> list[int]:
        codes = [_SAVE] * len(graph)
        for i in order[:k]:
            codes[i] = _RECOMPUTE
        return codes

    def fits(k: int) -> bool:
        return _run(graph, codes_for(k), False)[0] <= limit

    if not fits(len(order)):
        # The peak is not monotone in k (recompute transients); try every k before giving up.
        k = next((k for k in range(len(order)) if fits(k)), None)
        return None if k is None else codes_for(k)
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return codes_for(lo)


# -- infeasible budgets -----------------------------------------------------------------------
def smallest_activation_bytes(
    graph: CostGraph, *, offload: bool = False, device: DeviceSpec | None = None, max_segment_blocks: int = 1,
    fixed_blocks: Collection[str] = (),
) -> int:
    """The least activation peak remat_kit's plans reach (keep-all, full recompute, selective,
    offload, segments of up to `max_segment_blocks` blocks)."""
    costs = Costs(graph, device or DeviceSpec())
    return chain_dp.min_peak(_dp_options(graph, costs, offload, (max_segment_blocks, frozenset(fixed_blocks))))


def _offload_all(graph: CostGraph, costs: Costs, blk: int) -> list[chain_dp.BlockOption]:
    residuals = {i: _OFFLOAD for i in graph.block_members[blk] if graph.is_residual[i] and not graph.is_forced[i]}
    return [_measure(graph, blk, residuals, costs, "offload all")] if residuals else []


def _infeasible(
    graph: CostGraph, parsed: Budget, raw: object, costs: Costs, offload: bool, baseline: int,
    spans: tuple[int, frozenset[str]],
) -> InfeasibleBudgetError:
    max_span, fixed = spans
    smallest = chain_dp.min_peak(_dp_options(graph, costs, offload, spans))
    fraction = smallest / baseline if baseline else 1.0
    smallest_total = smallest + graph.constant_bytes
    if parsed.kind == "fraction":
        need = f"{math.ceil(fraction * 1000) / 1000:g}"
    else:
        need = f"{format_bytes(smallest_total)} ({smallest_total} bytes)"
    hint = "raise it"
    options = _dp_options(graph, costs, offload, spans)
    # The hints are checked on cheap options only (every block offloaded; segments where the
    # chain repeats, so their options are shared): on hundreds of distinct blocks a full check
    # would cost more than the plan itself. What is not checked is said as a possibility.
    if not offload and chain_dp.min_peak([m + _offload_all(graph, costs, b) for b, m in enumerate(options)]) < smallest:
        hint += " or pass offload=True"
    elif max_span == 1 and len(set(chain_dp.block_signature(graph, b) for b in range(graph.num_blocks))) > 16:
        hint += ", let segments span blocks (max_segment_blocks=4 or more), which may go lower"
    elif max_span == 1 and chain_dp.min_peak(_dp_options(graph, costs, offload, (4, fixed))) < smallest:
        hint += " or let segments span blocks (max_segment_blocks=4)"
    else:
        hint += ", or make the blocks smaller (their boundaries and one block's backward are the floor)"
    return InfeasibleBudgetError(
        f"budget={raw!r} is below the smallest feasible budget {need} "
        f"({format_bytes(smallest)} of activations, {fraction:.1%} of no remat, "
        f"{format_bytes(graph.constant_bytes)} of parameters, gradients and inputs); {hint}.",
        smallest_fraction=fraction,
        smallest_bytes=smallest_total,
    )
