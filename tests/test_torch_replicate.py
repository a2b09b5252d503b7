"""Profiling a long stack of identical layers from four of them (remat_kit/_torch/_replicate.py).

The property: the profile written out from four layers is exactly the profile of the whole
forward (every op record, every value, every flag), and where it could not be (layers that
differ, code between layers, a forward that needs all its layers) no such profile is made or
the replay catches the difference and re-plans from the whole forward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import remat_kit
from benchmarks.models.hf_shapes import llama_7b_config
from remat_kit._torch._graph import candidate_layers
from remat_kit._torch._plan import compile_plan
from remat_kit._torch._replicate import MIN_LAYERS, profile_replicated
from remat_kit._torch._trace import profile
from tests.hf_tiny import tiny_gpt2, tiny_llama
from tests.torch_helpers import TinyGPT, grads, max_rel_err, tokens

transformers = pytest.importorskip("transformers")


def _full(model: nn.Module, args: tuple, kwargs: dict):
    return profile(model, args, kwargs, fake=True, layers=candidate_layers(model))


def _assert_same_profile(model: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
    kwargs = kwargs or {}
    model.train()
    rep = profile_replicated(model, args, kwargs)
    assert rep is not None and rep.replicated_from == 4
    full = _full(model, args, kwargs)
    assert len(rep.ops) == len(full.ops)
    for got, want in zip(rep.ops, full.ops):
        assert got == want
    assert rep.values == full.values
    assert rep.value_op == full.value_op
    assert rep.mutated_later == full.mutated_later
    assert rep.module_calls == full.module_calls


def _hf(name: str, layers: int):
    if name == "gpt2":
        return tiny_gpt2(layers, vocab=97, use_cache=False, bos_token_id=0, eos_token_id=0)
    if name == "llama":
        return tiny_llama(layers, vocab=97, use_cache=False)
    config = transformers.BertConfig(
        num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=97
    )
    return transformers.BertForMaskedLM(config)


def test_written_out_profile_equals_the_whole_forward_gpt():
    torch.manual_seed(0)
    _assert_same_profile(TinyGPT(layers=MIN_LAYERS + 2), tokens(seq=16))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_written_out_profile_equals_the_whole_forward_hugging_face(name):
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_profile(_hf(name, MIN_LAYERS), (), dict(input_ids=ids, labels=ids))


def test_written_out_profile_equals_the_whole_forward_encoder_and_sequential_root():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), num_layers=MIN_LAYERS, enable_nested_tensor=False
    )
    _assert_same_profile(enc, (torch.randn(2, 16, 32),))
    seq = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(0.1)) for _ in range(10)])
    _assert_same_profile(seq, (torch.randn(4, 32),))


class _Layer(nn.Module):
    def __init__(self, d: int, index: int, scale: float = 1.0, period: int = 0):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.layer_idx, self.scale, self.period = index, scale, period

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(torch.tanh(self.fc(x)), 0.1, self.training) * self.scale
        if self.period and self.layer_idx % self.period == self.period - 1:
            y = torch.sigmoid(y)  # an extra op in every period-th layer only
        return x + y


class _Stack(nn.Module):
    def __init__(self, n: int, d: int = 16, scales=None, period: int = 0, indexed: bool = False):
        super().__init__()
        scales = scales or [1.0] * n
        self.layers = nn.ModuleList(_Layer(d, i, scales[i], period) for i in range(n))
        self.n, self.indexed = n, indexed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.indexed:  # reads all its layers by a count fixed at construction
            for i in range(self.n):
                x = self.layers[i](x)
        else:
            for layer in self.layers:
                x = layer(x)
        return x.square().mean()


def test_a_layer_index_attribute_is_allowed_to_differ():
    _assert_same_profile(_Stack(12), (torch.randn(4, 16),))


@pytest.mark.parametrize(
    "stack",
    [
        _Stack(12, scales=[1.0 + i for i in range(12)]),  # a plain attribute differs between layers
        _Stack(12, period=2),  # every other layer runs another op: profiled layer 2 differs from 1
        _Stack(12, indexed=True),  # the forward cannot run with four layers
        _Stack(MIN_LAYERS - 1),  # too short to be worth it
    ],
    ids=["attribute", "period-2", "indexed", "short"],
)
def test_no_written_out_profile_where_it_would_not_hold(stack):
    assert profile_replicated(stack.train(), (torch.randn(4, 16),), {}) is None


def test_a_difference_deep_in_the_stack_is_caught_by_the_replay_and_replanned():
    # Every 4th layer differs (layer 3, 7, 11); the four profiled layers 0, 1, 2, 11 pass the
    # check, so the written-out profile is wrong for layers 3 and 7. The replay must refuse it
    # before applying a wrong op index, re-plan from the whole forward, and give exact gradients.
    torch.manual_seed(0)
    model = _Stack(12, period=4).train()
    x = torch.randn(4, 16)
    assert profile_replicated(model, (x,), {}) is not None
    want = grads(model, x)
    rematted = remat_kit.auto(_Stack(12, period=4).train(), budget=0.45)  # floor: 0.436
    rematted.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="differs from its profile; re-planning from the whole forward"):
        got = grads(rematted, x)
    assert max_rel_err(got, want) <= 1e-6
    (compiled,) = remat_kit._torch._api.state_of(rematted).plans.values()
    assert compiled.profile.replicated_from == 0 and compiled.profile.fake


def test_a_7b_shaped_llama_stack_is_planned_from_shapes():
    # Llama-7B shapes (d 4096, 32 layers, 32 heads, MLP 11008) at seq 4096 on the meta device:
    # nothing is allocated; four layers are profiled and the plan covers all 32.
    cfg = llama_7b_config()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.zeros(1, 4096, dtype=torch.long, device="meta")
    compiled = compile_plan(model, (), dict(input_ids=ids, labels=ids), 0.5)
    assert compiled.profile.replicated_from == 4
    layers = [s for s in compiled.tg.segments if s.module is not None]
    assert [s.module for s in layers] == [f"model.layers.{i}" for i in range(32)]
    assert compiled.plan.activation_fraction <= 0.5
    # Every layer keeps the same bytes without remat: one q/k/v/o projection output alone is
    # s * d * 4 bytes (fp32 parameters on meta), and each layer holds at least four of them.
    g = compiled.tg.graph
    per_layer = [sum(g[v.name].num_bytes for v in g.values if v.block == k and v.is_activation) for k in range(1, 33)]
    assert len(set(per_layer[1:-1])) == 1 and per_layer[1] >= 4 * 4096 * 4096 * 4


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_auto_on_a_long_hugging_face_stack_plans_from_four_layers_with_exact_gradients(name):
    # The code before the layers runs on real tensors while profiling, so Hugging Face's mask
    # logic (which builds a mask when it sees a fake tensor, and skips it for an all-ones padding
    # mask on real ones) takes the real step's path: the fake profile is the one applied, with no
    # re-planning from a real forward.
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = _hf(name, MIN_LAYERS).train()
        if hasattr(model.config, "attention_probs_dropout_prob"):
            model.config.attention_probs_dropout_prob = 0.0
        torch.manual_seed(1)
        want = [p.grad for p in _step(model, ids)]
        rematted = remat_kit.auto(_hf(name, MIN_LAYERS).train(), budget=0.4)
        rematted.load_state_dict(model.state_dict())
        torch.manual_seed(1)
        got = [p.grad for p in _step(rematted, ids)]
    assert max_rel_err(got, want) <= 1e-6
    (plan,) = remat_kit.plan_of(rematted)
    (compiled,) = remat_kit._torch._api.state_of(rematted).plans.values()
    assert compiled.profile.replicated_from == 4 and plan.num_recomputed_ops > 0
    assert compiled.profile.fake and compiled.profile.real_prologue
    assert not [w for w in seen if "re-planning" in str(w.message)]


def _step(model: nn.Module, ids: torch.Tensor) -> list[nn.Parameter]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return [p for p in model.parameters() if p.grad is not None]
