"""torch.compile of an `auto` model: planned layers compile as selective-checkpoint regions.

Before issue 12 every planned layer was a graph break running the eager replay (nanoGPT at
auto(0.5): 7 graph breaks). Each test compares against compiled no remat on the same seed, so
dropout draws are compared too (the partitioner must recompute a dropout from the generator
state the forward saved; torch's own activation_memory_budget does not: pytorch#190758).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from hf_tiny import tiny_gpt2, tiny_llama
from torch._dynamo.utils import counters

import remat_kit
from benchmarks.compile_bench import graph_breaks, saved_bytes
from benchmarks.models.torch_gpt import GPT
from remat_kit._torch import _compiled
from remat_kit._torch._modecost import ModeCost


@pytest.fixture(autouse=True)
def _selective_plans(monkeypatch):
    # These tests map selective plans onto compiled regions: price the eager replay modes at
    # nothing, so auto keeps the solver's selective plan (on these small layers the modes' per-op
    # cost would make it pick whole layers, which compile as plain checkpoints).
    monkeypatch.setattr("remat_kit._torch._layerplan.mode_cost", lambda *args, **kwargs: ModeCost())


def _gpt() -> tuple[torch.nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = GPT(layers=4, d=32, heads=2, vocab=64, seq=64)
    idx = torch.randint(0, 64, (2, 64))
    return model, (idx, torch.roll(idx, -1, 1)), {}


def _hf(name: str) -> tuple[torch.nn.Module, tuple, dict]:
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        model = tiny_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    else:
        model = tiny_llama(max_position_embeddings=64, attention_dropout=0.1)
    model.loss_type = "ForCausalLM"  # GPT-2 has none: HF logs a warning, a graph break of its own
    idx = torch.randint(0, 64, (2, 64))
    return model, (), {"input_ids": idx, "labels": idx}


def _selective(model, args, kwargs, save_kinds=("matmul", "rng")):
    """`auto(model, 0.7)` with its plan replaced by a selective one (keep matmul outputs and
    dropout masks, recompute the rest of every layer), so the policy path is exercised whatever
    the planner prefers for this model."""
    from remat_kit._core.plan import Decision, Plan
    from remat_kit._torch._api import state_of
    from remat_kit._torch._replay import decisions_for_torch, regions
    from remat_kit._torch._run import install_blocks

    remat_kit.auto(model, 0.7)
    _loss(model(*args, **kwargs)).backward()
    model.zero_grad(set_to_none=True)
    state = state_of(model)
    ((key, planned),) = state.plans.items()
    tg, prof, g = planned.tg, planned.profile, planned.tg.graph
    layers = {s.module for s in tg.segments if s.module}
    wanted = {}
    for i in g.free_values:
        v = g.values[i]
        if v.name not in tg.pinned and any(v.module == m or v.module.startswith(m + ".") for m in layers):
            wanted[v.name] = Decision.SAVE if str(v.kind.value) in save_kinds else Decision.RECOMPUTE
    plan = Plan.from_decisions(g, decisions_for_torch(tg, Plan.from_decisions(g, wanted), prof))
    regs = regions(tg, plan, prof)
    assert any(s.action == "cache" for r in regs.values() for s in r.steps)
    state.plans[key] = dataclasses.replace(planned, plan=plan, regions=regs)
    install_blocks(model, state, state.plans[key])
    return regs


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def _run(model, args, kwargs, budget, backend):
    """(graph breaks of the first compiled step, gradients of the second, saved bytes of a third);
    budget "selective": see _selective."""
    if budget == "selective":
        _selective(model, args, kwargs)
    elif budget is not None:
        remat_kit.auto(model, budget)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)

    def step():
        model.zero_grad(set_to_none=True)
        _loss(compiled(*args, **kwargs)).backward()

    torch.manual_seed(1)
    graphs = counters["stats"]["unique_graphs"]
    breaks = graph_breaks(step)
    # One graph for the whole forward: a plan dynamo skipped (a region run eagerly, planning
    # traced) shows as graphs even where no break is counted.
    assert counters["stats"]["unique_graphs"] - graphs == 1
    torch.manual_seed(2)
    step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    inputs = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    torch.manual_seed(3)
    saved = saved_bytes(lambda: _loss(compiled(*args, **kwargs)), list(model.parameters()) + inputs)
    return breaks, grads, saved


def _check(make, budget, backend="aot_eager"):
    model, args, kwargs = make()
    model.train()
    _, ref, ref_saved = _run(copy.deepcopy(model), args, kwargs, None, backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="remat_kit: layer")  # no region may fall back to eager
        breaks, grads, saved = _run(model, args, kwargs, budget, backend)
    assert breaks == 0
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    if budget != "selective":
        assert saved <= budget * ref_saved, (saved, ref_saved)
    return saved / ref_saved


@pytest.mark.parametrize("budget", [0.5])
def test_gpt_compiles_without_graph_breaks(budget):
    """Fails before issue 12: 7 graph breaks (the plan, an RNG read, one per planned layer)."""
    ratio = _check(_gpt, budget)
    assert ratio < 1.0  # the plan is applied: the compiled step saves less than compiled none


def test_selective_plan_compiles_as_tagged_regions():
    """A plan that keeps values inside a layer runs as selective checkpoint: no graph break,
    compiled no remat's gradients (dropout included), and MUST_SAVE where the plan keeps."""
    ratio = _check(_gpt, "selective")
    assert 0 < ratio < 1.0
    tags = [t for p in _compiled._POLICIES.values() if p.tags for t in p.tags]
    assert _compiled.SAVE in tags and _compiled.RECOMPUTE in tags


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_models_compile_without_graph_breaks(name):
    _check(lambda: _hf(name), 0.6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_selective_plans_compile_as_tagged_regions(name):
    """Hugging Face's own layer code (attention dropout, rotary embeddings, GQA) under a plan that
    keeps matmul outputs and dropout masks inside each layer: one graph, no break, the draws and
    gradients of compiled no remat, MUST_SAVE where the plan keeps."""
    _compiled._POLICIES.clear()
    ratio = _check(lambda: _hf(name), "selective")
    assert 0 < ratio < 1.0
    tags = [t for p in _compiled._POLICIES.values() if p.tags for t in p.tags]
    assert _compiled.SAVE in tags and _compiled.RECOMPUTE in tags


@pytest.mark.slow
def test_gpt_inductor_dropout_exact():
    """Inductor replaces dropout's RNG with seeded kernels; the recomputed draws must match."""
    import torch._inductor.config as inductor_config

    def tiny():
        torch.manual_seed(0)
        model = GPT(layers=2, d=16, heads=2, vocab=32, seq=32)
        idx = torch.randint(0, 32, (2, 32))
        return model, (idx, torch.roll(idx, -1, 1)), {}

    # No worker pool to start for tiny kernels. `patch`, not monkeypatch: monkeypatch's undo
    # deletes a config module's attribute, which then no longer exists for later tests.
    with inductor_config.patch(compile_threads=1):
        _check(tiny, 0.7, backend="inductor")


def test_eager_backend_runs_the_eager_replay():
    """backend="eager" runs the captured region on real tensors: the exact replay modes apply."""
    model, args, kwargs = _gpt()
    _, ref, _ = _run(copy.deepcopy(model), args, kwargs, None, "eager")
    breaks, grads, _ = _run(model, args, kwargs, 0.5, "eager")
    assert breaks == 0
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_unmappable_region_falls_back_to_eager_with_a_warning(monkeypatch):
    """A plan the compiled trace cannot express is not changed: the layer runs eagerly (a graph
    break), named in a warning, with the same gradients."""
    model, args, kwargs = _gpt()
    _, ref, _ = _run(copy.deepcopy(model), args, kwargs, None, "aot_eager")
    monkeypatch.setattr(_compiled, "align", lambda steps, names: (None, "a test says so"))
    _selective(model, args, kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match=r"layer `h\.\d` runs eagerly under torch.compile.*a test says so"):
        compiled(*args).backward()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    breaks = graph_breaks(lambda: compiled(*args).backward())
    assert breaks > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-6, msg=name)


