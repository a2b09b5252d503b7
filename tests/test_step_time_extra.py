"""The plan's predicted extra step time (issue 12 item 3), checked by structure, never by time.

The eager GPT's extra step time held more than its recompute: a selective region runs its
forward under `_ForwardMode` too, every op through Python, and the plan reported only the
recompute (`predicted_recompute_seconds`), while `by_time` chose between plans by a price that
did count the forward's modes. `predicted_extra_step_seconds` is now that price, reported.
"""

from __future__ import annotations

import pytest
import torch
from torch_helpers import TinyGPT, fresh, grads, tokens

import remat_kit as rk
import remat_kit._torch._layerplan as layerplan_mod
from remat_kit._core.graph import DeviceSpec
from remat_kit._torch._api import state_of
from remat_kit._torch._modecost import ColdDispatch, ModeCost
from remat_kit._torch._modes import CACHE, RUN, SKIP, Region, Step


def _step(func: str, action: str, num_bytes: int = 0, flops: int = 0) -> Step:
    kept = (0,) if action == CACHE else ()  # the output the forward keeps
    return Step(func, action, kept, (), False, False, None, (), flops=flops, bytes_moved=num_bytes)


def _selective() -> Region:
    steps = (
        _step("aten.mm.default", CACHE, num_bytes=2**22, flops=10**6),
        _step("aten.gelu.default", RUN, num_bytes=2**22),
        _step("aten.mul.Tensor", SKIP, num_bytes=2**22),
        _step("aten.add.Tensor", CACHE, num_bytes=2**22),
    )
    return Region("a", "a", steps)


def _plain() -> Region:
    steps = (
        _step("aten.mm.default", RUN, num_bytes=2**22, flops=10**6),
        _step("aten.mul.Tensor", SKIP, num_bytes=2**22),
        _step("aten.add.Tensor", RUN, num_bytes=2**22),
    )
    return Region("b", "b", steps, plain=True)


def _priced(monkeypatch, modes: ModeCost, cost: layerplan_mod.RegionCost, cold: ColdDispatch) -> None:
    monkeypatch.setattr(layerplan_mod, "mode_cost", lambda *a, **k: modes)
    monkeypatch.setattr(layerplan_mod, "checkpoint_region_cost", lambda *a, **k: cost)
    monkeypatch.setattr(layerplan_mod, "cold_dispatch", lambda *a, **k: cold)


def test_the_extra_step_time_adds_the_forward_modes_and_is_what_the_plan_was_chosen_by(monkeypatch) -> None:
    # Before, the plan reported its recompute alone: the selective regions' forward under the
    # modes (priced, and chosen by, in `by_time`) was in no figure the plan reported.
    modes = ModeCost(frame=1e-3, forward=1e-4, keep=2e-4, run=3e-4, cached=4e-4, skipped=5e-4)
    cost, cold = layerplan_mod.RegionCost(frame_seconds=1e-2, op_seconds=1e-5), ColdDispatch(((1, 2.0),))
    _priced(monkeypatch, modes, cost, cold)
    device = DeviceSpec(op_overhead_seconds=1e-6)
    plan = rk.Plan.from_decisions(rk.CostGraph([rk.value("x", 8, role="input")]), {})
    selective, plain = _selective(), _plain()
    assert selective.needs_modes and not plain.needs_modes
    regions = {"a": selective, "b": plain}
    run = layerplan_mod.as_run(plan, regions, device)
    forward = modes.forward_of(selective) * cold.factor(layerplan_mod.region_bytes(selective))
    assert forward > 0
    assert run.predicted_extra_step_seconds == pytest.approx(run.predicted_recompute_seconds + forward)
    price = layerplan_mod.predicted_seconds(plan, regions, device, modes, cost, cold)
    assert run.predicted_extra_step_seconds == pytest.approx(price)
    # A plain region runs no mode: its forward adds nothing beyond checkpoint's own cost.
    only_plain = layerplan_mod.as_run(plan, {"b": plain}, device)
    assert only_plain.predicted_extra_step_seconds == pytest.approx(only_plain.predicted_recompute_seconds)
    # No regions (every layer kept whole, unwrapped): nothing beyond the plan's recompute.
    assert layerplan_mod.as_run(plan, {}, device).predicted_extra_step_seconds == plan.predicted_recompute_seconds


def test_the_forward_part_of_the_modes_is_every_op_passed_on_or_kept() -> None:
    modes = ModeCost(frame=1.0, forward=10.0, keep=20.0, run=100.0, cached=200.0, skipped=300.0)
    region = _selective()  # two kept, two passed on; the replay stops after the last kept op
    assert modes.forward_of(region) == pytest.approx(0.5 + 2 * 20.0 + 2 * 10.0)
    assert modes.forward_of(region) + modes.replay_of(region) == pytest.approx(modes.of(region))


def test_a_planned_model_reports_its_extra_step_time(monkeypatch) -> None:
    # End to end through `auto`: what `plan_of` reports is the recompute plus the forward's modes
    # of the selective regions the model runs, at their cold factor.
    torch.manual_seed(0)
    model = TinyGPT(layers=4, d=32, heads=4, vocab=32, p=0.1).train()
    idx, tgt = tokens(batch=2, seq=32)
    # Cheap modes: the solver's selective plan is kept (whole layers cost more recompute).
    modes, cold = ModeCost.flat(1e-9), ColdDispatch(((1, 1.5),))
    _priced(monkeypatch, modes, layerplan_mod.RegionCost(frame_seconds=1e-9, op_seconds=1e-9), cold)
    rematted = rk.auto(fresh(model), 0.5)
    grads(rematted, idx, tgt)
    (compiled,) = state_of(rematted).plans.values()
    selective = [r for r in compiled.regions.values() if not r.plain]
    assert selective
    forward = sum(modes.forward_of(r) * cold.factor(layerplan_mod.region_bytes(r)) for r in selective)
    (plan,) = rk.plan_of(rematted)
    assert plan.predicted_extra_step_seconds == pytest.approx(plan.predicted_recompute_seconds + forward)
    assert plan.predicted_extra_step_seconds > plan.predicted_recompute_seconds > 0
