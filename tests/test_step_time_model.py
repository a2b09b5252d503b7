"""Predicted recompute time as the recompute pays it (issue 12 item 3), checked by structure, never by time.

Three things the eager GPT's recompute paid and the prediction missed (reports/step_time_model.md):

* a multi-output op (a layer norm: output, mean, rstd) was priced once per output, each with the
  op's whole input and output bytes: three times;
* the copy and per-op rates were timed back to back, each output reusing the buffer just freed
  and still in cache; in a recompute each output lands in memory the cache no longer holds;
* the fixed costs a region pays per op (dispatch, autograd, the modes' Python, checkpoint's hooks)
  were timed on tiny tensors with all of it cached; between ops that move megabytes they cost
  more (`ColdDispatch`).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import remat_kit as rk
import remat_kit._torch._layerplan as layerplan_mod
import remat_kit._torch._modecost as modecost_mod
from remat_kit._core import calibration
from remat_kit._core.graph import DeviceSpec
from remat_kit._torch import _device
from remat_kit._torch._modecost import ColdDispatch, ModeCost
from remat_kit._torch._modes import CACHE, RUN, SKIP, Region, Step


def _step(func: str, action: str, num_bytes: int = 0, flops: int = 0) -> Step:
    return Step(func, action, (), (), False, False, None, (), flops=flops, bytes_moved=num_bytes)


def test_a_multi_output_op_moves_its_bytes_once() -> None:
    # Before, each of native_layer_norm's three outputs carried the op's input bytes and the
    # outputs recorded so far: the op priced at about three times what it moves.
    from remat_kit._torch._api import _profile
    from remat_kit._torch._graph import build_graph, segment

    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    x = torch.randn(32, 64, requires_grad=True)
    prof = _profile(model, (x,), {})
    graph = build_graph(prof, segment(model, prof, whole_model=True)).graph
    norm = [v for v in graph if v.is_activation and v.op == "aten.native_layer_norm"]
    assert len(norm) == 3  # output, mean, rstd
    inputs = (x.numel() + 2 * 64) * 4  # x, weight, bias
    outputs = (x.numel() + 2 * 32) * 4  # output, mean, rstd
    assert sum(v.bytes_moved for v in norm) == inputs + outputs
    assert sum(v.flops for v in norm) == norm[0].flops


def test_each_timed_op_of_the_calibration_follows_a_cache_eviction(monkeypatch) -> None:
    # Before, the copy and each named op were timed back to back: the output buffer just freed
    # was handed out again, still in cache, and the rates came out faster than the recompute's.
    calls = {"evict": 0, "timed": 0}
    monkeypatch.setattr(_device, "REPEATS", 2)
    monkeypatch.setattr(_device, "WARMUP", 1)
    monkeypatch.setattr(_device, "COLD_BYTES", 2**20)
    real_evictor = _device._evictor

    def evictor(dev):
        evict = real_evictor(dev)
        assert evict is not None  # on a CPU

        def counted():
            calls["evict"] += 1
            return evict()

        return counted

    monkeypatch.setattr(_device, "_evictor", evictor)
    real_least = _device._least_seconds

    def least(fn, dev, repeats=2, before=None):
        calls["timed"] += 1
        return real_least(fn, dev, repeats, before)

    monkeypatch.setattr(_device, "_least_seconds", least)
    ops = _device.op_timings(torch.device("cpu"))
    assert calls["timed"] == len(ops) and calls["evict"] == len(ops) * 2
    assert real_evictor(torch.device("meta")) is None  # not a CPU: nothing to evict


def test_a_cache_from_the_earlier_microbenchmark_is_not_read(tmp_path, monkeypatch) -> None:
    # Rates timed without eviction describe hot outputs: the key names what is measured now.
    monkeypatch.setenv("REMAT_KIT_CALIBRATE", "1")
    monkeypatch.setenv("REMAT_KIT_CACHE_DIR", str(tmp_path))
    kind = f"torch-{torch.__version__}-cpu-threads{torch.get_num_threads()}"
    calibration.cache_path(kind).parent.mkdir(parents=True, exist_ok=True)
    calibration.cache_path(kind).write_text(json.dumps(dataclasses.asdict(DeviceSpec(name="old"))))
    measured = calibration.Measurement(2e9, 1e-2, 1e8, 1e-2, 1e-6)
    monkeypatch.setattr(_device, "measure", lambda dev: measured)
    monkeypatch.setattr(calibration, "_IN_PROCESS", {})
    spec = _device.default_device(None)
    assert spec.name != "old" and spec.name.endswith(_device.MEASURED)


def test_the_cold_factor_interpolates_between_its_points() -> None:
    cold = ColdDispatch(((2**20, 1.5), (2**22, 2.0), (2**24, 3.0)))
    assert cold.factor(0) == 1.0 and ColdDispatch().factor(2**30) == 1.0
    assert cold.factor(2**19) == pytest.approx(1.25)
    assert cold.factor(2**21) == pytest.approx(1.75)
    assert cold.factor(2**23) == pytest.approx(2.5)
    assert cold.factor(2**30) == 3.0  # held beyond the last point
    sizes = [2**k for k in range(10, 28)]
    assert all(cold.factor(a) <= cold.factor(b) for a, b in zip(sizes, sizes[1:]))


def test_the_cold_factor_is_measured_on_a_cpu_only(monkeypatch) -> None:
    monkeypatch.setenv("REMAT_KIT_CALIBRATE", "1")
    modecost_mod.cold_dispatch.cache_clear()
    try:
        cold = modecost_mod.cold_dispatch("cpu", repeats=5)
        assert [b for b, _ in cold.points] == list(modecost_mod.COLD_BYTES)
        assert all(f >= 1.0 for _, f in cold.points)
        assert modecost_mod.cold_dispatch("meta") == ColdDispatch()
        monkeypatch.setenv("REMAT_KIT_CALIBRATE", "0")
        modecost_mod.cold_dispatch.cache_clear()
        assert modecost_mod.cold_dispatch("cpu") == ColdDispatch()
    finally:
        modecost_mod.cold_dispatch.cache_clear()


def _big_region() -> Region:
    steps = (
        _step("aten.mm.default", CACHE, num_bytes=2**24, flops=10**6),
        _step("aten.view.default", RUN),
        _step("aten.gelu.default", RUN, num_bytes=2**24),
        _step("aten.mul.Tensor", SKIP, num_bytes=2**24),
        _step("aten.add.Tensor", CACHE, num_bytes=2**24),
    )
    return Region("b", "b", steps)


def test_as_run_prices_a_regions_fixed_costs_at_the_cold_factor(monkeypatch) -> None:
    # Before, the fixed costs were added at their tiny-tensor price whatever the region's ops
    # move: the eager GPT's selective regions paid about twice that between megabyte ops.
    region, device = _big_region(), DeviceSpec(op_overhead_seconds=1e-6)
    modes, cost = ModeCost.flat(1e-3), layerplan_mod.RegionCost(frame_seconds=1e-2, op_seconds=1e-4)
    monkeypatch.setattr(layerplan_mod, "mode_cost", lambda *a, **k: modes)
    monkeypatch.setattr(layerplan_mod, "checkpoint_region_cost", lambda *a, **k: cost)
    plan = rk.Plan.from_decisions(rk.CostGraph([rk.value("x", 8, role="input")]), {})
    warm_fixed = modes.replay_of(region) + cost.of(region) + layerplan_mod.unvalued_seconds(region, device)
    predicted = {}
    for factor in (1.0, 3.0):
        cold = ColdDispatch(((1, factor),))
        monkeypatch.setattr(layerplan_mod, "cold_dispatch", lambda *a, _c=cold, **k: _c)
        predicted[factor] = layerplan_mod.as_run(plan, {"b": region}, device).predicted_recompute_seconds
    assert predicted[1.0] == pytest.approx(plan.predicted_recompute_seconds + warm_fixed)
    assert predicted[3.0] - plan.predicted_recompute_seconds == pytest.approx(3 * warm_fixed)


def test_the_plain_or_modes_choice_weighs_the_modes_at_the_cold_factor() -> None:
    # A region that keeps nothing inside: plain checkpoint runs the skipped mul (priced 2 ms at
    # 1e10 B/s), the modes skip it at a per-op price; cold, the modes cost more than the mul.
    steps = (
        _step("aten.mm.default", RUN, num_bytes=2**24, flops=10**6),
        _step("aten.mul.Tensor", SKIP, num_bytes=2 * 10**7),
        _step("aten.add.Tensor", RUN, num_bytes=2**24),
    )
    region = Region("b", "b", steps)
    device = DeviceSpec(memory_bandwidth=1e10)
    modes = ModeCost.flat(3e-4)  # 1.8 ms warm for the region's forward (3 ops) and replay (3 ops)
    assert not layerplan_mod.plain_when_faster(device, modes)(region)
    assert layerplan_mod.plain_when_faster(device, modes, ColdDispatch(((1, 2.0),)))(region)
