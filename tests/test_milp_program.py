"""A block's 0-1 program built once and solved under many caps, limits and prices (`milp.Program`,
as `menus.block_program` reuses it) answers exactly as a program built afresh for each solve."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import remat_kit as rk
from remat_kit._core import chain_dp
from remat_kit._core.costs import Costs
from remat_kit._core.milp import Program, solve_milp
from tests.graphs import random_chain


def _window_program_args(graph, blk: int, offload: bool) -> tuple:
    costs = Costs(graph, rk.DeviceSpec())
    win = chain_dp.window(graph, blk)
    back = {j: i for i, j in win.index_map.items()}
    rec = [costs.recompute[back[j]] if j in back else 0 for j in range(len(win.graph))]
    off = [costs.offload[back[j]] if j in back else 0 for j in range(len(win.graph))] if offload else None
    return win.graph, {
        "rec_cost": rec,
        "off_cost": off,
        "blocks": [blk - win.offset],
        "backward_bytes": win.earlier_seed_bytes,
    }


def _answer(res):
    return None if res is None else (res.keep, res.recompute, res.offload, res.objective)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), offload=st.booleans())
def test_a_program_reused_across_solves_answers_as_a_fresh_one(seed, offload):
    graph = random_chain(seed)
    rng = random.Random(seed)
    for blk in range(graph.num_blocks):
        if all(graph.is_forced[i] for i in graph.block_members[blk]):
            continue  # no decision to make: block_program is never asked
        sub, kw = _window_program_args(graph, blk, offload)
        kept_all = sum(v.num_bytes for v in graph.values if v.block == blk)
        built: dict[tuple[bool, bool], Program] = {}
        for _ in range(8):  # a descending bisection's caps, hull prices, local limits, in any order
            cap = rng.choice([None, rng.randint(0, kept_all + 1)])
            limit = rng.choice([None, rng.randint(0, 4 * kept_all + 1)])
            price = rng.choice([0.0, rng.random() * 10])
            pattern = (limit is not None, cap is not None)
            if pattern not in built:
                built[pattern] = Program(sub, limited=pattern[0], capped=pattern[1], **kw)
            fresh = solve_milp(sub, limit=limit, kept_cap=cap, kept_price=price, **kw)
            assert _answer(built[pattern].solve(limit, cap, price)) == _answer(fresh), (blk, cap, limit, price)


def test_a_solve_outside_the_programs_pattern_is_refused():
    graph = random_chain(3)
    sub, kw = _window_program_args(graph, 0, False)
    program = Program(sub, limited=False, capped=True, **kw)
    with pytest.raises(ValueError, match="limit=100"):
        program.solve(100, 10)
    with pytest.raises(ValueError, match="kept_cap=None"):
        program.solve(None, None)
