"""Time, not FLOPs (issue 12, deliverable 3): a per-op overhead in the time model, and device
constants measured on the machine at hand, cached in the process and on disk."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import remat_kit as rk
from remat_kit._core import calibration


def _positive_finite(spec: rk.DeviceSpec) -> None:
    for field in ("peak_flops", "memory_bandwidth", "host_bandwidth"):
        value = getattr(spec, field)
        assert math.isfinite(value) and value > 0, (field, value)
    assert math.isfinite(spec.op_overhead_seconds) and spec.op_overhead_seconds >= 0


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(calibration.ENV_CALIBRATE, raising=False)
    monkeypatch.setattr(calibration, "_IN_PROCESS", {})
    return tmp_path


def _counting(module, monkeypatch):
    calls = []
    real = module.measure

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(module, "measure", counted)
    return calls


def test_torch_calibration_is_positive_and_cached(fresh_cache, monkeypatch):
    pytest.importorskip("torch")
    from remat_kit._torch import _device

    calls = _counting(_device, monkeypatch)
    spec = _device.default_device()
    _positive_finite(spec)
    assert spec.op_overhead_seconds > 0  # eager torch dispatches every op
    assert _device.default_device() is spec and len(calls) == 1  # in-process cache
    monkeypatch.setattr(calibration, "_IN_PROCESS", {})
    assert _device.default_device() == spec and len(calls) == 1  # the disk cache, no new measurement
    assert len(list(fresh_cache.glob("device-*.json"))) == 1


def test_jax_calibration_is_positive_and_cached(fresh_cache, monkeypatch):
    pytest.importorskip("jax")
    from remat_kit._jax import _device

    calls = _counting(_device, monkeypatch)
    spec = _device.default_device()
    _positive_finite(spec)
    assert _device.default_device() is spec and len(calls) == 1


def test_calibration_can_be_turned_off_and_refreshed(fresh_cache, monkeypatch):
    measured = calibration.Measurement(2e9, 1e-2, 1e8, 1e-2, 1e-5)
    calls = []

    def measure():
        calls.append(1)
        return measured

    monkeypatch.setenv(calibration.ENV_CALIBRATE, "0")
    assert calibration.calibrated_spec("k", measure) == rk.DeviceSpec() and not calls
    monkeypatch.setenv(calibration.ENV_CALIBRATE, "fresh")
    spec = calibration.calibrated_spec("k", measure)
    assert calibration.calibrated_spec("k", measure) is spec and len(calls) == 1  # once per process
    assert not list(fresh_cache.glob("*.json"))  # the disk cache neither written
    calibration.cache_path("k2").write_text(json.dumps(dataclasses.asdict(rk.DeviceSpec(name="stale"))))
    assert calibration.calibrated_spec("k2", measure).name == "k2" and len(calls) == 2  # nor read
    assert spec.op_overhead_seconds == pytest.approx(1e-5, rel=0.1)
    monkeypatch.setenv(calibration.ENV_CALIBRATE, "sometimes")
    with pytest.raises(ValueError, match="REMAT_KIT_CALIBRATE='sometimes'"):
        calibration.calibrated_spec("k", measure)


def test_a_corrupt_disk_cache_is_measured_again(fresh_cache):
    calibration.cache_path("k").write_text("{not json")
    spec = calibration.calibrated_spec("k", lambda: calibration.Measurement(2e9, 1e-2, 1e8, 1e-2, 0.0))
    _positive_finite(spec)
    assert rk.DeviceSpec(**json.loads(calibration.cache_path("k").read_text())) == spec


def test_overhead_must_be_non_negative():
    with pytest.raises(ValueError, match="op_overhead_seconds=-1"):
        rk.DeviceSpec(op_overhead_seconds=-1)
    with pytest.raises(ValueError, match="op_overhead_seconds=nan"):
        rk.DeviceSpec(op_overhead_seconds=float("nan"))


def _many_small_or_one_large() -> rk.CostGraph:
    """Block 0: a big matmul output the backward reads, and a chain of ten small elementwise
    values it reads too. Freeing either half of the kept bytes fits the budget below: recompute
    the one matmul (many FLOPs, one op) or the ten small ops (few FLOPs, ten ops)."""
    vals = [rk.value("x", 100, role="input"), rk.value("w", 10, role="param")]
    vals.append(rk.value("big", 1000, kind="matmul", flops=10**8, deps=["x", "w"], bwd_reads=["x"], bytes_moved=1100))
    prev = "x"
    for k in range(10):
        name = f"small{k}"
        vals.append(rk.value(name, 100, kind="elementwise", flops=100, deps=[prev], bwd_reads=[name], bytes_moved=200))
        prev = name
    vals.append(rk.value("out", 100, kind="elementwise", flops=100, deps=["big", prev], bwd_reads=["big"]))
    # A second block whose backward holds much: the peak is there, above block 0's kept bytes.
    vals.append(rk.value("wide", 5000, kind="matmul", flops=10**8, deps=["out", "w"], bwd_reads=["out"], block=1))
    vals.append(rk.value("act", 5000, kind="elementwise", flops=100, deps=["wide"], bwd_reads=["wide"], block=1))
    vals.append(rk.value("loss", 4, kind="reduction", deps=["act"], bwd_reads=["act"], block=1))
    return rk.CostGraph(vals)


@pytest.mark.parametrize("solver", ["dp", "milp"])
def test_the_overhead_term_changes_which_ops_are_recomputed(solver):
    graph = _many_small_or_one_large()
    base = rk.simulate(graph).activation_bytes
    budget = (base - 900) / base
    roofline = rk.DeviceSpec(peak_flops=1e11, memory_bandwidth=1e10)
    eager = rk.DeviceSpec(peak_flops=1e11, memory_bandwidth=1e10, op_overhead_seconds=1e-3)
    cheap_flops = rk.solve(graph, budget, solver=solver, device=roofline)
    few_ops = rk.solve(graph, budget, solver=solver, device=eager)
    assert "big" not in dict(cheap_flops.decisions) or dict(cheap_flops.decisions)["big"] is rk.Decision.SAVE
    assert cheap_flops.num_recomputed_ops >= 9
    assert dict(few_ops.decisions)["big"] is rk.Decision.RECOMPUTE and few_ops.num_recomputed_ops == 1
    # The simulator and the scores price the same: roofline plus the overhead per recomputed op.
    sim = rk.simulate(graph, few_ops, device=eager)
    assert sim.recompute_seconds == pytest.approx(roofline.seconds(10**8, 1100) + 1e-3)
    assert few_ops.predicted_recompute_seconds == pytest.approx(sim.recompute_seconds)
    row = next(r for r in rk.score_layers(graph, by="kind", device=eager) if r.kind == "matmul")
    matmuls = [v for v in graph if v.kind is rk.OpKind.MATMUL]
    assert row.recompute_seconds == pytest.approx(sum(roofline.seconds(v.flops, v.bytes_moved) + 1e-3 for v in matmuls))


def test_calibrated_takes_the_overhead_out_of_the_measured_rates():
    spec = rk.DeviceSpec.calibrated(
        "d", matmul_flops=1e9, matmul_seconds=2e-3, copy_bytes=1e6, copy_seconds=2e-4, op_overhead_seconds=1e-4
    )
    assert spec.peak_flops == pytest.approx(1e9 / 1.9e-3)
    assert spec.memory_bandwidth == pytest.approx(1e6 / 1e-4)
    assert spec.op_seconds(1e9, 0) == pytest.approx(2e-3)  # the matmul as measured


def test_jax_calibration_runs_while_a_users_jit_traces(fresh_cache):
    """`auto` plans inside the user's `jit(grad(...))` trace; the microbenchmark's arrays were
    tracers of it there, and timing them raised AttributeError (block_until_ready on a tracer)."""
    import jax
    import jax.numpy as jnp

    from remat_kit._jax import _device

    seen = []

    @jax.jit
    def step(x):
        seen.append(_device.default_device())
        return x + 1

    step(jnp.ones(3))
    assert seen and seen[0].peak_flops > 0 and seen[0] != rk.DeviceSpec()
