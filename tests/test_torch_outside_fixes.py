"""Regressions from the conformance suite's outside torch models (reports/conformance.md).

* mambapy's Jamba: its Mamba layers run `pscan`, a custom autograd.Function whose forward clones
  its inputs, adds and multiplies into strided slices of the clones in place (under no_grad, as
  every Function's forward runs), saves its input and the scanned clone with ctx, and returns a
  view of the clone; its backward pads a copy of its input and multiplies into temporaries, and
  the clone of A, multiplied in place last, is never read again. `_Scan` below is that shape,
  small. Gradients were wrong (placeholders handed to the Function), and memory measured over the
  prediction (the backward's temporaries were not in the memory model; the unread clone was,
  as an output alive to the end of the forward).
* Qwen2-MoE at its named floor measured 0.3506 of no remat at 0.339: `aten.index`'s backward
  (the expert gather) fills a zeros buffer the size of its input besides the gradient.
* Hugging Face ViT at 0.3: the InfeasibleBudgetError named 0.313, and 0.313 passed back was
  refused with the same error. The solver's least plan kept dropout masks half made (empty_like,
  bernoulli_, before div_ rewrites them in place), which the replay cannot keep and recomputes, so
  the plan the replay runs was over the floor the error named. `_ViT` is that model, small.
* Hugging Face Llama with its own `gradient_checkpointing_enable()` on, then `auto`: the floor the
  InfeasibleBudgetError named (0.966 of the model's step) measured 0.974 there. Each HF layer
  discards its activations and recomputes them itself, which the profile cannot see; a model
  that calls torch.utils.checkpoint (or save_on_cpu) inside its forward is the same. Both are
  now refused with an error that says what to turn off.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import remat_kit
from remat_kit._torch._measure import measure_step
from remat_kit._torch._plan import compile_plan
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
        shifted = F.pad(a_in[:, 1:], (0, 0, 0, 1))  # a[t + 1]: a copy the size of a, as pscan's backward makes
        for t in range(grad.size(1) - 2, -1, -1):
            grad[:, t] += shifted[:, t] * grad[:, t + 1]
        grad_a = torch.zeros_like(a_in)
        grad_a[:, 1:] = h.transpose(1, 2)[:, :-1] * grad[:, 1:]
        return grad_a, grad


class _ScanLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.u, self.out, self.drop = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The decay's last op (an add of a scalar) saves nothing: only the scan's ctx reads it.
        decay = torch.tanh(self.a(x)) * 0.4 + 0.5
        return x + self.drop(self.out(_Scan.apply(decay, torch.tanh(self.u(x)))))


class _ScanNet(nn.Module):
    def __init__(self, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(_ScanLayer() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()  # the loss inside the model, so its backward is profiled too


def _loss(loss: torch.Tensor) -> torch.Tensor:
    return loss


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


# What the tracker sees beyond the model (the loss scalar and its seed gradient), as a share of no
# remat (tests/test_torch_memory_gap.py).
TOLERANCE = 0.002


def test_scan_memory_as_predicted() -> None:
    model, x = _scan_setup()
    tg = compile_plan(model, (x,), {}, 1.0).tg
    torch.manual_seed(1)
    none = measure_step(model, (x,), loss_fn=_loss, count_flops=False).activation_bytes
    # No remat's figure, the budget's measure, is the step's within 1% and not above it (it
    # counted each unread clone of A to the end of the forward: over by 4%).
    assert 0.99 * none <= tg.baseline_bytes <= (1 + TOLERANCE) * none, (tg.baseline_bytes, none)
    for budget in (0.5, 0.7):
        rematted = remat_kit.auto(copy.deepcopy(model), budget)
        torch.manual_seed(1)
        measured = measure_step(rematted, (x,), loss_fn=_loss, count_flops=False).activation_bytes
        predicted = remat_kit.plan_of(rematted)[-1].predicted_activation_bytes
        assert measured <= budget * none
        # The prediction bounds the step (the scan's backward pad and temporaries were left out:
        # 0.679 measured at 0.669 predicted).
        assert measured <= predicted + TOLERANCE * none, (budget, measured / none, predicted / none)


class _Gather(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x.reshape(-1, D))
        perm = torch.arange(h.shape[0] - 1, -1, -1)
        return h[perm].pow(2).sum()


def test_backward_workspace_of_a_gather() -> None:
    from remat_kit._torch._trace import profile

    x = torch.randn(BATCH, SEQ, D)
    prof = profile(_Gather(), (x,), {}, fake=True)
    gather = next(v for v in prof.values if v.name.endswith("aten.index.0"))
    # index's backward: zeros the size of its input, and the gradient index_put makes of them.
    assert gather.bwd_workspace_bytes >= BATCH * SEQ * D * 4
    assert all(v.bwd_workspace_bytes == 0 for v in prof.values if v.name.endswith("aten.sum.0"))


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, p: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.probs_drop, self.drop = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        probs = self.probs_drop(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1))
        return self.drop(self.o((probs @ v).transpose(1, 2).reshape(b, t, d)))


class _ViTLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, p: float):
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), _Attention(d, heads, p)
        self.fc1, self.fc2, self.drop = nn.Linear(d, ffn), nn.Linear(ffn, d), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class _ViT(nn.Module):
    """Patch embedding, class token, position embedding and dropout, pre-LN layers, head on the
    class token, cross-entropy: transformers' ViTForImageClassification in small."""

    def __init__(
        self,
        layers: int = 4,
        d: int = 32,
        heads: int = 4,
        ffn: int = 64,
        image: int = 16,
        patch: int = 4,
        classes: int = 4,
        p: float = 0.1,
    ):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d))
        self.drop = nn.Dropout(p)
        self.layers = nn.ModuleList(_ViTLayer(d, heads, ffn, p) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = self.drop(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.head(self.ln(x)[:, 0]), labels)


def test_named_floor_is_met_when_passed_back() -> None:
    torch.manual_seed(0)
    model = _ViT().train()
    inputs = (torch.randn(2, 3, 16, 16), torch.tensor([1, 3]))
    torch.manual_seed(1)
    none = measure_step(model, inputs, loss_fn=lambda loss: loss, count_flops=False).activation_bytes
    with pytest.raises(remat_kit.InfeasibleBudgetError) as info:
        remat_kit.auto(copy.deepcopy(model), 0.1)(*inputs)
    named = math.ceil(info.value.smallest_fraction * 1000) / 1000  # as the message prints it
    assert f"smallest feasible budget {named:g} " in str(info.value)
    rematted = remat_kit.auto(copy.deepcopy(model), named)
    torch.manual_seed(1)
    measured = measure_step(rematted, inputs, loss_fn=lambda loss: loss, count_flops=False).activation_bytes
    assert measured <= named * none


def test_replay_scratch_is_not_sized_by_in_place_ops() -> None:
    # A skipped in-place op hands back its target, never a placeholder: its output does not size
    # the placeholders' shared buffer (mambapy's pscan: the last in-place multiply into the clone
    # of A, a (B, L, ED, N) slice, made Jamba's segment replay allocate 128KiB the model did not
    # count: 0.547 of no remat measured at 0.519 predicted).
    from torch.utils._pytree import tree_flatten

    from remat_kit._torch._replay import SKIP, Region, Step, _State

    def step(func: str, shape: tuple[int, ...], inplace: bool) -> Step:
        t = torch.empty(shape)
        spec = tree_flatten(t)[1]
        return Step(func, SKIP, (), (), False, inplace, spec, (("t", shape, t.stride(), t.dtype, t.device),))

    region = Region(
        "layer", "layer", (step("aten.mul.Tensor", (4, 4), False), step("aten.mul_.Tensor", (64, 64), True))
    )
    state = _State(region)
    state.begin_replay()
    placeholder = state.placeholder((4, 4), (4, 1), torch.float32, torch.device("cpu"), shared=True)
    assert placeholder.untyped_storage().nbytes() == 4 * 4 * 4


def _tiny_hf_llama():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=64
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


@pytest.mark.parametrize("when", ["before auto", "after auto"])
def test_hugging_face_gradient_checkpointing_is_refused_by_name(when: str) -> None:
    model = _tiny_hf_llama()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    if when == "before auto":
        model.gradient_checkpointing_enable()
        with pytest.raises(ValueError, match=r"gradient_checkpointing_disable\(\)") as caught:
            remat_kit.auto(model, 0.8)
    else:  # a Trainer turns it on after the user decorated the model: refused at planning
        with pytest.warns(UserWarning, match="use_cache"):
            remat_kit.auto(model, 0.8)
        model.gradient_checkpointing_enable()
        with pytest.raises(ValueError, match=r"gradient_checkpointing_disable\(\)") as caught:
            model(input_ids=ids, labels=ids).loss.backward()
    assert "`model.layers.0`" in str(caught.value)
    model.gradient_checkpointing_disable()  # what the error says to do: then it plans and runs
    if when == "before auto":
        with pytest.warns(UserWarning, match="use_cache"):
            remat_kit.auto(model, 0.8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert remat_kit.plan_of(model)


class _CheckpointsItsOwnLayer(nn.Module):
    def __init__(self, hooks: str) -> None:
        super().__init__()
        self.hooks = hooks
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i == 1 and self.hooks == "checkpoint":
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            elif i == 1 and self.hooks == "save_on_cpu":
                with torch.autograd.graph.save_on_cpu():
                    x = layer(x)
            else:
                x = layer(x)
        return x.square().mean()


@pytest.mark.parametrize("hooks", ["checkpoint", "save_on_cpu"])
def test_a_forward_that_installs_saved_tensor_hooks_is_refused(hooks: str) -> None:
    model = remat_kit.auto(_CheckpointsItsOwnLayer(hooks), 0.5)
    with pytest.raises(ValueError, match=r"saved-tensor hooks it installed itself") as caught:
        model(torch.randn(BATCH, D)).backward()
    assert "`layers.1" in str(caught.value)


def test_saved_tensor_hooks_around_the_whole_step_are_the_callers() -> None:
    # The user's own context around the step (not inside the model) is not the model's doing.
    model = remat_kit.auto(_CheckpointsItsOwnLayer("none"), 0.9)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        model(torch.randn(BATCH, D)).backward()
    assert remat_kit.plan_of(model)
