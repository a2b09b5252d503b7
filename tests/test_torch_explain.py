"""remat_kit explain for torch: the table's data, stable names, predicted beside measured."""

from __future__ import annotations

import pytest
import torch
from torch_helpers import TinyGPT, tokens

import remat_kit._torch as rt


def test_explain_prints_blocks_ops_and_measured(capsys):
    torch.manual_seed(0)
    model = rt.auto(TinyGPT(layers=4), 0.6)
    idx, tgt = tokens(seq=32)
    ex = rt.explain(model, idx, tgt, measure=True, loss_fn=lambda loss: loss)
    out = capsys.readouterr().out
    assert "activation memory, predicted" in out and "activation memory, measured" in out
    assert ex.plan.predicted_extra_step_seconds > 0 and "extra step time, predicted" in out
    assert ex.budget_meaning.startswith("the whole step") and "budget 0.6 bounds the whole step" in out
    assert [r["block"] for r in ex.block_rows] == ["pre", "h.0", "h.1", "h.2", "h.3", "post"]
    assert ex.block_rows[0]["plan"].startswith("pinned")
    # Stable value names: layer path / aten op . occurrence.
    assert "h.1/aten.bmm.0" in {v.name for v in ex.compiled.tg.graph.values}
    # explain reports, it does not enforce: predicted and measured agree to a few % of no remat.
    gap = ex.measured_plan.activation_bytes - ex.plan.predicted_activation_bytes
    assert abs(gap) <= 0.08 * ex.measured_none.activation_bytes
    assert ex.measured_plan.flops - ex.measured_none.flops == ex.plan.predicted_recompute_flops
    # explain leaves the rematted model as it was, and it still trains.
    model(idx, tgt).backward()


def test_explain_without_auto_and_bad_calls():
    model = TinyGPT(layers=2)
    idx, tgt = tokens(seq=16)
    ex = rt.explain(model, idx, tgt, budget=0.8, print_table=False)
    assert ex.plan.budget == "0.8" and "forward" not in model.__dict__
    with pytest.raises(ValueError, match="example inputs"):
        rt.explain(model)
    with pytest.raises(ValueError, match="nn.Module instance"):
        rt.explain(TinyGPT, idx)


def test_explain_says_a_decorated_layer_class_budget_is_per_call(capsys):
    """A decorated layer class is planned for what each call keeps (it is one layer of the caller's
    stack), and explain says so; it planned the instance as a whole step before."""

    import remat_kit

    @remat_kit.auto(budget=0.5)
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    block = Block()
    ex = rt.explain(block, torch.randn(64, 32, requires_grad=True))
    assert ex.budget_meaning.startswith("per call") and "budget 0.5 bounds per call" in capsys.readouterr().out
