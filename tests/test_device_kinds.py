"""Per-kind rates in the time model (issue 12 d3): ops whose time a copy's rate does not describe
(a dropout mask's random draws, a masked softmax) are priced at their own measured rate.

Before: every op was priced `max(flops / peak, bytes / copy bandwidth) + overhead`; on the eager
GPT of reports/step_time_model.md the recompute was predicted at 0.14-0.41 of what it measured,
most of the gap the dropout masks' `bernoulli_` (tens of times a copy's time per byte on a CPU).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import remat_kit as rk
from remat_kit._core import calibration
from remat_kit._core.costs import Costs

SLOW_RNG = rk.DeviceSpec(peak_flops=1e11, memory_bandwidth=1e10, op_bandwidth=(("rng", 1e8),))
COPY_RATE = rk.DeviceSpec(peak_flops=1e11, memory_bandwidth=1e10)


def _mask_or_matmul() -> rk.CostGraph:
    """Block 0 keeps a dropout mask (RNG, many bytes moved, no FLOPs) and a matmul output; freeing
    either fits the budget below. At a copy's rate the mask is the cheaper recompute, at a
    measured random-draw rate the matmul is."""
    vals = [rk.value("x", 1000, role="input"), rk.value("w", 10, role="param")]
    vals.append(rk.value("mask", 1000, kind="rng", deps=["x"], bwd_reads=[], bytes_moved=2000))
    vals.append(
        rk.value("mm", 1000, kind="matmul", flops=2 * 10**6, deps=["x", "w"], bwd_reads=["x"], bytes_moved=2010)
    )
    vals.append(rk.value("out", 1000, kind="elementwise", flops=1000, deps=["mask", "mm"], bwd_reads=["mask", "mm"]))
    vals.append(rk.value("wide", 5000, kind="matmul", flops=10**6, deps=["out", "w"], bwd_reads=["out"], block=1))
    vals.append(rk.value("loss", 4, kind="reduction", deps=["wide"], bwd_reads=["wide"], block=1))
    return rk.CostGraph(vals)


def test_value_seconds_uses_the_kinds_rate():
    graph = _mask_or_matmul()
    mask, mm = graph.values[graph.index("mask")], graph.values[graph.index("mm")]
    assert SLOW_RNG.value_seconds(mask) == pytest.approx(2000 / 1e8)
    assert COPY_RATE.value_seconds(mask) == pytest.approx(2000 / 1e10)
    # Kinds without a rate of their own keep the roofline at the copy's rate.
    assert SLOW_RNG.value_seconds(mm) == pytest.approx(COPY_RATE.value_seconds(mm)) == pytest.approx(2e6 / 1e11)


@pytest.mark.parametrize("solver", ["dp", "milp"])
def test_a_slow_rng_rate_moves_the_recompute_off_the_mask(solver):
    graph = _mask_or_matmul()
    base = rk.simulate(graph).activation_bytes
    budget = (base - 900) / base
    at_copy_rate = rk.solve(graph, budget, solver=solver, device=COPY_RATE)
    measured = rk.solve(graph, budget, solver=solver, device=SLOW_RNG)
    assert at_copy_rate.decision("mask") is rk.Decision.RECOMPUTE
    assert measured.decision("mask") is rk.Decision.SAVE and measured.decision("mm") is rk.Decision.RECOMPUTE
    # Solver, simulator, integer costs and layer scores price alike.
    sim = rk.simulate(graph, measured, device=SLOW_RNG)
    assert measured.predicted_recompute_seconds == pytest.approx(sim.recompute_seconds)
    assert sim.recompute_seconds == pytest.approx(SLOW_RNG.value_seconds(graph.values[graph.index("mm")]))
    mask_only = {"mask": rk.Decision.RECOMPUTE}
    assert Costs(graph, SLOW_RNG).of([0] * len(graph.values))[0] == 0
    assert rk.simulate(graph, mask_only, device=SLOW_RNG).recompute_seconds == pytest.approx(2000 / 1e8)
    row = next(r for r in rk.score_layers(graph, by="kind", device=SLOW_RNG) if r.kind == "rng")
    assert row.recompute_seconds == pytest.approx(2000 / 1e8)


def test_op_bandwidth_is_validated_and_normalised():
    spec = rk.DeviceSpec(op_bandwidth=[["rng", 1e9], ["attention", 5e9]])  # as JSON hands it back
    assert spec.op_bandwidth == (("attention", 5e9), ("rng", 1e9))
    assert hash(spec) == hash(rk.DeviceSpec(op_bandwidth=(("rng", 1e9), ("attention", 5e9))))
    with pytest.raises(ValueError, match="op_bandwidth has \\('dropout', 1000000000.0\\)"):
        rk.DeviceSpec(op_bandwidth=(("dropout", 1e9),))  # neither a kind nor a namespaced op name
    with pytest.raises(ValueError, match="op_bandwidth has \\('rng', 0\\)"):
        rk.DeviceSpec(op_bandwidth=(("rng", 0),))
    with pytest.raises(ValueError, match="op_timings\\['rng'\\] seconds=0"):
        rk.DeviceSpec.calibrated(
            "d", matmul_flops=1e9, matmul_seconds=1e-3, copy_bytes=1e6, copy_seconds=1e-4, op_timings=[("rng", 1e6, 0)]
        )


def test_calibrated_kind_rates_take_the_overhead_out():
    spec = rk.DeviceSpec.calibrated(
        "d",
        matmul_flops=1e9,
        matmul_seconds=2e-3,
        copy_bytes=1e6,
        copy_seconds=2e-4,
        op_overhead_seconds=1e-4,
        op_timings=[("rng", 1e6, 1.1e-3)],
    )
    assert dict(spec.op_bandwidth)["rng"] == pytest.approx(1e6 / 1e-3)
    mask = rk.value("m", 10, kind="rng", bytes_moved=10**6)
    assert spec.value_seconds(mask) == pytest.approx(1.1e-3)  # the op as measured


def test_kind_rates_survive_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(calibration.ENV_CALIBRATE, raising=False)
    monkeypatch.setattr(calibration, "_IN_PROCESS", {})
    measured = calibration.Measurement(2e9, 1e-2, 1e8, 1e-2, 1e-6, op_timings=(("rng", 1e8, 0.5), ("norm", 1e8, 1e-2)))
    spec = calibration.calibrated_spec("k", lambda: measured)
    assert dict(spec.op_bandwidth)["rng"] == pytest.approx(2e8, rel=0.08)  # quantized to a 10^(1/16) step
    monkeypatch.setattr(calibration, "_IN_PROCESS", {})
    again = calibration.calibrated_spec("k", lambda: pytest.fail("measured again instead of read from disk"))
    assert again == spec


def test_a_cache_from_before_kind_rates_is_not_read(tmp_path, monkeypatch):
    """A disk cache written by the version without per-kind rates would price dropout at a copy's
    rate for good: it lives under another name, so it is measured again."""
    monkeypatch.setenv(calibration.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(calibration.ENV_CALIBRATE, raising=False)
    monkeypatch.setattr(calibration, "_IN_PROCESS", {})
    (tmp_path / "device-k.json").write_text(json.dumps(dataclasses.asdict(rk.DeviceSpec(name="old"))))
    measured = calibration.Measurement(2e9, 1e-2, 1e8, 1e-2, 0.0, op_timings=(("rng", 1e8, 0.5),))
    assert calibration.calibrated_spec("k", lambda: measured).op_bandwidth


def test_torch_measures_every_kind_without_touching_the_default_generator():
    torch = pytest.importorskip("torch")
    from remat_kit._torch import _device

    state = torch.random.get_rng_state()
    ops = _device.op_timings(torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state())
    assert {op for op, _, _ in ops} == {"rng", "attention", "norm", "aten.gelu", "aten.silu", "aten.tanh"}
    assert all(num_bytes > 0 and seconds > 0 for _, num_bytes, seconds in ops)
    rk.DeviceSpec.calibrated("d", matmul_flops=1, matmul_seconds=1, copy_bytes=1, copy_seconds=1, op_timings=ops)


def test_torch_trace_marks_dropout_draws_as_rng_and_names_ops():
    """The rates reach dropout only if the trace labels its random draws RNG, and GELU only if it
    records the op's name."""
    torch = pytest.importorskip("torch")
    from remat_kit._torch._api import _profile
    from remat_kit._torch._graph import build_graph, segment

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.dropout(torch.nn.functional.gelu(self.lin(x)).softmax(-1), 0.1, training=True)

    model = torch.nn.Sequential(Block(), Block())
    x = torch.randn(2, 8, requires_grad=True)
    prof = _profile(model, (x,), {})
    graph = build_graph(prof, segment(model, prof, whole_model=True)).graph
    kinds = {v.name.rsplit("/", 1)[-1].rsplit(".", 1)[0]: v.kind for v in graph if v.is_activation}
    rng = [name for name, kind in kinds.items() if kind is rk.OpKind.RNG]
    assert rng and all("bernoulli" in n or "dropout" in n for n in rng), kinds
    assert any(kind is rk.OpKind.ATTENTION for name, kind in kinds.items() if "softmax" in name), kinds
    gelu = [v for v in graph if v.is_activation and v.op == "aten.gelu"]
    assert len(gelu) == 2 and all(v.name.endswith(("aten.gelu.0",)) for v in gelu)
    spec = rk.DeviceSpec(memory_bandwidth=1e10, op_bandwidth=(("aten.gelu", 1e8),))
    assert spec.value_seconds(gelu[0]) == pytest.approx(gelu[0].bytes_moved / 1e8)


def test_an_ops_own_rate_wins_over_its_kinds():
    spec = rk.DeviceSpec(memory_bandwidth=1e10, op_bandwidth=(("aten.gelu", 1e8), ("elementwise", 1e9)))
    gelu = rk.value("g", 100, kind="elementwise", bytes_moved=10**6, op="aten.gelu")
    add = rk.value("a", 100, kind="elementwise", bytes_moved=10**6, op="aten.add")
    unnamed = rk.value("u", 100, kind="matmul", bytes_moved=10**6)
    assert gelu.op == "aten.gelu" and unnamed.op is None
    assert spec.value_seconds(gelu) == pytest.approx(1e-2)
    assert spec.value_seconds(add) == pytest.approx(1e-3)
    assert spec.value_seconds(unnamed) == pytest.approx(1e-4)
