"""Layer scoring: every residual byte and FLOP is counted once per grouping, split by decision."""

from __future__ import annotations

import pytest

import remat_kit as rk


@pytest.fixture(scope="module")
def graph():
    return rk.transformer_graph(num_layers=3, seq_len=512, batch=2, hidden=128, num_heads=4)


@pytest.mark.parametrize("by", ["module", "kind", "block"])
def test_totals_match_the_residuals(graph, by):
    rows = rk.score_layers(graph, by=by)
    totals = [r for r in rows if by != "module" or r.kind == "*"]
    residuals = [graph.values[i] for i in graph.residuals()]
    assert sum(r.saved_bytes for r in totals) == sum(v.num_bytes for v in residuals)
    assert sum(r.recompute_flops for r in totals) == sum(v.flops for v in residuals)


def test_plan_split_adds_up(graph):
    plan = rk.solve(graph, 0.5)
    for row in rk.score_layers(graph, plan):
        assert row.kept_bytes + row.recomputed_bytes + row.offloaded_bytes == row.saved_bytes


def test_attention_core_holds_the_quadratic_bytes(graph):
    by_kind = {r.kind: r for r in rk.score_layers(graph, by="kind")}
    s, b, a = 512, 2, 4
    # softmax output (2 bytes) + dropout output (2 bytes) per layer, Megatron's 4·a·s²·b.
    assert by_kind["attention"].saved_bytes == 3 * (4 * a * s * s * b + 2 * s * b * 128)
    assert by_kind["rng"].saved_bytes == 3 * (a * s * s * b + 2 * s * b * 128)
    assert "attention" in rk.format_scores(rk.score_layers(graph, by="kind"))


def test_bad_grouping(graph):
    with pytest.raises(ValueError, match="by='layer'"):
        rk.score_layers(graph, by="layer")
