"""Regressions from the conformance suite's outside torch models (reports/conformance.md).

* mambapy's Jamba: its Mamba layers run `pscan`, a custom autograd.Function whose forward clones
  its inputs, adds and multiplies into strided slices of the clones in place (under no_grad, as
  every Function's forward runs), saves its input and the scanned clone with ctx, and returns a
  view of the clone. `_Scan` below is that shape, small.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import remat_kit
from remat_kit._torch._apply import compile_plan
from remat_kit._torch._measure import measure_step
from tests.torch_helpers import max_rel_err

D, SEQ, BATCH = 16, 16, 2


class _Scan(torch.autograd.Function):
    """h[t] = a[t] h[t-1] + x[t], a Hillis-Steele scan in place on clones, like mambapy's pscan."""

    @staticmethod
    def forward(ctx, a_in: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        a, x = a_in.clone().transpose(1, 2), x_in.clone().transpose(1, 2)  # (B, D, L), strided
        length, step = x.size(2), 1
        while step < length:
            x[:, :, step:].add_(a[:, :, step:] * x[:, :, :-step].clone())
            a[:, :, step:].mul_(a[:, :, :-step].clone())
            step *= 2
        ctx.save_for_backward(a_in, x)
        return x.transpose(1, 2)[:, :length]  # a view of the clone (dispatched as aten.alias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_in, h = ctx.saved_tensors
        grad = grad.clone()
        for t in range(grad.size(1) - 2, -1, -1):
            grad[:, t] += a_in[:, t + 1] * grad[:, t + 1]
        grad_a = torch.zeros_like(a_in)
        grad_a[:, 1:] = h.transpose(1, 2)[:, :-1] * grad[:, 1:]
        return grad_a, grad


class _ScanLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out, self.drop = nn.Linear(D, 2 * D), nn.Linear(D, D), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, u = self.inp(x).chunk(2, -1)
        # The decay's last op (an add of a scalar) saves nothing: only the scan's ctx reads it.
        decay = torch.tanh(a) * 0.4 + 0.5
        return x + self.drop(self.out(_Scan.apply(decay, torch.tanh(u))))


class _ScanNet(nn.Module):
    def __init__(self, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(_ScanLayer() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.pow(2).mean()


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    _loss(model(x)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _scan_setup() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _ScanNet().train(), torch.randn(BATCH, SEQ, D)


def test_scan_is_a_correct_scan() -> None:
    # The model's own check: the scan equals the sequential recurrence, and its backward autograd's.
    a, x = torch.rand(2, 8, 3, requires_grad=True), torch.randn(2, 8, 3, requires_grad=True)
    h, want = _Scan.apply(a, x), []
    prev = torch.zeros(2, 3)
    for t in range(8):
        prev = a[:, t] * prev + x[:, t]
        want.append(prev)
    want = torch.stack(want, 1)
    torch.testing.assert_close(h, want)
    g = torch.randn_like(h)
    got = torch.autograd.grad(h, (a, x), g)
    torch.testing.assert_close(got, torch.autograd.grad(want, (a, x), g))


def test_custom_function_reads_and_gradients_are_in_the_graph() -> None:
    # The Function's node hangs on the view it returns; what ctx saved (its input a_in and the
    # scanned clone) is read by the backward, and its inputs receive gradients through it.
    model, x = _scan_setup()
    tg = compile_plan(model, (x,), {}, 1.0).tg
    g = tg.graph
    decay = next(v for v in g.values if v.name.endswith("aten.add.0") and v.module == "layers.0")
    assert g.is_residual[g.index(decay.name)]  # read by the scan's backward alone
    first_tanh = next(v for v in g.values if v.name.endswith("aten.tanh.0") and v.module == "layers.0")
    assert g.gets_grad[g.index(first_tanh.name)]  # its gradient flows back through the scan


@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_custom_inplace_scan_gradients_exact(budget: float) -> None:
    model, x = _scan_setup()
    want = _grads(model, x)
    rematted = remat_kit.auto(copy.deepcopy(model), budget)
    try:
        got = _grads(rematted, x)
    except remat_kit.InfeasibleBudgetError as e:
        assert e.smallest_fraction > budget
        return
    assert max_rel_err(got, want) <= 1e-6
    assert max_rel_err(_grads(rematted, x), want) <= 1e-6  # the second step, from the cached plan
