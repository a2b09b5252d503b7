"""From a traced cost graph and a budget to per-value decisions.

Three cases, by the structure `_graph.build` found:

* a top-level `scan` over layers: one scan body runs every layer, so its plan must be the same
  in every iteration. Each option of the body's block menu (the core's op-level 0-1 programs at
  several caps) is tried in every iteration at once, the blocks outside the scan are left to
  the core's chain DP, and the least-cost combination that fits wins. Scanned layers also get
  grouped options: g layers per loop step (g dividing L, up to `segment_cap(L)`), each group one
  segment recomputed from its input carry (the core's `segment_options` of span g at starts
  b0, b0 + g, ...), which drops the L - L/g kept carries a per-layer plan cannot go below;
  `_run` runs them by regrouping the scan (as the √n layout of scanned layers does);
* several blocks without a scan (unrolled layers): the core's `solve`, whose chain DP may also
  checkpoint up to `segment_cap(n)` consecutive blocks as one segment (their inner boundaries
  recomputed, as √n checkpointing and rotor do; `_run` runs a segment as one region). On a
  chain of small blocks the kept boundaries are the floor of one checkpoint per block, and only
  segments go below it;
* one layer its caller repeats (`per_call`: a decorated layer class or a scan body, one block):
  a fractional budget bounds what each call keeps for its backward, as a fraction of what no
  remat keeps (the activation memory of a deep stack of it, up to one layer's recompute
  transient). A byte budget bounds the single call's whole peak. A function or model of one
  block is planned as a whole step like any other (the core's `solve`).
"""

from __future__ import annotations

import itertools
import math

from remat_kit._core import chain_dp
from remat_kit._core.budget import format_bytes, parse_budget
from remat_kit._core.graph import DeviceSpec
from remat_kit._core.menus import block_program
from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import baseline_activation_bytes
from remat_kit._core.solve import (
    Costs,
    InfeasibleBudgetError,
    block_menus,
    op_level_work,
    segment_cap,
    segment_options,
    solve,
)
from remat_kit._jax._device import default_device
from remat_kit._jax._graph import Traced

_NAMES = {0: Decision.SAVE, 1: Decision.RECOMPUTE, 2: Decision.OFFLOAD}
MAX_SCAN_COMBOS = 64
PIECE_SEGMENT_BLOCKS = 2  # blocks per segment on a chain of pieces (see `choose`)
MAX_REFINE_WORK = 40_000  # (free values)² of a scan body past which it is not refined by op-level programs
NUM_REFINE = 8  # bisection steps on the per-layer kept-bytes cap of a scan body


def scan_groups(num_layers: int) -> list[int]:
    """Layers per loop step a grouped plan may use on a scan of `num_layers`: the divisors g > 1
    of the length, up to `segment_cap` (the same reach as segments on an unrolled chain)."""
    return [g for g in range(2, segment_cap(num_layers) + 1) if num_layers % g == 0]


def choose(
    traced: Traced,
    budget: object,
    *,
    solver: str | None,
    offload: bool,
    device: DeviceSpec | None = None,
    max_segment_blocks: int | None = None,
    scan_group: int | None = None,
    per_call: bool = False,
) -> Plan:
    """The plan for `traced` under `budget` (see the module doc). `max_segment_blocks` overrides
    `segment_cap` on unrolled chains (the verifier asks for coarser segments with it);
    `scan_group` g restricts scans to g layers per loop step (1: per-layer plans only);
    `per_call`: `traced` is one layer its caller repeats, and a fractional budget bounds what
    one call keeps (otherwise it bounds the whole step, one block or many)."""
    graph = traced.graph
    parsed = parse_budget(budget)
    device = device or default_device()
    scans = [s for s in traced.scans.values() if len(s.blocks) > 1 and min(s.blocks) >= 0]
    if parsed.kind == "fraction" and parsed.value == 1.0:
        return Plan.from_decisions(graph, {}, budget=str(parsed), solver="none")
    if scans:
        return _uniform_scans(traced, scans, parsed, budget, offload, device, scan_group)
    if graph.num_blocks >= 2 or parsed.kind == "bytes" or not per_call:
        span = 1
        if solver in (None, "dp") and not traced.scans:
            span = (
                segment_cap(graph.num_blocks)
                if max_segment_blocks is None
                else max(1, min(max_segment_blocks, graph.num_blocks))
            )
            if traced.pieces and max_segment_blocks is None:
                # Pieces are already ~√n ops each, so one checkpoint per piece is the √n layout;
                # longer segments of distinct pieces would each be simulated on their own (no
                # shared options, as identical layers have) for little memory.
                span = min(span, PIECE_SEGMENT_BLOCKS)
        return solve(graph, budget, solver=solver, offload=offload, device=device, max_segment_blocks=span)
    return _one_layer(traced, parsed, budget, offload, device)


