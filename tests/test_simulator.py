"""The simulator against hand-worked examples, the Megatron formula, and its own contract."""

from __future__ import annotations

import pytest

import remat_kit as rk
from remat_kit import value


def two_block_chain() -> rk.CostGraph:
    """x -> [h = x@w (100 B), a = relu(h) (100 B), o = a@w (10 B)] x 2 -> loss (4 B).

    matmul backward reads its input; relu reads its output; loss reads nothing.
    """
    vals = [value("x", 10, role="input"), value("w", 5, role="param")]
    prev = "x"
    for b in range(2):
        vals += [
            value(f"b{b}.h", 100, kind="matmul", flops=1000, deps=[prev, "w"], bwd_reads=[prev], block=b),
            value(f"b{b}.a", 100, kind="elementwise", flops=100, deps=[f"b{b}.h"], bwd_reads=[f"b{b}.a"], block=b),
            value(f"b{b}.o", 10, kind="matmul", flops=1000, deps=[f"b{b}.a", "w"], bwd_reads=[f"b{b}.a"], block=b),
        ]
        prev = f"b{b}.o"
    vals.append(value("loss", 4, kind="reduction", deps=[prev], bwd_reads=[], block=1))
    return rk.CostGraph(vals)


def test_no_remat_by_hand():
    g = two_block_chain()
    r = rk.simulate(g, timeline=True)
    # h is read by no backward (relu reads its output): it dies once a is computed. o1 dies
    # after the loss (the loss's backward reads nothing).
    fwd = [mem for label, _, mem in r.timeline if label.startswith("forward")]
    assert fwd == [100, 200, 110, 210, 310, 220, 224]
    # Peak in a1's backward: a1 (100) + grad a1 (100) + grad h1 (100) + a0 (100) + o0 (10).
    assert r.activation_bytes == 410
    assert r.peak_moment == "backward of block1: grad of b1.a"
    assert r.peak_bytes == 410 + 10 + 2 * 5  # + inputs + parameters and their gradients
    assert r.kept_bytes_by_block == (110, 104)
    assert r.recompute_flops == 0 and r.num_recomputed_ops == 0


def test_recompute_by_hand():
    g = two_block_chain()
    plan = rk.Plan.from_decisions(g, {f"b{b}.{v}": "recompute" for b in (0, 1) for v in "ha"})
    r = rk.simulate(g, plan, timeline=True)
    assert r.recomputed == ("b0.h", "b0.a", "b1.h", "b1.a")
    assert r.recompute_flops == 2 * (1000 + 100)
    fwd = [mem for label, _, mem in r.timeline if label.startswith("forward")]
    assert fwd == [100, 200, 110, 110, 210, 120, 24]
    block1 = [mem for label, b, mem in r.timeline if b == 1 and label.startswith("backward")]
    # reload (o0, loss, seed), recompute h1, a1 (h1 freed after), grads of loss, o1, a1, h1.
    assert block1 == [18, 114, 214, 124, 220, 310, 120]
    assert r.activation_bytes == 310 and r.peak_moment == "backward of block1: grad of b1.a"
    assert r.kept_bytes_by_block == (10, 4)
    assert r.baseline_activation_bytes == 410
    # Recomputing a alone keeps h instead (its input must be there to recompute it): no gain.
    only_a = rk.simulate(g, {"b0.a": "recompute", "b1.a": "recompute"})
    assert only_a.activation_bytes == 410 and only_a.recomputed == ("b0.a", "b1.a")


def test_offload_frees_device_memory_until_reload():
    g = two_block_chain()
    plan = rk.Plan.from_decisions(g, {"b0.a": "offload", "b1.a": "offload"})
    r = rk.simulate(g, plan, timeline=True)
    assert r.offload_bytes == 200 and r.num_recomputed_ops == 0
    reloads = [mem for label, _, mem in r.timeline if label.endswith("reload")]
    assert reloads == [10 + 4 + 4 + 100, 10 + 100]  # o0, loss, seed, a1 back; then o0, a0 back
    assert r.recompute_seconds == pytest.approx(2 * 200 / rk.DeviceSpec().host_bandwidth)


def test_deterministic_and_plan_order_independent():
    g = rk.transformer_graph(num_layers=3, seq_len=128, batch=2, hidden=64, num_heads=4)
    plan = rk.presets.megatron_selective(g)
    shuffled = dict(reversed(list(plan.as_dict().items())))
    assert rk.simulate(g, plan) == rk.simulate(g, plan) == rk.simulate(g, shuffled)