class _Step:
    def __init__(self, func, action, cache=(), leaves=1, offload=()):
        self.func, self.action, self.cache, self.offload, self.inplace = func, action, cache, offload, False
        self.out_leaves = tuple(("t", (2,), (1,), torch.float32, torch.device("cpu")) for _ in range(leaves))


def test_align_dropout_and_views():
    """Eager dropout (empty_like, bernoulli_, div_, mul) is one native_dropout when traced;
    _unsafe_view is view. Kept values take MUST_SAVE, the rest MUST_RECOMPUTE."""
    S, R = _compiled.SAVE, _compiled.RECOMPUTE
    steps = [
        _Step("aten.addmm.default", "cache", (0,)),
        _Step("aten._unsafe_view.default", "run"),
        _Step("aten.empty_like.default", "skip"),
        _Step("aten.bernoulli_.float", "cache", (0,)),
        _Step("aten.div_.Scalar", "cache", (0,)),
        _Step("aten.mul.Tensor", "run"),
        _Step("aten.native_layer_norm.default", "cache", (1, 2), leaves=3),
        _Step("aten.add.Tensor", "skip"),
    ]
    names = [
        "aten.addmm.default",
        "aten.view.default",
        "aten.native_dropout.default",
        "aten.native_layer_norm.default",
        "aten.add.Tensor",
    ]
    tags, why = _compiled.align(tuple(steps), names)
    # the mask is kept but the output recomputed: the dropout is recomputed from its saved RNG
    # state; layer norm keeps only its statistics: recomputed from its input
    assert tags == [S, R, R, R, R], why
    steps[5] = _Step("aten.mul.Tensor", "cache", (0,))
    assert _compiled.align(tuple(steps), names)[0][2] == S
    # a value kept whole under another name: its last traced op is saved, the rest recomputed
    steps = [
        _Step("aten.addmm.default", "run"),
        _Step("aten.gelu.default", "cache", (0,)),
        _Step("aten.add.Tensor", "skip"),
    ]
    traced = ["aten.addmm.default", "aten.mul.Scalar", "aten.erf.default", "aten.add.Tensor"]
    assert _compiled.align(tuple(steps), traced)[0] == [R, R, S, R]
    # kept beside recomputed values of a run with no counterpart and no RNG to regenerate them
    steps.insert(2, _Step("aten.tanh.default", "run"))
    tags, why = _compiled.align(tuple(steps), traced)
    assert tags is None and "aten.gelu.default" in why
    # kept eager ops the traced region does not run (a mask dynamo builds outside it): nothing to tag
    steps = [_Step("aten.tril.default", "cache", (0,)), _Step("aten.addmm.default", "cache", (0,))]
    assert _compiled.align(tuple(steps), ["aten.addmm.default"])[0] == [S]
    # offloaded: compiled code has no host copy
    steps = [_Step("aten.addmm.default", "run"), _Step("aten.gelu.default", "cache", (0,), offload=(0,))]
    assert _compiled.align(tuple(steps), ["aten.addmm.default", "aten.gelu.default"])[0] is None