def _plan_from_codes(
    traced: Traced, codes: dict[int, int], parsed, label: str, segments: list[list[str]] | None = None
) -> Plan:
    graph = traced.graph
    target = graph.regroup(segments) if segments and any(len(seg) > 1 for seg in segments) else graph
    free = set(target.free_values)
    decisions = {graph.values[i].name: _NAMES[c] for i, c in codes.items() if c and i in free}
    return Plan.from_decisions(target, decisions, budget=str(parsed), solver=label)


def _one_layer(traced: Traced, parsed, raw, offload: bool, device: DeviceSpec) -> Plan:
    graph = traced.graph
    costs = Costs(graph, device)
    menu = block_menus(graph, costs, offload)[0] if graph.num_blocks else []
    keep_all = max((o.kept_bytes for o in menu), default=0)
    if keep_all == 0:
        return Plan.from_decisions(graph, {}, budget=str(parsed), solver="none")
    limit = math.floor(parsed.value * keep_all)
    fits = [o for o in menu if o.kept_bytes <= limit]
    if not fits:
        smallest = min(o.kept_bytes for o in menu)
        raise InfeasibleBudgetError.below(
            raw,
            smallest_activation_bytes=smallest,
            baseline_activation_bytes=keep_all,
            per_call=True,
            where=" for this layer",
            why=f"even full recompute keeps {format_bytes(smallest)} of the {format_bytes(keep_all)} no remat keeps "
            "per call (its inputs and outputs)",
            remedies=[] if offload else ["pass offload=True"],
        )
    best = min(fits, key=lambda o: (o.cost, o.num_ops, o.kept_bytes))
    return _plan_from_codes(traced, dict(best.codes), parsed, f"auto:layer:{best.label}")


def _uniform_scans(
    traced: Traced, scans, parsed, raw, offload: bool, device: DeviceSpec, scan_group: int | None = None
) -> Plan:
    graph = traced.graph
    costs = Costs(graph, device)
    menus = block_menus(graph, costs, offload)
    baseline = baseline_activation_bytes(graph)
    limit = parsed.limit_activation_bytes(baseline, graph.constant_bytes)
    per_scan = []  # per scan: candidate options, each as {iteration block: option, or None inside a group}
    for s in scans:
        b0 = s.blocks[0]
        same = all(chain_dp.block_signature(graph, b) == chain_dp.block_signature(graph, b0) for b in s.blocks[1:])

        def uniform(opt, s=s, b0=b0, same=same):
            if not same:
                return _translate(traced, s, opt, costs)
            return {b: opt.at(graph, b, graph.block_members[b][0] - graph.block_members[b0][0]) for b in s.blocks}

        groups = (
            scan_groups(len(s.blocks))
            if scan_group is None
            else ([scan_group] if scan_group > 1 and len(s.blocks) % scan_group == 0 else [])
        )
        options = _grouped(graph, costs, s, groups)
        if scan_group in (None, 1) or not options:  # per-layer plans (also where a group size does not fit the scan)
            options = [uniform(o) for o in menus[b0]] + options
            if len(scans) == 1:
                options += _refined(graph, menus, s, b0, costs, offload, limit, uniform)
        per_scan.append(options)
    best, smallest = None, None
    combos = itertools.islice(itertools.product(*per_scan), MAX_SCAN_COMBOS)
    for combo in combos:
        fixed = {}
        for chosen in combo:
            fixed.update(chosen)
        trial = [([] if fixed[b] is None else [fixed[b]]) if b in fixed else menus[b] for b in range(graph.num_blocks)]
        peak = chain_dp.min_peak(trial)
        smallest = peak if smallest is None else min(smallest, peak)
        found = chain_dp.solve_chain(trial, limit)
        if found is None:
            continue
        choice = found[0]  # [(start block, option index)]; a grouped option spans its g blocks
        cost = sum(trial[b][c].cost for b, c in choice)
        ops = sum(trial[b][c].num_ops for b, c in choice)
        if best is None or (cost, ops) < best[0]:
            best = ((cost, ops), trial, choice)
    if best is None:
        least = smallest or 0
        raise InfeasibleBudgetError.below(
            raw,
            smallest_activation_bytes=least,
            baseline_activation_bytes=baseline,
            constant_bytes=graph.constant_bytes,
            where=f" ({format_bytes(least)} of activations, {least / baseline if baseline else 1.0:.1%} of no remat)",
            why="no plan goes lower with one plan for every layer, or group of layers, of the scan",
            remedies=[] if offload else ["pass offload=True"],
        )
    _, trial, choice = best
    codes: dict[int, int] = {}
    segments = []
    for b, c in choice:
        codes.update(dict(trial[b][c].codes))
        segments.append(list(graph.block_names[b : b + trial[b][c].span]))
    grouped = any(len(seg) > 1 for seg in segments)
    return _plan_from_codes(traced, codes, parsed, "auto:scan:grouped" if grouped else "auto:scan", segments)


