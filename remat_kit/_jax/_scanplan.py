"""Plans for scanned layers: one body plan shared by every iteration (see `_plan`'s module doc).

Each option of the body's block menu (the core's op-level 0-1 programs at several caps), bodies
at the kept-bytes cap that just fits (`_refined`), and grouped options (g layers per loop step,
each group one segment recomputed from its input carry) are tried in every iteration at once,
with the core's chain DP over the blocks outside the scans; the least-cost combination that
fits wins.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from remat_kit._core import chain_dp
from remat_kit._core.budget import format_bytes
from remat_kit._core.graph import DeviceSpec
from remat_kit._core.menus import block_program
from remat_kit._core.plan import DecisionCode, Plan
from remat_kit._core.simulate import baseline_activation_bytes
from remat_kit._core.solve import Costs, InfeasibleBudgetError, block_menus, op_level_work, segment_cap, segment_options
from remat_kit._jax._graph import Traced

MAX_SCAN_COMBOS = 64
MAX_REFINE_WORK = 40_000  # (free values)² of a scan body past which it is not refined by op-level programs
NUM_REFINE = 8  # bisection steps on the per-layer kept-bytes cap of a scan body


def scan_groups(num_layers: int) -> list[int]:
    """Layers per loop step a grouped plan may use on a scan of `num_layers`: the divisors g > 1
    of the length, up to `segment_cap` (the same reach as segments on an unrolled chain)."""
    return [g for g in range(2, segment_cap(num_layers) + 1) if num_layers % g == 0]


def plan_from_codes(
    traced: Traced, codes: dict[int, int], parsed, label: str, segments: list[list[str]] | None = None
) -> Plan:
    graph = traced.graph
    target = graph.regroup(segments) if segments and any(len(seg) > 1 for seg in segments) else graph
    free = set(target.free_values)
    decisions = {graph.values[i].name: DecisionCode(c).decision for i, c in codes.items() if c and i in free}
    return Plan.from_decisions(target, decisions, budget=str(parsed), solver=label)


def uniform_scans(
    traced: Traced, scans, parsed, raw, offload: bool, device: DeviceSpec, scan_group: int | None = None
) -> Plan:
    """The least-cost combination of per-scan options (each used in every iteration) with the
    chain DP over the blocks outside the scans, within the budget's limit."""
    graph = traced.graph
    costs = Costs(graph, device)
    menus = scan_menus(graph, costs, offload, scans)
    baseline = baseline_activation_bytes(graph)
    limit = parsed.limit_activation_bytes(baseline, graph.constant_bytes)
    refine_at = limit if len(scans) == 1 else None
    per_scan = [scan_options(traced, s, costs, menus, offload, scan_group, refine_at) for s in scans]
    best, smallest = None, None
    for trial in trials(graph, menus, per_scan):
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
    return _scan_plan(traced, parsed, best[1], best[2])


def scan_menus(graph, costs: Costs, offload: bool, scans) -> list:
    """The core's block menus as the scans' plans read them: a scan fixes every layer to its first
    layer's option, so the other layers' menus are never read and get no op-level programs (on the
    bench's GPT those were most of the solve's work, for a signature the scan never uses)."""
    inner = {b for s in scans for b in s.blocks[1:]}
    return block_menus(graph, costs, offload, read=frozenset(range(graph.num_blocks)) - inner)


