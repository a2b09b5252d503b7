"""A block's trade-off of kept bytes against recompute cost, read off its op-level program.

The chain DP is exact over its menus, so it reaches the whole-graph optimum when each block's
menu holds the per-block plans that optimum uses. On a deep stack of identical layers the optimum
spreads the budget over the layers: most sit on a vertex of the lower convex hull of the layer's
(kept bytes, cost) plans, on each side of budget / layers, and a few off the hull fill the rest.
Caps spaced evenly in kept bytes miss both (a transformer layer's trade-off has dozens of steps,
one per norm or mask): the DP over such menus was up to 1.34x the whole-graph optimum on 48-96-layer
`transformer_graph`s, 1.55x on 24 layers (reports/solver_quality.md).

* `add_hull_options`: the hull's vertices, each the cheapest plan at one price per kept byte (the
  slope of a chord between two known vertices: Aneja & Nair's dichotomic search, about two
  programs per vertex). Budget-independent: they join every menu.
* `walk`: every plan on the (kept bytes, cost) frontier between two kept-bytes levels, one program
  per plan (the cheapest under a cap just below the last plan found). Where the DP's answer lies
  is known only once it has run, so the walk refines that answer (menus.fill_options).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from remat_kit._core.chain_dp import BlockOption

MAX_HULL_PROGRAMS = 40  # programs per hull search
MAX_PRICES = 512  # prices per kept byte tried by lower_bound (its arrays are prices x blocks x options)
Program = Callable[..., "dict[int, int] | None"]  # menus.block_program's (cap, local limit, kept_price=)
Add = Callable[[dict[int, int], str], "BlockOption | None"]  # measure a plan, add it to the menu


def add_hull_options(program: Program, measured: list[BlockOption], add: Add) -> None:
    """The vertices of the lower convex hull of the block's (kept bytes, cost) plans, added to its
    menu by `add`; then again among the plans within the least local peak of `measured` where a
    vertex found peaks above it (that matters for the block where the peak is)."""
    found = _hull_search(program, measured, add, None)
    min_local = min(o.local_peak for o in measured)
    if any(o.local_peak > min_local for o in found):
        _hull_search(program, [o for o in measured if o.local_peak <= min_local], add, min_local)


def _hull_search(program: Program, known: list[BlockOption], add: Add, local_limit: int | None) -> list[BlockOption]:
    """Hull vertices between the cheapest of `known` and the one keeping least, found by pricing
    kept bytes at each chord's slope; at most `MAX_HULL_PROGRAMS` programs."""
    if not known:
        return []
    left = min(known, key=lambda o: (o.cost, o.kept_bytes))  # cheapest, keeps most
    right = min(known, key=lambda o: (o.kept_bytes, o.cost))  # keeps least, costs most
    chords, found, spent = [(left, right)], [], 0
    while chords and spent < MAX_HULL_PROGRAMS:
        a, b = chords.pop()
        if a.kept_bytes <= b.kept_bytes or b.cost <= a.cost:
            continue
        price = (b.cost - a.cost) / (a.kept_bytes - b.kept_bytes)
        codes = program(None, local_limit, kept_price=price)
        spent += 1
        x = None if codes is None else add(codes, f"selective (hull, {price:.3g} per byte)")
        # A vertex lies strictly below the chord, in the simulator's figures (those the DP uses).
        if x is not None and x.cost + price * x.kept_bytes < a.cost + price * a.kept_bytes - 1:
            found.append(x)
            chords += [(a, x), (x, b)]
    return found


def walk(program: Program, above: int, below: int, max_programs: int, add: Add) -> list[BlockOption]:
    """The frontier plans keeping less than `above` and more than `below` bytes, most kept first:
    the cheapest under a cap one byte below the last plan's kept bytes, until the cap reaches
    `below`, nothing fits or `max_programs` programs ran."""
    out: list[BlockOption] = []
    cap = above - 1
    for _ in range(max_programs):
        if cap <= below:
            break
        codes = program(cap, None)
        option = None if codes is None else add(codes, "selective (frontier)")
        if option is None:
            break
        out.append(option)
        cap = min(cap, option.kept_bytes) - 1  # the simulator's kept bytes may differ from the program's
    return out