def _grouped(graph, costs: Costs, scan, groups: list[int]) -> list[dict]:
    """Per group size g: every g consecutive iterations one segment, fully recomputed from its
    input carry (the core's segment options of span g at b0, b0 + g, ...)."""
    if not groups:
        return []
    key = ("segments", max(groups), tuple(costs.recompute))  # the key the core's DP caches them under
    if key not in graph._cache:
        graph._cache[key] = segment_options(graph, costs, max(groups))
    seg = graph._cache[key]
    out = []
    for g in groups:
        chosen: dict = {}
        for start in range(0, len(scan.blocks), g):
            b = scan.blocks[start]
            found = [o for o in seg[b] if o.span == g]
            if not found:
                break
            chosen[b] = found[0]
            chosen.update((scan.blocks[start + j], None) for j in range(1, g))
        else:
            out.append(chosen)
    return out


def _translate(traced: Traced, scan, option, costs: Costs) -> dict:
    """One body option applied to every iteration by name (iterations whose blocks differ)."""
    graph = traced.graph
    by_key = {graph.index(n): key for key, n in scan.iter_names[0].items()}
    first = {by_key[i]: c for i, c in option.codes if i in by_key}
    out = {}
    for b, names in zip(scan.blocks, scan.iter_names):
        codes = {graph.index(names[key]): c for key, c in first.items() if key in names}
        codes = {i: c for i, c in codes.items() if not graph.is_forced[i]}
        out[b] = chain_dp.measure_option(graph, b, codes, costs.of, option.label)
    return out


def _refined(graph, menus, scan, b0: int, costs: Costs, offload: bool, limit: int, uniform) -> list[dict]:
    """Body options at the kept-bytes cap that just fits, found by bisection.

    The block menus hold options at a few caps; a plan shared by L layers multiplies any slack
    by L, so the cap is searched directly: the cheapest body under cap c (the core's op-level
    program on the block's window), used in every layer, with the DP over the other blocks.
    """
    free = {i for i in graph.block_members[b0] if not graph.is_forced[i]}
    if not free or op_level_work(graph, b0) > MAX_REFINE_WORK:  # a program that size takes minutes
        return []
    program = block_program(graph, b0, costs, offload)

    def option_at(cap: int):
        codes = program(cap, None)
        if codes is None:
            return None
        return chain_dp.measure_option(graph, b0, codes, costs.of, f"selective (kept <= {cap} bytes)")

    def fits(opt) -> bool:
        fixed = uniform(opt)
        trial = [[fixed[b]] if b in fixed else menus[b] for b in range(graph.num_blocks)]
        return chain_dp.min_peak(trial) <= limit

    kept = [o.kept_bytes for o in menus[b0]]
    lo, hi = min(kept), max(kept)
    found = []
    for _ in range(NUM_REFINE):
        if hi - lo <= max(1, (max(kept) - min(kept)) // 256):
            break
        mid = (lo + hi) // 2
        opt = option_at(mid)
        if opt is not None and fits(opt):
            found.append(uniform(opt))
            lo = mid
        else:
            hi = mid
    return found
