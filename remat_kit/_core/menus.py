"""Block menus for the chain DP: per block, the options (keep all, full recompute, the op-level
program's plans at the vertices of the block's (kept bytes, cost) hull, ladder rungs) and
multi-block segments; and the denser menus around a DP answer that refine it (`fill_options`).

Blocks with the same signature (a transformer's layers) share one menu, shifted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from remat_kit._core import chain_dp, frontier, ladder
from remat_kit._core.constraints import NO_CONSTRAINTS, PlanConstraints
from remat_kit._core.costs import Costs
from remat_kit._core.graph import CostGraph
from remat_kit._core.milp import MilpResult, Program
from remat_kit._core.simulate import _OFFLOAD, _RECOMPUTE, _SAVE

MILP_MENU_WORK = 1_000  # (free values)² of the unrepeated blocks given op-level menus (op_level_blocks): ~0.3 s
MILP_LAYER_WORK = 20_000  # (free values)² up to which a repeated block (a layer) gets op-level menus
MAX_FILL_PROGRAMS = 16  # programs per signature when the DP's answer is refined (fill_options)


def codes_from_milp(graph: CostGraph, res: MilpResult, constraints: PlanConstraints | None = None) -> list[int]:
    """Per-value decision codes of an op-level program's answer (a value the answer does not
    need is SAVE, or RECOMPUTE where `constraints` say it must never be kept)."""
    codes = [_SAVE] * len(graph)
    if constraints:
        for i in constraints.on(graph).recompute:
            codes[i] = _RECOMPUTE
    for i in res.recompute:
        codes[i] = _RECOMPUTE
    for i in res.offload:
        codes[i] = _OFFLOAD
    return codes


def block_program(
    graph: CostGraph, blk: int, costs: Costs, offload: bool, constraints: PlanConstraints | None = None
) -> Callable[..., dict[int, int] | None]:
    """Plan one block under a cap: a function (kept-bytes cap or None, local peak limit or None,
    kept_price=0.0) -> the cheapest decision codes for the block's free values that honour
    `constraints` (cost plus `kept_price` per byte kept, where one is given), or None where
    nothing fits.

    It is the op-level 0-1 program on the block's window (the block and its neighbours), which has
    the same local memory as the whole graph (see chain_dp.window) and is much smaller.
    """
    free = {i for i in graph.block_members[blk] if not graph.is_forced[i]}
    win = chain_dp.window(graph, blk)
    sub, offset = win.graph, win.offset
    back = {j: i for i, j in win.index_map.items()}
    sub_rec = [costs.recompute[back[j]] if j in back else 0 for j in range(len(sub))]
    sub_off = [costs.offload[back[j]] if j in back else 0 for j in range(len(sub))]

    built: dict[tuple[bool, bool], Program] = {}  # by (local limit given, cap given): their rows exist

    def solve(cap: int | None, local_limit: int | None = None, kept_price: float = 0.0) -> dict[int, int] | None:
        # Built once per pattern: a search over caps or prices changes only bounds and costs.
        pattern = (local_limit is not None, cap is not None)
        if pattern not in built:
            built[pattern] = Program(
                sub,
                rec_cost=sub_rec,
                off_cost=sub_off if offload else None,
                blocks=[blk - offset],
                backward_bytes=win.earlier_seed_bytes,
                constraints=constraints,
                limited=pattern[0],
                capped=pattern[1],
            )
        res = built[pattern].solve(local_limit, cap, kept_price)
        if res is None:
            return None
        return {back[j]: c for j, c in enumerate(codes_from_milp(sub, res, constraints)) if back.get(j) in free}

    return solve


def block_menus(
    graph: CostGraph,
    costs: Costs,
    offload: bool,
    constraints: PlanConstraints | None = None,
    read: frozenset[int] | None = None,
) -> list[list[chain_dp.BlockOption]]:
    """Per-block option menus, every option honouring `constraints`; blocks with the same
    signature share one (shifted) menu. `read`: the blocks whose menus the caller reads (None:
    all); a signature no such block has gets no op-level programs (a JAX scan reads its first
    layer's menu alone), the others' menus are the same as without it."""
    constraints = constraints or NO_CONSTRAINTS
    key = ("menus", offload, tuple(costs.recompute), read) + ((constraints,) if constraints else ())
    if key in graph._cache:
        return graph._cache[key]
    menus: list[list[chain_dp.BlockOption]] = []
    by_signature: dict[tuple, tuple[int, list[chain_dp.BlockOption]]] = {}
    sigs = signatures(graph, constraints)
    exact = op_level_blocks(graph, sigs)
    if read is not None:
        wanted = {sigs[b] for b in read}
        exact = {b for b in exact if sigs[b] in wanted}
    for blk, sig in enumerate(sigs):
        if sig in by_signature:
            rep, menu = by_signature[sig]
            shift = graph.block_members[blk][0] - graph.block_members[rep][0]
            menus.append([o.at(graph, blk, shift) for o in menu])
            continue
        menu = _menu_for_block(graph, blk, costs, offload, blk in exact, constraints)
        by_signature[sig] = (blk, menu)
        menus.append(menu)
    graph._cache[key] = menus
    return menus


def signatures(graph: CostGraph, constraints: PlanConstraints | None = None) -> list[tuple]:
    """Per block: its `chain_dp.block_signature`, with what `constraints` say of it where they say
    anything (blocks alike in both share one menu)."""
    sigs = [chain_dp.block_signature(graph, blk) for blk in range(graph.num_blocks)]
    if not constraints:
        return sigs
    bound = constraints.on(graph)
    return [(sig, bound.tags(graph, blk)) for blk, sig in enumerate(sigs)]


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
    first: dict[object, int] = {}
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


def _menu_for_block(
    graph: CostGraph,
    blk: int,
    costs: Costs,
    offload: bool,
    exact: bool = True,
    constraints: PlanConstraints = NO_CONSTRAINTS,
) -> list[chain_dp.BlockOption]:
    """One block's menu: rule options, then (where `exact`) the op-level program's plans at the
    vertices of the lower convex hull of the block's (kept bytes, cost) trade-off (frontier.py);
    elsewhere ladder rungs."""
    free = [i for i in graph.block_members[blk] if not graph.is_forced[i]]
    bound = constraints.on(graph)
    candidates: dict[tuple, str] = {}
    measured: list[chain_dp.BlockOption] = []

    def add(codes: dict[int, int], label: str) -> chain_dp.BlockOption | None:
        """The option of `codes` (settled to the constraints where it is a rule's plan), measured
        once; None where the constraints leave no such plan."""
        if bound:
            settled = bound.settle(graph, codes, graph.block_members[blk])
            if settled is None:
                return None
            codes = settled
        key = tuple(sorted((i, c) for i, c in codes.items() if c != _SAVE))
        if key not in candidates:
            candidates[key] = label
            measured.append(_measure(graph, blk, dict(key), costs, label))
        return next(o for o in measured if o.codes == key)

    add({}, "keep all")
    kept_together = bound.saved_groups  # a group with a must-save value is kept whole
    add({i: _RECOMPUTE for i in free if i not in kept_together}, "full recompute")
    if offload:
        add({i: _OFFLOAD for i in free if graph.is_residual[i]}, "offload all")
    if not exact:
        # Only where no program runs: the cheapest-per-byte rungs are mostly elementwise values
        # that XLA fuses into the backward and never stores, so next to the programs' options they
        # win in the model and buy nothing compiled (Flax lm1b at 0.5: 0.444 of no remat with the
        # programs' menus, no plan under 0.58 with the rungs added).
        for codes, label in ladder.ladder(graph, range(blk, blk + 1), costs.recompute, set(free).__contains__):
            add(codes, label)
    if free and exact:
        frontier.add_hull_options(block_program(graph, blk, costs, offload, constraints), measured, add)
    return _pareto(measured)


def fill_options(
    graph: CostGraph,
    costs: Costs,
    offload: bool,
    constraints: PlanConstraints,
    chosen: Sequence[tuple[int, chain_dp.BlockOption]],
    price: float,
) -> dict[int, list[chain_dp.BlockOption]]:
    """Narrower, denser menus around the options the DP chose ((start block, option) pairs of its
    path), for the blocks of each signature with an op-level menu where the frontier adds plans.

    The range of kept bytes per signature: from the menu's level next below those chosen to the
    one next above, widened to the hull vertices next to the one `price` supports (the λ of
    `frontier.lower_bound`: the optimum may move a block the DP left at full recompute to a plan
    between two vertices). The new menu: the options in that range and the frontier plans between
    (`frontier.walk`: at most `MAX_FILL_PROGRAMS` programs for a signature that repeats, a quarter
    of that for one block), shifted to each block of that signature. The chosen options stay, so
    the DP over them does no worse; the options left out keep its second run about as cheap as
    its first.
    """
    sigs = signatures(graph, constraints)
    exact = op_level_blocks(graph, sigs)
    menus = block_menus(graph, costs, offload, constraints)
    first: dict[tuple, int] = {}
    for blk, sig in enumerate(sigs):
        first.setdefault(sig, blk)
    kept_by_sig: dict[tuple, list[int]] = {}
    for start, option in chosen:
        if option.span == 1 and first[sigs[start]] in exact:
            kept_by_sig.setdefault(sigs[start], []).append(option.kept_bytes)
    count = Counter(sigs)
    out: dict[int, list[chain_dp.BlockOption]] = {}
    for sig, kept in kept_by_sig.items():
        rep = first[sig]
        menu = menus[rep]
        low, high = frontier.support_range(menu, price)
        above = max(high, min((o.kept_bytes for o in menu if o.kept_bytes > max(kept)), default=max(kept)))
        below = min(low, max((o.kept_bytes for o in menu if o.kept_bytes < min(kept)), default=min(kept)))
        budget = MAX_FILL_PROGRAMS if count[sig] > 1 else MAX_FILL_PROGRAMS // 4
        found = _walked(graph, costs, offload, constraints, rep, (above, below, budget), {o.codes for o in menu})
        if not found:
            continue
        for blk, other in enumerate(sigs):
            if other == sig:
                shift = graph.block_members[blk][0] - graph.block_members[rep][0]
                near = [o for o in menus[blk] if below <= o.kept_bytes <= above]
                out[blk] = near + [o.at(graph, blk, shift) for o in found]
    return out


def _walked(
    graph: CostGraph,
    costs: Costs,
    offload: bool,
    constraints: PlanConstraints,
    rep: int,
    span: tuple[int, int, int],
    known: set[tuple],
) -> list[chain_dp.BlockOption]:
    """`frontier.walk` of block `rep` over `span` = (kept bytes above, below, most programs), the
    plans not in `known`; cached on the graph (a later budget often walks the same range)."""
    prices = (tuple(costs.recompute), tuple(costs.offload) if offload else None)  # what the programs read
    setting = (*prices, rep, *((constraints,) if constraints else ()))
    key = ("walk", span, *setting)
    if key not in graph._cache:
        # A walk from another level joins this one's caps at the first plan both reach (each next
        # cap is one byte under the last plan's kept bytes), so the programs' answers are kept
        # per cap for every walk of this block: a budget search's walks mostly repeat them.
        answers = graph._cache.setdefault(("walk programs", *setting), {})
        solve = block_program(graph, rep, costs, offload, constraints)

        def program(cap: int | None, local_limit: int | None = None) -> dict[int, int] | None:
            if (cap, local_limit) not in answers:
                answers[cap, local_limit] = solve(cap, local_limit)
            return answers[cap, local_limit]

        options: list[chain_dp.BlockOption] = []

        def add(codes: dict[int, int], label: str) -> chain_dp.BlockOption:
            options.append(_measure(graph, rep, codes, costs, label))
            return options[-1]

        above, below, most = span
        frontier.walk(program, above, below, most, add)
        graph._cache[key] = options
    return [o for o in graph._cache[key] if o.codes not in known]


def _measure(graph: CostGraph, blk: int, codes: dict[int, int], costs: Costs, label: str) -> chain_dp.BlockOption:
    return chain_dp.measure_option(graph, blk, codes, costs.of, label)


def _pareto(options: list[chain_dp.BlockOption]) -> list[chain_dp.BlockOption]:
    """Drop options no better than another in kept bytes, both local peaks and (cost, ops) at once
    (both peaks, not L: L depends on the position, and a menu serves every identical block)."""

    def key(o: chain_dp.BlockOption) -> tuple[int, int, int, int, int]:
        return (o.kept_bytes, o.forward_peak, o.backward_peak, o.cost, o.num_ops)

    out: list[chain_dp.BlockOption] = []
    for o in options:
        ko = key(o)
        dominated = any(
            key(p) != ko and all(a <= b for a, b in zip(key(p)[:3], ko[:3])) and key(p)[3:] <= ko[3:] for p in options
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


def segment_options(
    graph: CostGraph,
    costs: Costs,
    max_span: int,
    fixed: frozenset[str] = frozenset(),
    constraints: PlanConstraints | None = None,
) -> list[list[chain_dp.BlockOption]]:
    """Per start block: full recompute of 2..max_span consecutive blocks merged into one segment
    (blocks named in `fixed` join none), honouring `constraints`.

    The boundaries inside a segment are dropped and recomputed from the segment's input, as in
    Chen et al.'s √n checkpointing and rotor's DP: less kept memory, a bigger backward transient.
    """
    out: list[list[chain_dp.BlockOption]] = [[] for _ in range(graph.num_blocks)]
    seen: dict[tuple, tuple[int, chain_dp.BlockOption]] = {}
    sigs = signatures(graph, constraints)
    for first in range(graph.num_blocks):
        if graph.block_names[first] in fixed:
            continue
        for last in range(first + 1, min(first + max_span, graph.num_blocks)):
            if graph.block_names[last] in fixed:
                break
            members = [i for b in range(first, last + 1) for i in graph.block_members[b]]
            key = tuple(sigs[first : last + 1])
            if key in seen:  # the same blocks again (a transformer's layers): shift the codes
                base, option = seen[key]
                out[first].append(option.at(graph, first, members[0] - base))
                continue
            option = chain_dp.measure_option(
                graph,
                first,
                _segment_codes(graph, members, constraints),
                costs.of,
                f"segment of {last - first + 1} blocks",
                last=last,
            )
            seen[key] = (members[0], option)
            out[first].append(option)
    return out


def _segment_codes(graph: CostGraph, members: list[int], constraints: PlanConstraints | None) -> dict[int, int]:
    """Full recompute of a segment's values that nothing outside it reads. Under `constraints`
    must-save values and the groups holding one are kept (then no member of theirs is recomputed),
    and every other value of the segment is recomputed, so the constraints hold as they come."""
    inside = set(members)
    kept: frozenset[int] = frozenset()
    if constraints:
        names = constraints.must_save | {n for g in constraints.same_fate if g & constraints.must_save for n in g}
        kept = frozenset(i for i in members if graph.values[i].name in names)
    return {
        i: _RECOMPUTE
        for i in members
        if i not in kept
        and not graph.is_output[i]
        and all(c in inside for c in (*graph.consumers[i], *graph.bwd_readers[i]))
    }
