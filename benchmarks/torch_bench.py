"""PyTorch benchmark: remat_kit.auto against the peers, measured in one process run.

Model: the GPT-2-like decoder of benchmarks/models/torch_gpt.py (nanoGPT layout; default 6 layers,
d 512, 8 heads, seq 512, dropout 0.1, vocab 8192 so the head does not dominate), batch 1, fp32, on
CPU (or the GPU if there is one).
For each strategy one training step is measured: activation memory by the live-storage tracker
(remat_kit.measure.torch_step; on a GPU also torch.cuda.max_memory_allocated), FLOPs by
FlopCounterMode (recompute included), gradients against no remat (same seed, same dropout masks).
Then every strategy is timed interleaved with no remat in this process: `--repeats` steps, each
right after a step of none, ratio of medians (wall and process CPU time).

Strategies: none; full (torch.utils.checkpoint on every layer); sqrt(n) (checkpoint_sequential);
Megatron selective (the attention core checkpointed); Hugging Face-style (the same
model as a transformers GPT2LMHeadModel with gradient_checkpointing_enable(), measured against its
own no-remat run); torchtitan-style selective op save list (mm / sdpa saved, every layer);
torch.compile with activation_memory_budget (aot_eager, FLOPs and gradients only: its memory is
the compiled graph's); remat_kit.auto at budgets 0.3 / 0.5 / 0.7. Also the planning time of a
48-layer config and of HF GPT-2 XL / Llama-7B shapes (profile + solve, from shapes under FakeTensorMode).

    python -m benchmarks.torch_bench            # default run, a few minutes on 2 CPU cores
    python -m benchmarks.torch_bench --layers 2 --seq 128   # smoke run

Writes reports/torch/bench.json and reports/torch/bench.md (with the command that produced them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import types
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import remat_kit
from benchmarks.models.hf_shapes import gpt2_xl_config, llama_7b_config
from benchmarks.models.torch_gpt import GPT, Block, add_shape_args
from remat_kit.measure import format_bytes, rel_err, torch_plan, torch_profile, torch_step


# -- peers ------------------------------------------------------------------------------------
class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module, context_fn=None):
        super().__init__()
        self.inner, self.context_fn = inner, context_fn

    def forward(self, x):
        kw = {"context_fn": self.context_fn} if self.context_fn is not None else {}
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False, **kw)


def full_checkpoint(model: GPT) -> GPT:
    m = copy.deepcopy(model)
    m.h = nn.ModuleList(_Checkpointed(b) for b in m.h)
    return m


def torchtitan_selective(model: GPT) -> GPT:
    """torchtitan's op-level SAC: save matmul and attention outputs, recompute the rest
    (torchtitan/distributed/activation_checkpoint.py `_save_list`; its every-other-mm rule left out)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    save = [
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
    ]
    m = copy.deepcopy(model)
    m.h = nn.ModuleList(_Checkpointed(b, functools.partial(create_selective_checkpoint_contexts, save)) for b in m.h)
    return m


def _megatron_forward(self: Block, x: torch.Tensor) -> torch.Tensor:
    """Block.forward with the attention core checkpointed (Korthikanti et al. 2022: keep q, k, v,
    recompute the scores, softmax and attention dropout; preserve_rng_state replays its mask)."""
    b, t, c = x.shape
    q, k, v = self.attn(self.ln1(x)).split(c, dim=2)
    q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
    a = torch.utils.checkpoint.checkpoint(
        F.scaled_dot_product_attention,
        q,
        k,
        v,
        use_reentrant=False,
        is_causal=True,
        dropout_p=self.p if self.training else 0.0,
    )
    x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
    return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


def megatron_selective(model: GPT) -> GPT:
    m = copy.deepcopy(model)
    for block in m.h:
        block.forward = types.MethodType(_megatron_forward, block)
    return m


class _Sequential(nn.Module):
    def __init__(self, blocks: nn.ModuleList, segments: int):
        super().__init__()
        self.blocks, self.segments = blocks, segments

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint_sequential(self.blocks, self.segments, x, use_reentrant=False)


def sqrt_n(model: GPT) -> GPT:
    """checkpoint_sequential with round(sqrt(n)) segments (the last one runs without checkpoint)."""
    m = copy.deepcopy(model)
    m.h = nn.ModuleList([_Sequential(m.h, max(1, round(math.sqrt(len(m.h)))))])
    return m


