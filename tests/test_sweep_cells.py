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
