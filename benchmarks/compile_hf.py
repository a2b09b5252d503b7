"""Compiled `auto` on Hugging Face models as their authors wrote them, beside the peer HF users pick.

    python -m benchmarks.compile_hf                          # writes reports/torch/compile_hf.md
    python -m benchmarks.compile_hf --models llama --budgets 0.5 --rounds 4 --out /tmp/x.md

`benchmarks.compile_bench` measures the project's own GPT; this is the same measurement on
`transformers`' Llama and GPT-2 (built from configs at a bench size, dropout 0.1, no download),
against Hugging Face's own `gradient_checkpointing_enable()` (every decoder layer checkpointed,
non-reentrant), all compiled with Inductor in one process. Per strategy: dynamo's graph breaks on
a first compiled call (after `torch._dynamo.reset()`), the activation peak of the compiled step
read from Inductor's generated code (benchmarks/inductor_memory.py: exact, independent of
remat_kit's cost model; a step with graph breaks runs several graphs, so no one graph's code
gives its peak), the rise of the resident set over a step in a process of its own holding only
that strategy's model (`compile_bench._peak`: gradients set to None before it; comparable across
graph breaks; it holds the gradients made by the peak), `auto`'s budget in bytes (a fraction of eager no remat's activation
peak, as the budget is defined), the gradients against compiled none's (same seed: the same
dropout draws), and the step's process CPU time over compiled none's, medians over interleaved
rounds whose order rotates, timed under `compile_bench.steady_heap`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor.codecache import PyCodeCache

import remat_kit
from benchmarks import compile_bench, inductor_memory
from benchmarks._compile_report import write_section
from benchmarks._report import ROOT, command

HF_GC = "HF gradient_checkpointing_enable()"
SHAPE = dict(layers=4, hidden=256, heads=4, ffn=688, vocab=2048, batch=4, seq=256)


def _config(name: str) -> Any:
    import transformers as tf

    tf.logging.set_verbosity_error()
    s = SHAPE
    if name == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(
            num_hidden_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"] // 2, intermediate_size=s["ffn"], vocab_size=s["vocab"],
            attention_dropout=0.1,
        )  # fmt: skip
    return tf.GPT2LMHeadModel, tf.GPT2Config(
        n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"], vocab_size=s["vocab"], n_positions=s["seq"]
    )  # dropout 0.1 in embeddings, attention and residuals by default


def build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    cls, config = _config(name)
    torch.manual_seed(0)
    model = cls(config).train()
    # GPT-2's config names no loss type: HF then logs a warning inside forward, a graph break of its
    # own in every strategy (tests/test_torch_compile.py sets it the same way).
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def _hf_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def strategies(budgets: list[float]) -> dict[str, Callable[[torch.nn.Module], torch.nn.Module]]:
    out: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {"none": lambda m: m}
    out[HF_GC] = _hf_checkpointing
    for b in budgets:
        out[f"auto({b})"] = lambda m, b=b: remat_kit.auto(m, budget=b)
    return out


def _eager_activation(model: torch.nn.Module, kwargs: dict) -> int:
    return remat_kit.measure.torch_step(model, (), kwargs, lambda out: out.loss, count_flops=False).activation_bytes


def compiled_step(model: torch.nn.Module, kwargs: dict) -> Callable[[], None]:
    """One training step of `torch.compile(model)`, gradients set to None first; `.model` is
    `model` (for `compile_bench._peak`)."""
    compiled = torch.compile(model)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        compiled(**kwargs).loss.backward()

    step.model = model  # type: ignore[attr-defined]
    return step


def measure(name: str, budgets: list[float], rounds: int) -> dict[str, dict[str, Any]]:
    torch._dynamo.config.recompile_limit = 64
    base, kwargs = build(name)
    cells: dict[str, dict[str, Any]] = {}
    steps: dict[str, tuple] = {}
    for label, apply in strategies(budgets).items():
        model = copy.deepcopy(base)
        try:
            model = apply(model)
            model(**kwargs).loss.backward()  # auto plans here (and names an infeasible budget)
        except remat_kit.InfeasibleBudgetError as e:
            cells[label] = {"infeasible": str(e).split(" for ")[0]}
            continue
        cell = cells[label] = {"eager": _eager_activation(model, kwargs)}
        torch._dynamo.reset()  # breaks counted from a first trace; the others recompile untimed
        step = compiled_step(model, kwargs)
        PyCodeCache.cache_clear()
        torch.manual_seed(1)
        cell["breaks"] = compile_bench.graph_breaks(step)
        cell["code_peak"] = inductor_memory.step_peak(inductor_memory.loaded_sources())
        torch.manual_seed(2)
        step()
        cell["grads"] = [p.grad.clone() for p in model.parameters()]
        if label.startswith("auto("):
            cell["budget_bytes"] = int(float(label[5:-1]) * cells["none"]["eager"])
        steps[label] = (step, None)
    ref = cells["none"]["grads"]
    for cell in cells.values():
        if "grads" in cell:
            cell["grad_err"] = remat_kit.measure.rel_err(cell.pop("grads"), ref)
    for label in steps:
        cells[label]["rss_peak"] = rss_peak_in_own_process(name, label, budgets)
    compile_bench.steady_heap()
    # Two untimed rounds: the models share HF's code objects, and dynamo recompiled one (a guard
    # on another's state) in the first timed round after a single warm-up round.
    compile_bench._rounds(steps, 0, compile_bench._cpu_seconds)
    times = compile_bench._rounds(steps, rounds, compile_bench._cpu_seconds)
    none_t = statistics.median(times["none"])
    for label in steps:
        cells[label]["time_ratio"] = statistics.median(times[label]) / none_t
    return cells


def rss_peak_in_own_process(name: str, label: str, budgets: list[float]) -> int:
    """The compiled step's resident-set rise (`compile_bench._peak`, median of 3) in a process
    holding only this strategy's model: read in this process beside the others, every strategy's
    rise grew (compiled `auto(0.3)` on GPT-2 by 60 MB over its own process's reading; cause not
    found), so each is read alone."""
    code = (
        "import json, statistics, sys, torch\n"
        "from benchmarks import compile_bench, compile_hf\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "compile_bench.exact_rss()\n"
        f"model, kwargs = compile_hf.build({name!r})\n"
        f"model = compile_hf.strategies({budgets!r})[{label!r}](model)\n"
        "model(**kwargs).loss.backward()\n"
        "step = compile_hf.compiled_step(model, kwargs)\n"
        "step()\n"
        "print(json.dumps(statistics.median(compile_bench._peak(step) for _ in range(3))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"resident-set worker for {name} {label} failed:\n{out.stderr[-3000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def table(cells: dict[str, dict[str, Any]]) -> list[str]:
    """A step with graph breaks runs several graphs whose saved tensors are live together, so its
    peak is not any one graph's: it is shown as the largest graph's, and compared by the resident set."""
    gc = cells.get(HF_GC, {})
    lines = [
        "| strategy | graph breaks | eager activation / eager none | activation peak (Inductor's code) | budget (bytes) "
        "| held | resident-set peak | <= HF's | step CPU time / compiled none | / HF's | max grad error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    none_eager = cells["none"]["eager"]
    for label, c in cells.items():
        if "infeasible" in c:
            lines.append(f"| {label} | {c['infeasible']} (InfeasibleBudgetError) | | | | | | | | | |")
            continue
        whole = c["breaks"] == 0
        peak = f"{c['code_peak']:,}" if whole else f"largest graph {c['code_peak']:,}; not the step's"
        budget = c.get("budget_bytes")
        held = "" if budget is None or not whole else ("held" if c["code_peak"] <= budget else "**over**")
        versus = gc and label.startswith("auto(")
        below = ("yes" if c["rss_peak"] <= gc["rss_peak"] else "no") if versus else ""
        vs = f"{c['time_ratio'] / gc['time_ratio']:.2f}" if versus else ""
        lines.append(
            f"| {label} | {c['breaks']} | {c['eager'] / none_eager:.3f} | {peak} | "
            f"{'' if budget is None else f'{budget:,}'} | {held} | {c['rss_peak']:,} | {below} | "
            f"{c['time_ratio']:.2f} | {vs} | {c['grad_err']:.1e} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    p.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=[0.3, 0.5, 0.7])
    p.add_argument("--rounds", type=int, default=12, help="timed rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="reports/torch/compile_hf.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        cells = measure(name, args.budgets, args.rounds)
        s = SHAPE
        lines = [
            f"## transformers {name}: {s['layers']} layers, hidden {s['hidden']}, seq {s['seq']}, batch {s['batch']}",
            "",
            f"Command: `{command()}` (dropout 0.1, Inductor, {args.threads} threads, {args.rounds} rounds, CPU, "
            f"torch {torch.__version__}).",
            "",
            *table(cells),
        ]
        write_section(args.out, f"hf {name}", lines)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
