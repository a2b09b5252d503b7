"""Eager plans priced by what running them costs (issue 12 item 2), checked by structure, never by time.

* The replay modes' cost is calibrated on the modes themselves (`_modecost.mode_cost`), per op by
  what the plan does with it, not on a pass-through dispatch mode.
* A plan made from a profile written out from a few layers may be a plan of whole layers: every
  layer's first call is checked against the profile (a kept layer under the forward mode alone),
  so `by_time` no longer keeps the solver's selective plan there. The tiny MLP of the sweep
  (8 layers) stepped at 2.1x of no remat under that selective plan (reports/torch/tiny_peers.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten
from torch_helpers import TinyGPT, fresh, grads, max_rel_err, tokens

import remat_kit as rk
import remat_kit._torch._layerplan as layerplan_mod
import remat_kit._torch._modecost as modecost_mod
import remat_kit._torch._run as run_mod
from benchmarks.models.torch_zoo import build
from remat_kit._core.graph import DeviceSpec
from remat_kit._torch._api import state_of
from remat_kit._torch._measure import measure_step
from remat_kit._torch._modecost import ModeCost
from remat_kit._torch._modes import CACHE, RUN, SKIP, OpSequenceError, Region, Step, _ForwardMode, _ReplayMode


def _count_dispatches(monkeypatch) -> dict[str, int]:
    seen = {"forward": 0, "replay": 0, "handed back": 0}
    for cls, key in ((_ForwardMode, "forward"), (_ReplayMode, "replay")):
        real = cls.__torch_dispatch__

        def counted(self, func, types, args=(), kwargs=None, _real=real, _key=key):
            seen[_key] += 1
            return _real(self, func, types, args, kwargs)

        monkeypatch.setattr(cls, "__torch_dispatch__", counted)
    real_back = _ReplayMode._hand_back

    def hand_back(self, k, step, *rest):
        seen["handed back"] += 1
        return real_back(self, k, step, *rest)

    monkeypatch.setattr(_ReplayMode, "_hand_back", hand_back)
    return seen


def test_planning_calibrates_the_per_op_cost_on_the_real_modes(monkeypatch) -> None:
    # Before, `by_time` priced a selective region's modes by a pass-through TorchDispatchMode:
    # neither replay mode ran while planning, and what they do per op beyond passing it on
    # (keeping outputs, handing them back, laying placeholders) was priced at nothing.
    modecost_mod.mode_cost.cache_clear()
    monkeypatch.setenv("REMAT_KIT_CALIBRATE", "1")
    seen = _count_dispatches(monkeypatch)
    during: dict[str, int] = {}
    real_by_time = layerplan_mod.by_time

    def by_time(*args, **kwargs):
        before = dict(seen)
        out = real_by_time(*args, **kwargs)
        during.update({k: seen[k] - before[k] for k in seen})
        return out

    monkeypatch.setattr("remat_kit._torch._plan.by_time", by_time)
    model, batch = build("gpt", "tiny")
    try:
        rk.auto(model, 0.7)(*batch).backward()
    finally:
        modecost_mod.mode_cost.cache_clear()
    assert during["forward"] > 0 and during["replay"] > 0 and during["handed back"] > 0, during


def test_calibration_is_nothing_when_off(monkeypatch) -> None:
    modecost_mod.mode_cost.cache_clear()
    monkeypatch.setenv("REMAT_KIT_CALIBRATE", "0")
    try:
        assert modecost_mod.mode_cost("cpu") == ModeCost()
        assert modecost_mod.mode_cost("meta") == ModeCost()
    finally:
        modecost_mod.mode_cost.cache_clear()


def _step(action: str, flops: int = 0, cache: tuple[int, ...] = ()) -> Step:
    spec = tree_flatten(torch.empty(2))[1]
    leaf = ("t", (2,), (1,), torch.float32, torch.device("cpu"))
    return Step("aten.tanh.default", action, cache, (), False, False, spec, (leaf,), flops=flops)


def test_a_region_is_priced_per_op_by_what_the_plan_does() -> None:
    # Each term a power of ten apart, so the sum names every term it counted.
    cost = ModeCost(frame=1, forward=10, keep=100, run=1_000, cached=10_000, skipped=100_000)
    steps = (_step(RUN, flops=8), _step(CACHE, cache=(0,)), _step(SKIP), _step(RUN, flops=8), _step(SKIP))
    region = Region("l", "l", steps)
    assert region.last_replayed == 3  # the trailing SKIP is past checkpoint's early stop
    forward = 4 * 10 + 100  # one op kept
    replay = 1_000 + 10_000 + 100_000 + 1_000
    assert cost.of(region) == 1 + forward + replay
    assert layerplan_mod.region_modes_seconds(region, cost) == cost.of(region)
    flat = ModeCost.flat(3.0)  # one number an op: the count the pass-through pricing made
    assert flat.of(region) == 3.0 * (len(steps) + region.last_replayed + 1)


def _first_and_second_step_modes(model: nn.Module, batch: tuple, monkeypatch) -> tuple[dict, dict]:
    """Per layer index, whether a dispatch mode was active at each of its calls, on two steps."""
    calls: list[tuple[int, bool]] = []
    for k, block in enumerate(model.blocks):
        inner = block.forward

        def spied(*args, _k=k, _inner=inner, **kwargs):
            calls.append((_k, _get_current_dispatch_mode() is not None))
            return _inner(*args, **kwargs)

        block.forward = spied
    out = []
    for _ in range(2):
        calls.clear()
        model(*batch).backward()
        out.append({k: [m for j, m in calls if j == k] for k in range(len(model.blocks))})
    return out[0], out[1]


def test_an_eight_layer_mlp_from_a_written_out_profile_gets_whole_layers(monkeypatch) -> None:
    # The sweep's tiny MLP has MIN_LAYERS layers, so it is planned from four profiled ones. With
    # the modes priced high a selective plan loses to whole layers; before, `by_time` kept the
    # solver's selective plan for every written-out profile (nothing checked a kept layer).
    monkeypatch.setattr(layerplan_mod, "mode_cost", lambda *a, **k: ModeCost.flat(1e-3))
    model, batch = build("mlp", "tiny")
    torch.manual_seed(1)
    want = grads(fresh(model), *batch)
    none = measure_step(fresh(model), batch, loss_fn=lambda x: x, count_flops=False).activation_bytes
    rematted = rk.auto(fresh(model), 0.7)
    first, second = _first_and_second_step_modes(rematted, batch, monkeypatch)
    (entry,) = state_of(rematted).plans.values()
    assert entry.profile.replicated_from > 0
    assert entry.plan.solver == "whole layers"
    assert entry.regions and not any(r.needs_modes for r in entry.regions.values())
    recomputed = {p for key, r in entry.regions.items() for p in (r.members or (key,))}
    kept = [k for k in range(len(rematted.blocks)) if f"blocks.{k}" not in recomputed]
    assert kept and len(kept) < len(rematted.blocks)
    # First step: every layer runs under a mode once (a kept one under the forward's check, a
    # recomputed one under the replay modes); after that none does.
    for k in range(len(rematted.blocks)):
        assert first[k][0] is True, (k, first[k])
        assert not any(second[k]), (k, second[k])
        assert len(second[k]) == (1 if k in kept else 2)
    assert max_rel_err(grads(rematted, *batch), want) == 0.0
    measured = measure_step(rematted, batch, loss_fn=lambda x: x, count_flops=False).activation_bytes
    assert measured <= 0.7 * none


class _Layer(nn.Module):
    def __init__(self, d: int, index: int, extra_at: int):
        super().__init__()
        # Every layer holds the same `extra_at`; only the layer index differs (allowed by the
        # written-out profile, which reads no attribute that differs otherwise).
        self.fc, self.layer_idx, self.extra_at = nn.Linear(d, d), index, extra_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.fc(x))
        if self.layer_idx == self.extra_at:
            y = torch.sigmoid(y)  # an op the profiled layers do not run
        return x + y


class _Stack(nn.Module):
    def __init__(self, n: int = 12, d: int = 16, extra_at: int = -1):
        super().__init__()
        self.blocks = nn.ModuleList(_Layer(d, i, extra_at) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.blocks:
            x = layer(x)
        return x.square().mean()


def test_a_kept_layer_that_differs_from_the_written_out_profile_is_caught(monkeypatch) -> None:
    # Layers 0, 1, 2 and the last are profiled; a kept layer in between that runs one more op
    # holds other activations than planned. Its first call, under the forward mode's check,
    # refuses it; the step is planned again from the whole forward and stays exact.
    monkeypatch.setattr(layerplan_mod, "mode_cost", lambda *a, **k: ModeCost.flat(1e-3))
    x = torch.randn(4, 16)
    probe = rk.auto(_Stack().train(), 0.7)
    probe(x).backward()
    (entry,) = state_of(probe).plans.values()
    assert entry.profile.replicated_from > 0 and entry.plan.solver == "whole layers"
    recomputed = {p for key, r in entry.regions.items() for p in (r.members or (key,))}
    kept = [k for k in range(3, 11) if f"blocks.{k}" not in recomputed]
    assert kept
    torch.manual_seed(0)
    model = _Stack(extra_at=kept[-1]).train()
    want = grads(fresh(model), x)
    refused: list[str] = []
    real = run_mod.run_checked

    def run_checked(region, *args):
        try:
            return real(region, *args)
        except OpSequenceError:
            refused.append(region.module)
            raise

    monkeypatch.setattr(run_mod, "run_checked", run_checked)
    rematted = rk.auto(fresh(model), 0.7)
    with pytest.warns(UserWarning, match="differs from its profile"):
        got = grads(rematted, x)
    assert refused == [f"blocks.{kept[-1]}"]
    assert max_rel_err(got, want) <= 1e-6
    (entry,) = state_of(rematted).plans.values()
    assert entry.profile.replicated_from == 0


def _named_step(func: str, action: str, *, rng: bool = False, flops: int = 0, num_bytes: int = 0) -> Step:
    return Step(func, action, (), (), rng, False, None, (), flops=flops, bytes_moved=num_bytes)


def test_ops_a_plain_region_runs_beyond_the_plan_are_priced_by_name_and_kind() -> None:
    # Before, `plain_extra` priced every op a plain checkpoint runs beyond the plan at a copy's
    # rate (a `Step` carried no kind): a dropout mask's draws at a fraction of their time.
    steps = (
        _named_step("aten.bernoulli_.float", SKIP, rng=True, num_bytes=10**6),
        _named_step("aten.gelu.default", SKIP, num_bytes=10**6),
        _named_step("aten.add.Tensor", SKIP, num_bytes=10**6),
        _named_step("aten.mm.default", RUN, flops=10**3, num_bytes=10),
    )
    device = DeviceSpec(memory_bandwidth=1e10, op_bandwidth=(("rng", 1e8), ("aten.gelu", 1e9)))
    flops, seconds = layerplan_mod.plain_extra(Region("b", "b", steps), device)
    assert flops == 0
    assert seconds == pytest.approx(1e6 / 1e8 + 1e6 / 1e9 + 1e6 / 1e10)


def test_the_replay_part_of_the_modes_cost_is_what_the_recompute_pays() -> None:
    cost = ModeCost(frame=1.0, forward=10.0, keep=20.0, run=100.0, cached=200.0, skipped=300.0)
    steps = (
        _named_step("aten.mm.default", RUN, flops=1),
        _named_step("aten.gelu.default", SKIP),
        _named_step("aten.gelu.default", SKIP),
    )
    region = Region("b", "b", steps)  # the replay stops after the first op (the last it computes)
    assert cost.replay_of(region) == pytest.approx(0.5 + 100.0)
    assert cost.of(region) == pytest.approx(1.0 + 3 * 10.0 + 100.0)


def test_predicted_recompute_counts_each_region_and_the_modes_as_run(monkeypatch) -> None:
    # Before, `as_run` added only what plain regions run beyond the plan: checkpoint's own cost per
    # region (its frame, hooks, RNG state) and the replay mode's per-op cost were used to choose a
    # plan but left out of the `predicted_recompute_seconds` that explain / plan_of report.
    torch.manual_seed(0)
    model = TinyGPT(layers=4, d=32, heads=4, vocab=32, p=0.1).train()
    idx, tgt = tokens(batch=2, seq=32)
    region_cost = layerplan_mod.RegionCost(frame_seconds=1.0, op_seconds=1e-3)
    monkeypatch.setattr(layerplan_mod, "mode_cost", lambda *a, **k: ModeCost.flat(1e-3))
    monkeypatch.setattr(layerplan_mod, "checkpoint_region_cost", lambda *a, **k: region_cost)
    rematted = rk.auto(fresh(model), 0.5)
    grads(rematted, idx, tgt)
    (compiled,) = state_of(rematted).plans.values()
    assert compiled.regions
    floor = sum(
        region_cost.of(r) + (0.0 if r.plain else ModeCost.flat(1e-3).replay_of(r)) for r in compiled.regions.values()
    )
    assert compiled.plan.predicted_recompute_seconds >= floor >= len(compiled.regions)


def test_region_cost_is_calibrated_on_a_transformer_block_and_keeps_the_random_stream(monkeypatch) -> None:
    # A chain of tiny tanh calls had no module calls, attention, dropout RNG state or layer-sized
    # op count: it priced a GPT layer's region at a fraction of its recompute's cost beyond the ops.
    calls = []
    real = layerplan_mod._Block.forward
    monkeypatch.setattr(layerplan_mod._Block, "forward", lambda self, x: calls.append(1) or real(self, x))
    monkeypatch.setenv("REMAT_KIT_CALIBRATE", "1")
    layerplan_mod.checkpoint_region_cost.cache_clear()
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    try:
        cost = layerplan_mod.checkpoint_region_cost("cpu", repeats=1, inner=1)
    finally:
        layerplan_mod.checkpoint_region_cost.cache_clear()
    assert torch.equal(torch.rand(4), want)
    assert calls and cost.frame_seconds >= 0.0 and cost.op_seconds >= 0.0


def test_views_a_recompute_runs_pay_their_dispatch() -> None:
    # Views own no value of the graph, so the roofline prices them at nothing; the recompute
    # dispatches each all the same (with autograd), up to its early stop.
    steps = (
        _named_step("aten.view.default", RUN),
        _named_step("aten.t.default", RUN),
        _named_step("aten.mm.default", RUN, flops=10**3, num_bytes=10),
        _named_step("aten.view.default", RUN),  # past the last op the replay computes: never run
        _named_step("aten.gelu.default", SKIP, num_bytes=10),
    )
    device = DeviceSpec(op_overhead_seconds=1e-3)
    assert layerplan_mod.unvalued_seconds(Region("b", "b", steps), device) == pytest.approx(2e-3)


def test_region_frame_is_timed_after_a_layers_step(monkeypatch) -> None:
    # Before, the frame was timed on a one-op region called back to back, with checkpoint's
    # Python and the dispatcher's state cache-warm; in a step a layer's forward or backward runs
    # between two calls of a region's frame. Priced warm, one region per layer read cheaper than
    # one region over two layers on the sweep's tiny GPT, which steps slower
    # (reports/torch/tiny_peers.md). A fake clock: the frame costs 1 warm, 3 right after a
    # transformer block ran, a block's region 10 more than the block alone.
    now, cold = [0.0], [False]
    real_run, real_forward = layerplan_mod.run_region, layerplan_mod._Block.forward

    def run_region(region, fn, args, kwargs):
        now[0] += (3.0 if cold[0] else 1.0) if fn is torch.tanh else 10.0
        cold[0] = False
        return real_run(region, fn, args, kwargs)

    def forward(self, x):
        cold[0] = True
        return real_forward(self, x)

    monkeypatch.setattr(layerplan_mod, "run_region", run_region)
    monkeypatch.setattr(layerplan_mod._Block, "forward", forward)
    monkeypatch.setattr(
        layerplan_mod, "calibration_clock", lambda _: (torch.device("cpu"), lambda: now[0], lambda: None)
    )
    monkeypatch.setenv("REMAT_KIT_CALIBRATE", "1")
    layerplan_mod.checkpoint_region_cost.cache_clear()
    try:
        cost = layerplan_mod.checkpoint_region_cost("cpu", repeats=2, inner=2)
    finally:
        layerplan_mod.checkpoint_region_cost.cache_clear()
    blocks = nn.Sequential(*(layerplan_mod._Block(16, 2, torch.device("cpu")) for _ in range(2)))
    x, ops = torch.linspace(-1, 1, 64).reshape(1, 4, 16).requires_grad_(), 0  # the calibration's input
    for part in (blocks[:1], blocks):
        recorder = modecost_mod._Recorder()
        with recorder:
            part(x)
        ops += len(recorder.ops)
    assert cost.frame_seconds == pytest.approx(3.0)
    # The per-op part is net of the frame as its blocks were timed (back to back: 1 each).
    assert cost.op_seconds == pytest.approx((10.0 + 10.0 - 2 * 1.0) / ops)


def test_tiny_zoo_gpt_gets_one_region_over_two_layers_within_the_budget(monkeypatch) -> None:
    # The benchmark's case (reports/torch/tiny_peers.md, budget 0.7): with a region's frame priced
    # above recomputing a layer's tail, `auto` recomputes the two layers sqrt(n) does as one
    # region; the boundary between them is not kept, the recompute holds both layers at once,
    # and the step stays within the budget by the live-storage tracker, gradients exact.
    monkeypatch.setattr(layerplan_mod, "mode_cost", lambda *a, **k: ModeCost.flat(1e-3))
    monkeypatch.setattr(
        layerplan_mod, "checkpoint_region_cost", lambda *a, **k: layerplan_mod.RegionCost(frame_seconds=1.0)
    )
    model, batch = build("gpt", "tiny")
    torch.manual_seed(1)
    model(*batch).backward()
    want = [p.grad.clone() for p in model.parameters()]
    none = measure_step(model, batch, loss_fn=lambda loss: loss, count_flops=False).activation_bytes
    rematted = rk.auto(model, 0.7)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    rematted(*batch).backward()
    got = [p.grad.clone() for p in model.parameters()]
    (compiled,) = state_of(rematted).plans.values()
    assert compiled.plan.solver == "whole layers"
    assert [r.members for r in compiled.regions.values()] == [("blocks.0", "blocks.1")]
    assert max_rel_err(got, want) == 0.0
    measured = measure_step(rematted, batch, loss_fn=lambda loss: loss, count_flops=False).activation_bytes
    assert measured <= 0.7 * none
