"""Cell planning and sharding: deterministic, complete, and errors that name the bad value."""

from __future__ import annotations

import pytest

from benchmarks._cells import plan_cells, shard


def test_plan_skips_cells_that_do_not_apply():
    cells = plan_cells(
        ["jax", "torch"], ["gpt_unrolled", "mlp"], ["tiny"], ["none", "attn_core", "peers", "auto"], [0.5]
    )
    ids = [c.id for c in cells]
    assert "torch/gpt_unrolled/tiny/none" not in ids  # JAX only
    assert "jax/mlp/tiny/attn_core" not in ids  # no attention
    assert "jax/gpt_unrolled/tiny/attn_core" in ids and "torch/mlp/tiny/compile_budget@0.5" in ids
    assert "jax/mlp/tiny/sac_mm" not in ids and "torch/mlp/tiny/dots_saveable" not in ids
    assert ids.index("jax/mlp/tiny/none") < ids.index("jax/mlp/tiny/auto@0.5")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_the_cells(n):
    cells = plan_cells(["jax", "torch"], ["gpt", "mlp"], ["tiny", "small"], ["all-strategies"], [0.3, 0.7])
    parts = [shard(cells, f"{k}/{n}") for k in range(1, n + 1)]
    assert sorted(c for p in parts for c in p) == sorted(cells)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budgets": [1.5]}, "--budgets got 1.5"),
        ({"strategies": ["fast"]}, "--strategies got 'fast'"),
        ({"models": ["resnet"]}, "--models got 'resnet'"),
        ({"sizes": ["huge"]}, "--size got 'huge'"),
        ({"frameworks": ["mxnet"]}, "--frameworks got 'mxnet'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {
        "frameworks": ["jax"],
        "models": ["mlp"],
        "sizes": ["tiny"],
        "strategies": ["none"],
        "budgets": [0.5],
        **kwargs,
    }
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        plan_cells(**args)


@pytest.mark.parametrize("spec", ["0/2", "3/2", "2", "a/b", "1/0"])
def test_bad_shard_is_named(spec):
    with pytest.raises(ValueError, match=f"--shard {spec!r}"):
        shard([], spec)


def test_jax_cell_times_against_none_in_its_own_process():
    """A JAX cell's row carries none's median from its own process and the ratio of the two medians
    (structure only: no wall-clock value is asserted)."""
    pytest.importorskip("jax")
    from benchmarks._cell import measure
    from benchmarks._cells import Cell

    row = measure(Cell("jax", "mlp", "tiny", "all"), steps=2, warmup=0)
    assert row["num_steps"] >= 2 and row["none_step_time_s"] > 0
    assert row["step_time_vs_none"] == pytest.approx(row["step_time_s"] / row["none_step_time_s"])
    none = measure(Cell("jax", "mlp", "tiny", "none"), steps=2, warmup=0)
    assert none["step_time_vs_none"] == 1.0 and none["none_step_time_s"] == none["step_time_s"]


def test_time_ratio_comes_only_from_the_cells_own_process():
    """Memory and FLOPs ratios divide by the `none` row; the time ratio never divides one process's
    time by another's: a row without a same-process ratio shows none (was: none's row's time)."""
    import math

    from benchmarks._outputs import frame, with_ratios

    base = {"framework": "jax", "model": "mlp", "size": "tiny", "status": "ok", "budget": None}
    rows = [
        {
            **base,
            "strategy": "none",
            "activation_bytes": 100,
            "flops": 10.0,
            "step_time_s": 2.0,
            "step_time_vs_none": 1,
        },
        {
            **base,
            "strategy": "all",
            "activation_bytes": 40,
            "flops": 12.0,
            "step_time_s": 1.0,
            "step_time_vs_none": 1.3,
        },
        {**base, "strategy": "sqrt_n", "activation_bytes": 50, "flops": 12.0, "step_time_s": 1.0},
    ]
    df = with_ratios(frame(rows)).set_index("strategy")
    assert df.activation_ratio["all"] == pytest.approx(0.4) and df.flops_ratio["sqrt_n"] == pytest.approx(1.2)
    assert df.step_time_ratio["all"] == pytest.approx(1.3)
    assert math.isnan(df.step_time_ratio["sqrt_n"])


def test_default_budgets_are_feasible_and_the_infeasible_suite_is_not():
    """The default sweep's first run shows no error cell: the lowest default budget is above the floor
    of the torch tiny GPT (the zoo model with the highest floor); the `infeasible` suite's are below it."""
    pytest.importorskip("torch")
    import remat_kit as rk
    from benchmarks._cells import DEFAULT_BUDGETS, SUITES
    from benchmarks.models.torch_zoo import build

    def plan(budget):
        model, (inputs, targets) = build("gpt", "tiny")
        rk.auto(model, budget=budget)(inputs, targets).backward()

    plan(min(DEFAULT_BUDGETS))
    for budget in SUITES["infeasible"]["budgets"]:
        with pytest.raises(rk.InfeasibleBudgetError):
            plan(budget)


@pytest.mark.slow  # inductor compiles two models (~30 s on 2 CPUs)
def test_compiled_cell_measures_saved_bytes_and_time_against_compiled_none():
    pytest.importorskip("torch")
    from benchmarks._cell import measure
    from benchmarks._cells import Cell

    row = measure(Cell("torch", "mlp", "tiny", "compile+checkpoint"), steps=2, warmup=0)
    assert row["grad_ok"] and row["graph_breaks"] == 0
    assert 0 < row["saved_bytes"] < row["none_saved_bytes"]  # checkpointed blocks save only their inputs
    assert row["saved_vs_none"] == pytest.approx(row["saved_bytes"] / row["none_saved_bytes"])
    assert row["step_time_vs_none"] == pytest.approx(row["step_time_s"] / row["none_step_time_s"])
    assert "flops" not in row  # a counting dispatch mode would have measured the eager step


def test_steps_pair_with_none_and_alternate_who_goes_first():
    """Each timed step of the cell is paired with one of `none`, the pair's order alternating by
    round, so neither always runs on a cache the other warmed (no clock value is asserted)."""
    from benchmarks._cell import time_with_none

    order: list[str] = []
    row = time_with_none(lambda: order.append("cell"), lambda: order.append("none"), steps=4, warmup=0)
    pairs = [tuple(order[i : i + 2]) for i in range(0, len(order), 2)]
    assert len(pairs) == row["num_steps"] >= 4 and all(sorted(p) == ["cell", "none"] for p in pairs)
    assert {p[0] for p in pairs[0::2]} == {"none"} and {p[0] for p in pairs[1::2]} == {"cell"}
    assert row["step_time_vs_none"] == pytest.approx(row["step_time_s"] / row["none_step_time_s"])