@pytest.mark.parametrize("s,b,h,a", [(1024, 1, 256, 4), (512, 2, 128, 8), (2048, 1, 512, 16)])
def test_megatron_formula_per_layer(s, b, h, a):
    """Korthikanti et al. (2022): s·b·h·(34 + 5·a·s/h) bytes per layer without recompute."""
    g = rk.transformer_graph(num_layers=3, seq_len=s, batch=b, hidden=h, num_heads=a)
    kept = rk.simulate(g).kept_bytes_by_block
    expected = rk.megatron_bytes_per_layer(seq_len=s, batch=b, hidden=h, num_heads=a)
    assert kept[:3] == (expected,) * 3
    assert expected == s * b * h * (34 + 5 * a * s // h)
    # Selective recompute of the attention core keeps 34·s·b·h per layer.
    selective = rk.simulate(g, rk.presets.megatron_selective(g)).kept_bytes_by_block
    assert selective[:3] == (34 * s * b * h,) * 3


def test_exact_flop_counts_of_the_analytic_layer():
    s, b, h, a = 256, 2, 64, 4
    g = rk.transformer_graph(num_layers=1, seq_len=s, batch=b, hidden=h, num_heads=a)
    matmul = sum(v.flops for v in g if v.kind is rk.OpKind.MATMUL)
    attention_matmuls = g["layers.0.scores"].flops + g["layers.0.context"].flops
    assert matmul == 2 * s * b * h * h * 4 + 2 * s * b * h * 4 * h * 2  # q, k, v, proj + fc1, fc2
    assert attention_matmuls == 2 * (2 * s * s * b * h)
    full = rk.simulate(g, rk.presets.full(g))
    # Full recompute reruns the layer except what no backward reads: fc2 and its dropout feed
    # only the residual add (whose backward reads nothing), and the boundary is kept.
    unneeded = {"layers.0.fc2", "layers.0.mlp_dropout", "layers.0.residual2"}
    assert set(full.recomputed) == {v.name for v in g if v.name.startswith("layers.0")} - unneeded
    assert full.recompute_flops == sum(v.flops for v in g if v.name in set(full.recomputed))
    assert full.recompute_flops == (
        2 * s * b * h * h * 4
        + 2 * s * b * h * 4 * h  # q, k, v, proj, fc1
        + 2 * (2 * s * s * b * h)  # scores, context
        + 8 * s * b * h * 2
        + 5 * a * s * s * b
        + 2 * a * s * s * b  # norms, softmax, dropout
        + a * s * s * b
        + s * b * h * 2
        + 2 * s * b * h
        + s * b * h  # masks, drop, add
        + 8 * 4 * s * b * h
    )  # gelu


def test_plan_for_another_graph_is_refused():
    g = rk.transformer_graph(num_layers=2, seq_len=128, batch=1, hidden=64, num_heads=2)
    other = rk.transformer_graph(num_layers=2, seq_len=256, batch=1, hidden=64, num_heads=2)
    plan = rk.solve(g, 0.7)
    with pytest.raises(ValueError, match="plan was made for graph"):
        rk.simulate(other, plan)


def test_boundaries_cannot_be_dropped():
    g = two_block_chain()
    with pytest.raises(ValueError, match="block boundary"):
        rk.simulate(g, {"b0.o": "recompute"})
    with pytest.raises(ValueError, match="only activations"):
        rk.simulate(g, {"w": "recompute"})
    with pytest.raises(KeyError, match="no value named 'nope'"):
        rk.simulate(g, {"nope": "recompute"})


def test_graph_validation_errors():
    with pytest.raises(ValueError, match="appears more than once"):
        rk.CostGraph([value("a", 1), value("a", 1)])
    with pytest.raises(ValueError, match="unknown value 'b'"):
        rk.CostGraph([value("a", 1, deps=["b"])])
    with pytest.raises(ValueError, match="comes later"):
        rk.CostGraph([value("a", 1, deps=["b"]), value("b", 1)])
    with pytest.raises(ValueError, match="contiguous"):
        rk.CostGraph([value("a", 1, block=1), value("b", 1, deps=["a"], block=0)])


def test_sqrt_n_segments_drop_inner_boundaries():
    g = rk.transformer_graph(num_layers=9, seq_len=256, batch=1, hidden=64, num_heads=2)
    plan = rk.presets.sqrt_n(g)
    assert len(plan.segments) == 3
    merged = rk.simulate(g, plan)
    per_block = rk.simulate(g, rk.presets.full(g))
    # Fewer kept boundaries, but a whole segment's residuals are alive in its backward.
    assert sum(merged.kept_bytes_by_block) < sum(per_block.kept_bytes_by_block)
    assert rk.Plan.from_json(plan.to_json()) == plan


def test_device_spec_roofline_and_errors():
    d = rk.DeviceSpec("t", peak_flops=1e12, memory_bandwidth=1e11, host_bandwidth=1e10)
    assert d.seconds(1e12, 0) == 1.0 and d.seconds(0, 1e11) == 1.0 and d.seconds(1e12, 2e11) == 2.0
    c = rk.DeviceSpec.calibrated("c", matmul_flops=2e12, matmul_seconds=2.0, copy_bytes=1e10, copy_seconds=0.5)
    assert c.peak_flops == 1e12 and c.memory_bandwidth == 2e10
    with pytest.raises(ValueError, match="peak_flops=0"):
        rk.DeviceSpec(peak_flops=0)
    with pytest.raises(ValueError, match="unknown device"):
        rk.DeviceSpec.preset("tpu9")
