"""Budget parsing: every accepted form, every rejected one with a message that says what is allowed."""

from __future__ import annotations

import math

import pytest

import remat_kit as rk


@pytest.mark.parametrize(
    "given, kind, value",
    [
        (0.7, "fraction", 0.7),
        (1.0, "fraction", 1.0),
        (1, "fraction", 1.0),
        ("70%", "fraction", 0.7),
        (" 100 % ".replace(" ", ""), "fraction", 1.0),
        (4096, "bytes", 4096),
        ("12GiB", "bytes", 12 * 2**30),
        ("512MB", "bytes", 512 * 10**6),
        ("1.5 GiB", "bytes", 1.5 * 2**30),
        ("100kib", "bytes", 100 * 1024),
        ("2048B", "bytes", 2048),
        ("3g", "bytes", 3 * 2**30),
    ],
)
def test_accepted(given, kind, value):
    b = rk.parse_budget(given)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize(
    "bad, message",
    [
        (0.0, "not in \\(0, 1\\]"),
        (-0.5, "not in \\(0, 1\\]"),
        (1.5, "not in \\(0, 1\\]"),
        (math.nan, "not in \\(0, 1\\]"),
        (math.inf, "not in \\(0, 1\\]"),
        (0, "must be positive"),
        (-3, "must be positive"),
        ("12 parsecs", "is not a size"),
        ("GiB", "is not a size"),
        ("", "is not a size"),
        ("0%", "percentage must be in"),
        ("150%", "percentage must be in"),
        ("0.1B", "less than one byte"),
        (True, "is not a budget"),
        (None, "is not a budget"),
        ([0.5], "has type list"),
    ],
)
def test_rejected_with_a_message_naming_the_argument(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        rk.parse_budget(bad)
    assert str(info.value).startswith(f"budget={bad!r}")
    assert "pass" in str(info.value) or "allowed" in str(info.value).lower()


def test_solve_rejects_bad_budgets_before_solving():
    graph = rk.transformer_graph(num_layers=2, seq_len=64, batch=1, hidden=32, num_heads=2)
    for bad in (0, 1.2, "lots", float("nan")):
        with pytest.raises(ValueError, match="budget="):
            rk.solve(graph, bad)


def test_byte_budget_limits_the_whole_step():
    graph = rk.transformer_graph(num_layers=4, seq_len=256, batch=1, hidden=64, num_heads=2)
    base = rk.simulate(graph)
    target = graph.constant_bytes + base.activation_bytes // 2
    plan = rk.solve(graph, target)
    assert plan.predicted_peak_bytes <= target
    assert plan.predicted_peak_bytes == plan.predicted_activation_bytes + graph.constant_bytes
    assert rk.solve(graph, f"{target}B") == plan


def test_auto_validates_the_budget_at_decoration_time():
    with pytest.raises(ValueError, match="budget=2.0 is not in"):
        rk.auto(budget=2.0)
    with pytest.raises(ValueError, match="needs budget="):
        rk.auto()
    with pytest.raises(ValueError, match="solver='fast'"):
        rk.auto(budget=0.5, solver="fast")