def lower_bound(options: Sequence[Sequence[BlockOption]], limit: int) -> tuple[float, float]:
    """A Lagrangian lower bound on the cost of any path of `options` (one block each) whose peak
    fits `limit`, and on any per-block plan where each menu holds its block's hull vertices,
    its least local peak and its least kept bytes.

    Each block's peak condition reads P_b + L_b <= limit with P_b the bytes earlier blocks keep;
    keeping one of them and pricing kept bytes at λ gives, for any λ >= 0,
    sum_{j<b} min(cost + λ·kept) + sum_{j>=b} min(cost) - λ·(limit - min L_b) <= the optimum. The
    best λ is a slope of some menu's hull (the function is concave and piecewise linear in λ), so
    those are the ones tried, for every b. On identical blocks it misses the optimum by about one
    block moved between two hull vertices. Returns (the bound, the λ that gives it): the optimum's
    blocks sit at or near the hull vertices that λ supports (`support_range`).
    """
    num = len(options)
    width = max(len(m) for m in options)
    kept = np.full((num, width), np.inf)
    cost = np.full((num, width), np.inf)
    for j, menu in enumerate(options):
        kept[j, : len(menu)] = [o.kept_bytes for o in menu]
        cost[j, : len(menu)] = [o.cost for o in menu]
    least_local = np.array([min(o.local_peak for o in m) for m in options], dtype=float)
    prices = np.unique(np.concatenate([[0.0], *(_hull_slopes(m) for m in options)]))
    if prices.size > MAX_PRICES:  # any λ gives a bound; a chain of thousands of distinct blocks
        prices = np.unique(np.quantile(prices, np.linspace(0.0, 1.0, MAX_PRICES)))  # needs no more
    # (prices, blocks): the least priced cost of each block, then its sum over the blocks before b.
    priced = np.min(cost[None, :, :] + prices[:, None, None] * np.where(np.isinf(kept), 0, kept)[None], axis=2)
    before = np.concatenate([np.zeros((prices.size, 1)), np.cumsum(priced, axis=1)[:, :-1]], axis=1)
    least = np.min(cost, axis=1)
    after = np.cumsum(least[::-1])[::-1]
    bounds = before + after[None, :] - prices[:, None] * (limit - least_local)[None, :]
    best = np.unravel_index(int(np.argmax(bounds)), bounds.shape)
    if float(bounds[best]) <= float(least.sum()):
        return float(least.sum()), 0.0
    return float(bounds[best]), float(prices[best[0]])


def support_range(menu: Sequence[BlockOption], price: float) -> tuple[int, int]:
    """(kept bytes below, above): the menu's hull vertices next to the one cheapest at `price` per
    kept byte, where a block of the optimum sits when λ = `price` (lower_bound)."""
    hull = _hull(menu)
    i = min(range(len(hull)), key=lambda k: hull[k][1] + price * hull[k][0])
    return hull[min(i + 1, len(hull) - 1)][0], hull[max(i - 1, 0)][0]


def _hull_slopes(menu: Sequence[BlockOption]) -> np.ndarray:
    """Slopes (cost per kept byte given up) of the edges of the lower convex hull of a menu's
    (kept bytes, cost) points."""
    hull = _hull(menu)
    return np.array([(b[1] - a[1]) / (a[0] - b[0]) for a, b in zip(hull, hull[1:]) if a[0] > b[0] and b[1] > a[1]])


def _hull(menu: Sequence[BlockOption]) -> list[tuple[int, int]]:
    """The lower convex hull of a menu's (kept bytes, cost) points, most kept first."""
    cheapest: dict[int, int] = {}
    for o in menu:
        cheapest[o.kept_bytes] = min(o.cost, cheapest.get(o.kept_bytes, o.cost))
    points = sorted(cheapest.items(), reverse=True)  # most kept first
    hull: list[tuple[int, int]] = []
    for p in points:
        while len(hull) >= 2 and _turns_down(hull[-2], hull[-1], p):
            hull.pop()
        hull.append(p)
    return hull


def _turns_down(a: tuple[int, int], b: tuple[int, int], c: tuple[int, int]) -> bool:
    """b is on or above the chord from a to c (kept bytes falling from a to c)."""
    return (b[1] - a[1]) * (a[0] - c[0]) >= (c[1] - a[1]) * (a[0] - b[0])
