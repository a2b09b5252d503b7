"""`Value.holds`: a module call's inputs stay alive until the call returns (the caller's frame
holds them), in the forward and in a recompute, though no op reads them there. Found on Hugging
Face's MobileNetV2, whose convolution layers pad their input inside their own forward: the input
lived beside its padded copy, and the floor the error named measured 0.443 of no remat at 0.405."""

from __future__ import annotations

import pytest

import remat_kit as rk
from remat_kit import value


def chain(held: bool) -> rk.CostGraph:
    """x -> [h (100 B), a = relu(h) (100 B), g = a * 2 (100 B), o = g @ w (10 B)] -> loss, one
    block; with `held`, g ends a module call whose input was h (h is kept alive until g)."""
    vals = [
        value("x", 10, role="input"),
        value("w", 5, role="param"),
        value("h", 100, kind="matmul", flops=1000, deps=["x", "w"], bwd_reads=["x"]),
        value("a", 100, kind="elementwise", flops=100, deps=["h"], bwd_reads=["a"]),
        value("g", 100, kind="elementwise", flops=100, deps=["a"], bwd_reads=[]),
        value("o", 10, kind="matmul", flops=1000, deps=["g", "w"], bwd_reads=["g"]),
        value("loss", 4, kind="reduction", deps=["o"], bwd_reads=[]),
    ]
    if held:
        vals[4] = rk.Value(**{**vals[4].__dict__, "holds": ("h",)})
    return rk.CostGraph(vals)


def _forward(graph: rk.CostGraph, plan: dict | None = None) -> list[int]:
    return [mem for label, _, mem in rk.simulate(graph, plan, timeline=True).timeline if label.startswith("forward")]


def test_a_held_value_lives_until_its_holder_is_made_in_the_forward():
    # h dies once a is made (relu's backward reads its output), or once g is when g holds it.
    assert _forward(chain(False)) == [100, 200, 200, 210, 214]
    assert _forward(chain(True)) == [100, 200, 300, 210, 214]
    assert chain(True).last_fwd_use[chain(True).index("h")] == chain(True).index("g")


def test_a_held_value_lives_until_its_holder_is_recomputed():
    recompute = {"h": "recompute", "a": "recompute", "g": "recompute"}

    def at_recompute(graph: rk.CostGraph) -> dict[str, int]:
        timeline = rk.simulate(graph, recompute, timeline=True).timeline
        return {label.rsplit(" ", 1)[-1]: mem for label, _, mem in timeline if ": recompute " in label}

    # The recompute makes h, a, g again: h is alive beside g only when g holds it.
    free, held = at_recompute(chain(False)), at_recompute(chain(True))
    assert held["h"] == free["h"] and held["a"] == free["a"]
    assert held["g"] - free["g"] == 100, (free, held)


def test_holds_must_name_earlier_values():
    with pytest.raises(ValueError, match="comes later"):
        rk.CostGraph(
            [value("a", 1), value("b", 1, deps=["a"]), rk.Value("c", 1, deps=["b"], holds=("d",)), value("d", 1)]
        )