def test_peak_rss_bytes_sees_a_step_allocation():
    """compile_bench's compiled peak: the rise of the resident set over a step (to within the
    kernel's batched RSS counters, up to hundreds of pages), even after steps ran under glibc's defaults
    (freed heap blocks stay resident there)."""
    from benchmarks.compile_bench import peak_rss_bytes

    for _ in range(3):  # under glibc's defaults: a freed 8 MiB block may stay in the heap
        torch.ones(2**21).sum()
    nbytes = 8 * 2**20

    def step():
        x = torch.ones(nbytes // 4)  # touched: resident
        del x

    rises = [peak_rss_bytes(step) for _ in range(3)]
    # Within 1 MiB: the kernel's RSS counters are batched per CPU (a CI run read 8 MiB - 392 KiB).
    assert all(nbytes - 2**20 <= r < nbytes + 2**20 for r in rises), rises
    assert peak_rss_bytes(lambda: None) < 2**20


_FAULTS_SCRIPT = """
import resource, sys, torch
from benchmarks import compile_bench
def faults(n=20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(2**20).sum()  # a 4 MiB block, allocated, touched and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
compile_bench.exact_rss(); faults(2); exact = faults()
compile_bench.steady_heap(); faults(2); steady = faults()
compile_bench.peak_rss_bytes(lambda: None)  # the peak's own reading puts exact_rss's thresholds back
again = faults()
print(exact, steady, again)
"""


def test_compile_bench_times_steps_without_a_fresh_mapping_per_buffer():
    """Regression (session 15): compile_bench timed every step under `exact_rss`'s 16 KiB mmap
    threshold, so each buffer a step allocated was a fresh mapping whose pages all faulted in,
    and compiled `auto` (its frames reuse no buffer) paid 1.3x where it steps at checkpoint's
    time. Steps are now timed under `steady_heap`: a freed 4 MiB block is served again from the
    heap. Counted in page faults in a process of its own (the thresholds are process-wide)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    exact, steady, again = map(int, out.stdout.split()[-3:])
    pages = 20 * (4 * 2**20) // 4096  # every page of every block, faulted in afresh
    assert exact >= pages // 2 and again >= pages // 2, (exact, again)
    assert steady < pages // 4, steady  # at most a block or two faulted in (a run read 1,024 pages)


def test_report_sections_replace_their_own_shape_only(tmp_path):
    from benchmarks._compile_report import write_section

    out = tmp_path / "compile.md"
    write_section(str(out), "4x128", ["small, first"])
    write_section(str(out), "6x256", ["large"])
    out.write_text(out.read_text() + "\nwritten by hand\n")
    write_section(str(out), "4x128", ["small, again"])
    text = out.read_text()
    assert "small, again" in text and "large" in text and "written by hand" in text and "small, first" not in text
    assert text.index("small, again") < text.index("large")


def test_peak_sets_gradients_to_none_and_counts_them_once():
    """compile_bench's peak: gradients set to None before the measured step (as
    `zero_grad(set_to_none=True)` leaves them), so the peak less the parameters' gradient bytes is the
    step's activations; tied weights' gradient counted once."""
    from benchmarks.compile_bench import _peak, grad_bytes

    model = torch.nn.Linear(1024, 2048, bias=False)  # an 8 MiB gradient, a few KiB of activations
    x = torch.ones(2, 1024)
    entered_with_grads = []

    def step(set_to_none: bool = True):
        entered_with_grads.append(any(p.grad is not None for p in model.parameters()))
        model.zero_grad(set_to_none=set_to_none)
        model(x).square().sum().backward()

    step.model = model
    peak = _peak(step)
    assert entered_with_grads[-1] is False
    assert grad_bytes(model) == 8 * 2**20
    assert -(2**18) <= peak - grad_bytes(model) < 2**20, peak

    tied = torch.nn.Module()
    tied.a = torch.nn.Linear(4, 4, bias=False)
    tied.b = torch.nn.Linear(4, 4, bias=False)
    tied.b.weight = tied.a.weight
    assert grad_bytes(tied) == 4 * 4 * 4


def test_budget_verdict_by_the_peak_bounds():
    from benchmarks._compile_report import against_budget

    def cell(lower, upper):
        return {"auto_budget": 0.5, "budget_bytes": 100, "peak_less_grads": lower, "peak_bytes": upper, "grad_bytes": 0}

    lines = against_budget({"held": cell(50, 90), "open": cell(90, 150), "over": cell(120, 150)})
    assert "held" in lines[2] and "held (even with gradients)" in lines[2]
    assert "not decided" in lines[3]
    assert "over the budget" in lines[4]


@pytest.mark.parametrize("budget", [0.5, "selective"])
def test_compiled_regions_partition_without_cse(monkeypatch, budget):
    """AOTAutograd's CSE merged the same constant built in every layer into the first region's
    node, which the partitioner then saved; Inductor fused each layer's backward with the previous
    layer's recompute through it: a compiled auto(0.2721) held 13.6 MB against a 10.5 MB budget
    (reports/torch/compile.md). A compile of frames holding regions partitions without CSE, and
    sets it (and the other region settings) back afterwards."""
    import torch._functorch.config as functorch_config
    import torch._functorch.partitioners as partitioners
    import torch._inductor.config as inductor_config

    calls = []
    real = partitioners.fx_graph_cse
    monkeypatch.setattr(partitioners, "fx_graph_cse", lambda graph: calls.append(1) or real(graph))
    model, args, kwargs = _gpt()
    _run(model, args, kwargs, budget, "aot_eager")
    assert calls == []
    assert functorch_config.cse is True  # set back for other compiles
    assert functorch_config.force_non_lazy_backward_lowering is False
    assert inductor_config.score_fusion_memory_threshold == 10
    assert inductor_config.allow_buffer_reuse is True
    plain, args, kwargs = _gpt()  # a compile without regions keeps torch's default
    _run(plain, args, kwargs, None, "aot_eager")
    assert calls