def scan_options(
    traced: Traced, scan, costs: Costs, menus, offload: bool, scan_group: int | None, refine_at: int | None
) -> list[dict]:
    """One scan's candidate options, each as {iteration block: option, or None inside a group}:
    the body's menu used in every iteration, grouped options, and (`refine_at`: the limit)
    bodies at the kept-bytes cap that just fits it."""
    graph = traced.graph
    b0 = scan.blocks[0]
    memo = _memo(graph, scan, costs, offload)
    same = all(chain_dp.block_signature(graph, b) == chain_dp.block_signature(graph, b0) for b in scan.blocks[1:])

    def uniform(opt):
        if id(opt) not in memo.uniform:  # the option is held beside its result, so its id stays its own
            if same:
                offsets = {b: graph.block_members[b][0] - graph.block_members[b0][0] for b in scan.blocks}
                memo.uniform[id(opt)] = (opt, {b: opt.at(graph, b, k) for b, k in offsets.items()})
            else:
                memo.uniform[id(opt)] = (opt, _translate(traced, scan, opt, costs))
        return memo.uniform[id(opt)][1]

    groups = (
        scan_groups(len(scan.blocks))
        if scan_group is None
        else ([scan_group] if scan_group > 1 and len(scan.blocks) % scan_group == 0 else [])
    )
    options = grouped(graph, costs, scan, groups)
    if scan_group in (None, 1) or not options:  # per-layer plans (also where a group size does not fit the scan)
        options = [uniform(o) for o in menus[b0]] + options
        if refine_at is not None:
            options += _refined(graph, menus, memo, b0, refine_at, uniform)
    return options


def trials(graph, menus, per_scan: list[list[dict]]):
    """Per combination of scan options (at most `MAX_SCAN_COMBOS`): every block's menu, the
    scans' blocks fixed to the combination's option (none inside a group)."""
    for combo in itertools.islice(itertools.product(*per_scan), MAX_SCAN_COMBOS):
        fixed: dict = {}
        for chosen in combo:
            fixed.update(chosen)
        yield [([] if fixed[b] is None else [fixed[b]]) if b in fixed else menus[b] for b in range(graph.num_blocks)]


def _scan_plan(traced: Traced, parsed, trial, choice) -> Plan:
    """The plan of the DP's `choice` over `trial`'s options, its segments the grouped options' spans."""
    graph = traced.graph
    codes: dict[int, int] = {}
    segments = []
    for b, c in choice:
        codes.update(dict(trial[b][c].codes))
        segments.append(list(graph.block_names[b : b + trial[b][c].span]))
    grouped = any(len(seg) > 1 for seg in segments)
    return plan_from_codes(traced, codes, parsed, "auto:scan:grouped" if grouped else "auto:scan", segments)


def grouped(graph, costs: Costs, scan, groups: list[int]) -> list[dict]:
    """Per group size g: every g consecutive iterations one segment, fully recomputed from its
    input carry (the core's segment options of span g at b0, b0 + g, ...)."""
    if not groups:
        return []
    key = ("jax-scan-segments", max(groups), tuple(costs.recompute))
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


@dataclasses.dataclass
class _ScanMemo:
    """What a scan's solves share, whatever the budget: menu options applied to every iteration
    (by the option's id), the body's program (`block_program`) and its options by kept-bytes cap.
    The verifier solves the same graph at several targets, and `floor` before them."""

    costs: Costs
    offload: bool
    program: Callable | None = None
    uniform: dict = dataclasses.field(default_factory=dict)
    at_cap: dict = dataclasses.field(default_factory=dict)


def _memo(graph, scan, costs: Costs, offload: bool) -> _ScanMemo:
    key = ("jax-scan", tuple(scan.blocks), offload, tuple(costs.recompute), tuple(costs.offload))
    return graph._cache.setdefault(key, _ScanMemo(costs, offload))


def _refined(graph, menus, memo: _ScanMemo, b0: int, limit: int, uniform) -> list[dict]:
    """Body options at the kept-bytes cap that just fits, found by bisection.

    The block menus hold options at a few caps; a plan shared by L layers multiplies any slack
    by L, so the cap is searched directly: the cheapest body under cap c (the core's op-level
    program on the block's window), used in every layer, with the DP over the other blocks.
    """
    free = {i for i in graph.block_members[b0] if not graph.is_forced[i]}
    if not free or op_level_work(graph, b0) > MAX_REFINE_WORK:  # a program that size takes minutes
        return []

    def option_at(cap: int):
        if cap not in memo.at_cap:
            if memo.program is None:
                memo.program = block_program(graph, b0, memo.costs, memo.offload)
            codes = memo.program(cap, None)
            memo.at_cap[cap] = (
                None
                if codes is None
                else chain_dp.measure_option(graph, b0, codes, memo.costs.of, f"selective (kept <= {cap} bytes)")
            )
        return memo.at_cap[cap]

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