def step_grads(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    model(*args).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _step(model: nn.Module, args: tuple) -> tuple[float, float]:
    """(wall, process CPU) seconds of one training step."""
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    model(*args).backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_ratios(
    none: nn.Module, others: dict[str, nn.Module], args: tuple, repeats: int, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Each strategy's median step time over `repeats` steps, each step right after a step of
    `none` (same process, same inputs), as ratios to those `none` steps' median: a busy machine
    slows both sides of a pair alike, so `none` is never slower by accident. Wall and process
    CPU time (on a shared CPU the CPU time is the steadier of the two)."""
    for m in (none, *others.values()):
        for _ in range(warmup):
            _step(m, args)
    out = {}
    for name, model in others.items():
        base, mine = [], []
        for _ in range(repeats):
            base.append(_step(none, args))
            mine.append(_step(model, args))
        med = {k: statistics.median(t[k] for t in base) for k in (0, 1)}
        own = {k: statistics.median(t[k] for t in mine) for k in (0, 1)}
        out[name] = dict(
            seconds=own[0],
            none_seconds=med[0],
            time_ratio=own[0] / med[0],
            cpu_seconds=own[1],
            cpu_ratio=own[1] / med[1],
        )
        print(f"  time {name:34s} x{out[name]['time_ratio']:.3f} wall, x{out[name]['cpu_ratio']:.3f} cpu", flush=True)
    return out


def measure(name: str, model: nn.Module, args: tuple, reference: list[torch.Tensor], extra: dict | None = None) -> dict:
    # One step measures memory and leaves the gradients (seed 1: the reference's dropout masks);
    # a second counts FLOPs. Time is measured afterwards, interleaved with none (interleaved_ratios).
    torch.manual_seed(1)
    mem = torch_step(model, args, loss_fn=lambda loss: loss, count_flops=False)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    model.zero_grad(set_to_none=True)
    with counter:
        model(*args).backward()
    m = dataclasses.replace(mem, flops=counter.get_total_flops())
    row = dict(
        strategy=name,
        activation_bytes=m.activation_bytes,
        flops=m.flops,
        cuda_peak_bytes=m.cuda_peak_bytes,
        grad_rel_err=rel_err(grads, reference),
    )
    row.update(extra or {})
    print(
        f"  {name:28s} act {format_bytes(m.activation_bytes):>10s}  GFLOP {m.flops / 1e9:8.2f}  "
        f"grad err {row['grad_rel_err']:.1e}",
        flush=True,
    )
    return row


def compile_budget_row(model: GPT, args: tuple, reference: list[torch.Tensor], budget: float) -> dict:
    """torch.compile's activation_memory_budget (aot_eager so it is quick on CPU): FLOPs and grads."""
    import torch._functorch.config as fconfig
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    with fconfig.patch(activation_memory_budget=budget):
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="aot_eager")
        grads = step_grads(compiled, args)
        counter = FlopCounterMode(display=False)
        with counter:
            torch.manual_seed(1)
            compiled(*args).backward()
    return dict(
        strategy=f"torch.compile budget {budget}",
        activation_bytes=None,
        flops=counter.get_total_flops(),
        cuda_peak_bytes=None,
        grad_rel_err=rel_err(grads, reference),
        seconds=None,
    )


def hf_rows(layers: int, d: int, heads: int, seq: int, vocab: int, repeats: int, budgets: list[float]) -> list[dict]:
    try:
        import transformers
    except ImportError:
        return []
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=layers, n_embd=d, n_head=heads, n_positions=seq, vocab_size=vocab, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    idx = torch.randint(0, vocab, (1, seq))

    class Loss(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids, labels=ids).loss

    plain = Loss(model)
    reference = step_grads(plain, (idx,))
    none = measure("HF GPT-2: none", plain, (idx,), reference)
    ck = copy.deepcopy(model)
    ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    models = {"HF GPT-2: gradient_checkpointing": Loss(ck)}
    rows = [
        none,
        measure("HF GPT-2: gradient_checkpointing", models["HF GPT-2: gradient_checkpointing"], (idx,), reference),
    ]
    for budget in budgets:
        name = f"HF GPT-2: remat_kit {budget}"
        auto = Loss(remat_kit.auto(copy.deepcopy(model), budget))
        try:
            step_grads(auto, (idx,))  # plans on this first call (kept out of the measured step)
        except ValueError as e:
            rows.append(dict(strategy=name, error=str(e)[:300]))
            continue
        rows.append(measure(name, auto, (idx,), reference))
        models[name] = auto
    times = interleaved_ratios(plain, models, (idx,), repeats)
    none.update(time_ratio=1.0, cpu_ratio=1.0)
    for r in rows:
        if "error" in r:
            continue
        r["fraction_of_none"] = r["activation_bytes"] / none["activation_bytes"]
        r["extra_flops"] = r["flops"] - none["flops"]
        r.update(times.get(r["strategy"], {}))
    return rows


def _planning_models(layers: int, d: int, heads: int, seq: int, vocab: int) -> list[tuple[str, Any, tuple, dict]]:
    """(name, model on the meta device, args, kwargs): nothing is allocated, shapes only."""
    with torch.device("meta"):
        idx = torch.zeros(1, seq, dtype=torch.long)
        found = [
            (f"GPT {layers} layers, d {d}, seq {seq}", GPT(layers, d, heads, vocab, seq=seq).train(), (idx, idx), {})
        ]
    try:
        import transformers
    except ImportError:
        return found
    with torch.device("meta"):
        xl = transformers.GPT2LMHeadModel(gpt2_xl_config()).train()
        ids = torch.zeros(1, 1024, dtype=torch.long)
        found.append(("HF GPT-2 XL shapes (48 layers, d 1600, seq 1024)", xl, (), dict(input_ids=ids, labels=ids)))
        llama = transformers.LlamaForCausalLM(llama_7b_config()).train()
        ids = torch.zeros(1, 4096, dtype=torch.long)
        found.append(("HF Llama-7B shapes (32 layers, d 4096, seq 4096)", llama, (), dict(input_ids=ids, labels=ids)))
    return found


def planning_time(layers: int, d: int, heads: int, seq: int, vocab: int, repeats: int = 3) -> list[dict]:
    """Median seconds to plan (profile + solve) at budget 0.5, from four profiled layers (what auto
    does) and from a profile of every op (what it did before), on models built on the meta device."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model, args, kwargs in _planning_models(layers, d, heads, seq, vocab):
            row: dict[str, Any] = dict(model=name)
            for mode in ("replicate", "fake"):
                times, profile_times = [], []
                for _ in range(repeats):
                    start = time.perf_counter()
                    planned = torch_plan(model, args, kwargs, budget=0.5, profile=mode)
                    times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    torch_profile(model, args, kwargs, profile=mode)
                    profile_times.append(time.perf_counter() - start)
                row[f"{mode}_seconds"] = statistics.median(times)
                row[f"{mode}_profile_seconds"] = statistics.median(profile_times)
                row[f"{mode}_fraction"] = planned.plan.activation_fraction
                row[f"{mode}_replicated_from"] = planned.replicated_from
            row.update(
                num_ops=planned.num_ops,
                num_values=planned.num_values,
                same_plan=row["replicate_fraction"] == row["fake_fraction"],
            )
            print(
                f"  planning {name}: {row['replicate_seconds']:.2f} s from 4 layers, {row['fake_seconds']:.2f} s "
                f"from every op ({row['num_ops']} ops)",
                flush=True,
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap, layers=6, d=512, heads=8, seq=512, vocab=8192)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per strategy, each after a step of none")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: all cores)")
    ap.add_argument("--skip-planning", action="store_true", help="leave out the planning-time table")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    ap.add_argument("--compile-budgets", type=float, nargs="*", default=[0.5])
    ap.add_argument("--plan-layers", type=int, default=48)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="reports/torch")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads if args.threads > 0 else max(1, os.cpu_count() or 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT(args.layers, args.d, args.heads, args.vocab, seq=args.seq).to(device).train()
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randint(0, args.vocab, (1, args.seq), generator=g).to(device) for _ in range(2))
    print(f"GPT-2-like: {args.layers} layers, d {args.d}, seq {args.seq}, vocab {args.vocab}, on {device}", flush=True)
    reference = step_grads(model, inputs)
    rows = [measure("none", model, inputs, reference)]
    peers = {
        "full (every layer)": full_checkpoint(model),
        "sqrt(n) (checkpoint_sequential)": sqrt_n(model),
        "Megatron selective (attention core)": megatron_selective(model),
        "torchtitan op save list": torchtitan_selective(model),
    }
    for name, m in peers.items():
        rows.append(measure(name, m, inputs, reference))
    for b in args.budgets:
        m = remat_kit.auto(copy.deepcopy(model), b)
        start = time.perf_counter()
        try:
            step_grads(m, inputs)  # plans on this first call
        except ValueError as e:  # an infeasible budget for this config: say so in the report
            rows.append(dict(strategy=f"remat_kit auto {b}", error=str(e)[:300]))
            continue
        plan_seconds = time.perf_counter() - start
        (plan,) = remat_kit.plan_of(m)
        rows.append(
            measure(
                f"remat_kit auto {b}",
                m,
                inputs,
                reference,
                dict(
                    budget=b,
                    plan_solver=plan.solver,
                    predicted_activation_bytes=plan.predicted_activation_bytes,
                    predicted_recompute_flops=plan.predicted_recompute_flops,
                    predicted_recompute_seconds=plan.predicted_recompute_seconds,
                    predicted_extra_step_seconds=plan.predicted_extra_step_seconds,
                    first_step_seconds=plan_seconds,
                ),
            )
        )
        peers[f"remat_kit auto {b}"] = m
    times = interleaved_ratios(model, peers, inputs, args.repeats)
    for b in args.compile_budgets:
        try:
            rows.append(compile_budget_row(model, inputs, reference, b))
        except Exception as e:  # report, do not hide, a peer that fails
            rows.append(dict(strategy=f"torch.compile budget {b}", error=f"{type(e).__name__}: {e}"[:300]))
    none = rows[0]
    none.update(time_ratio=1.0, cpu_ratio=1.0)
    for r in rows:
        if r.get("flops") is not None:
            r["extra_flops"] = r["flops"] - none["flops"]
        if r.get("activation_bytes") is not None:
            r["fraction_of_none"] = r["activation_bytes"] / none["activation_bytes"]
        r.update(times.get(r["strategy"], {}))
    hf = (
        []
        if args.skip_hf
        else hf_rows(args.layers, args.d, args.heads, args.seq, args.vocab, args.repeats, args.budgets)
    )
    plan = [] if args.skip_planning else planning_time(args.plan_layers, args.d, args.heads, args.seq, args.vocab)
    result = dict(
        command="python -m benchmarks.torch_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        device=device,
        torch=torch.__version__,
        config=vars(args),
        rows=rows,
        hf_rows=hf,
        planning=plan,
    )
    write(result, args.out)
    return result


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "bytes":
        return format_bytes(v)
    if kind == "frac":
        return f"{v:.3f}"
    if kind == "gflop":
        return f"{v / 1e9:.3f}"
    if kind == "ms":
        return f"{v * 1e3:.1f} ms"
    if kind == "err":
        return f"{v:.1e}"
    return str(v)


def write(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    cols = [
        ("strategy", "str"),
        ("activation_bytes", "bytes"),
        ("fraction_of_none", "frac"),
        ("predicted_activation_bytes", "bytes"),
        ("extra_flops", "gflop"),
        ("predicted_recompute_flops", "gflop"),
        ("predicted_recompute_seconds", "ms"),
        ("predicted_extra_step_seconds", "ms"),
        ("grad_rel_err", "err"),
        ("time_ratio", "frac"),
        ("cpu_ratio", "frac"),
        ("plan_solver", "str"),
    ]
    lines = [
        f"# remat_kit PyTorch benchmark ({result['device']}, torch {result['torch']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Config: {result['config']}",
        "",
        "Activation memory: live-storage tracker peak (CPU). Extra FLOPs: FlopCounterMode, forward+backward "
        "minus no remat. Gradients: max relative error against no remat, same seed (same dropout masks). "
        f"time_ratio / cpu_ratio: median wall / process-CPU time of {result['config']['repeats']} steps, "
        "each step taken right after a step of no remat in the same process, over those no-remat steps' "
        "median (`interleaved_ratios`); CPU time is the steadier figure on a shared machine. "
        "predicted_recompute_seconds: the plan's predicted recompute time on the calibrated device; "
        "predicted_extra_step_seconds: that and the replay modes' forward, the step time over no remat the "
        "plan is predicted to add (reports/step_time_model.md). "
        "plan_solver `whole layers`: auto chose layers kept or recomputed whole (plain checkpoint, no "
        "dispatch mode) over the solver's selective plan, predicted faster once the replay modes' per-op "
        "cost is counted (remat_kit/_torch/_layerplan.py).",
        "",
        "| " + " | ".join(c for c, _ in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in result["rows"] + result["hf_rows"]:
        if "error" in r:
            lines.append(f"| {r['strategy']} | error: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        lines.append("| " + " | ".join(_fmt(r.get(c), k) for c, k in cols) + " |")
    if not result["planning"]:
        with open(os.path.join(out, "bench.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return
    lines += [
        "",
        "## Planning time",
        "",
        "Profile under FakeTensorMode + solve at budget 0.5, models on the meta device (shapes only), median "
        "of 3. `auto` profiles four layers of a long identical stack and writes out the rest "
        "(remat_kit/_torch/_replicate.py); 'every op' profiles the whole forward. Same plan: the two give "
        "the same predicted activation fraction.",
        "",
        "| model | ops | from 4 layers (s) | of which profile | every op (s) | of which profile | same plan |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["planning"]:
        lines.append(
            f"| {p['model']} | {p['num_ops']} | {p['replicate_seconds']:.2f} | "
            f"{p['replicate_profile_seconds']:.2f} | {p['fake_seconds']:.2f} | {p['fake_profile_seconds']:.2f} "
            f"| {'yes' if p['same_plan'] else 'NO'} |"
        )
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
