"""GPU check: remat strategies on a Llama-style model and the JAX GPT bench, measured on one GPU.

    python -m benchmarks.gpu_check                # ~8 min on one H100/H200; writes reports/gpu/
    python -m benchmarks.gpu_check --tiny         # a CPU smoke run of the same program (minutes)

PyTorch part: a Hugging Face `LlamaForCausalLM` built from a config (random weights, no
download; bf16 and SDPA attention on a GPU), one copy per strategy with the same weights:
`none`, `full` (every decoder layer in a non-reentrant checkpoint), `hf_gc`
(`gradient_checkpointing_enable()`), `sac_oplist` (torchtitan's op save list as a selective
checkpoint policy), `auto@b` for b in 0.3 / 0.5 / 0.7 and `auto_offload@0.3`; then compiled
(`torch.compile`) `none`, `full`, `sac_oplist`, `auto@b`, and `compile_budget@0.5` (torch's own
`activation_memory_budget`). Per cell: activation memory = `max_memory_allocated` during the step
minus what was allocated before it minus the parameter gradients (not measured on CPU, which has
no such counter); the step time's median over interleaved rounds (every cell
runs its steps in each round, so drift hits all alike) and its ratio to `none` of the same mode;
the gradients' largest relative error against `none`. Cells run in order of importance and stop
at `--deadline` seconds: the ones not reached are listed as such, not dropped.

JAX part (`benchmarks.gpu_check_jax`, a child process so that the GPU memory the PyTorch part
held is gone): the scanned GPT of `benchmarks.jax_bench` for none, stock policies and `auto`,
with compiled temp bytes and `memory_stats()["peak_bytes_in_use"]`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import remat_kit
from benchmarks._report import ROOT, write

BUDGETS = (0.3, 0.5, 0.7)
# torchtitan's op save list (torchtitan/models/llama3/infra/parallelize.py `_save_list`), less the
# collectives a single device never runs.
_ATEN = torch.ops.aten
SAVE_LIST = {_ATEN.mm.default, _ATEN.max.default}
for _name in (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
):
    if hasattr(_ATEN, _name):
        SAVE_LIST.add(getattr(_ATEN, _name).default)


def llama_config(tiny: bool) -> dict[str, Any]:
    if tiny:
        return dict(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
            seq=64,
            batch=2,
        )
    # ~0.55B parameters: 8 layers of a 1B Llama, so the compiled cells fit the time.
    return dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        seq=2048,
        batch=4,
    )


def build_llama(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {k: v for k, v in cfg.items() if k not in ("seq", "batch")}
    config = LlamaConfig(
        **shape, max_position_embeddings=cfg["seq"], attn_implementation="sdpa", use_cache=False, attention_dropout=0.0
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


class _Checkpointed(nn.Module):
    """One decoder layer in a non-reentrant checkpoint (`context_fn` makes it selective)."""

    def __init__(self, inner: nn.Module, context_fn: Any = None):
        super().__init__()
        self.inner, self.context_fn = inner, context_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        extra = {"context_fn": self.context_fn} if self.context_fn is not None else {}
        return checkpoint(self.inner, *args, use_reentrant=False, **extra, **kwargs)


def _save_list_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE_LIST else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap_layers(model: nn.Module, context_fn: Any = None) -> nn.Module:
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = _Checkpointed(layers[i], context_fn)
    return model


def strategies() -> list[tuple[str, Any]]:
    """(cell name, builder) in order of importance; a builder returns the module to step."""
    sac = functools.partial(create_selective_checkpoint_contexts, _save_list_policy)

    def hf_gc(m: nn.Module) -> nn.Module:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m

    eager = [
        ("none", lambda m: m),
        ("auto@0.5", lambda m: remat_kit.auto(m, budget=0.5)),
        ("full", _wrap_layers),
        ("hf_gc", hf_gc),
        ("sac_oplist", lambda m: _wrap_layers(m, sac)),
        ("auto@0.3", lambda m: remat_kit.auto(m, budget=0.3)),
        ("auto@0.7", lambda m: remat_kit.auto(m, budget=0.7)),
        ("auto_offload@0.3", lambda m: remat_kit.auto(m, budget=0.3, offload=True)),
    ]
    compiled = [
        ("compile:none", torch.compile),
        ("compile:auto@0.5", lambda m: torch.compile(remat_kit.auto(m, budget=0.5))),
        ("compile:full", lambda m: torch.compile(_wrap_layers(m))),
        ("compile:sac_oplist", lambda m: torch.compile(_wrap_layers(m, sac))),
        ("compile_budget@0.5", lambda m: _compile_with_budget(m, 0.5)),
        ("compile:auto@0.3", lambda m: torch.compile(remat_kit.auto(m, budget=0.3))),
        ("compile:auto@0.7", lambda m: torch.compile(remat_kit.auto(m, budget=0.7))),
    ]
    return eager + compiled


def _compile_with_budget(model: nn.Module, budget: float) -> Any:
    """torch.compile with AOTAutograd's memory budget; the config is read when the graph is
    partitioned, i.e. on the first call, so the step holds the patch (see `_Cell.step`)."""
    compiled = torch.compile(model)
    compiled._remat_budget = budget  # type: ignore[attr-defined]
    return compiled


class _Cell:
    def __init__(self, name: str, module: Any, inputs: torch.Tensor, device: torch.device):
        self.name, self.module, self.inputs, self.device = name, module, inputs, device
        self.params: list[torch.Tensor] = []
        self.times: list[float] = []
        self.row: dict[str, Any] = {"cell": name}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> float:
        budget = getattr(self.module, "_remat_budget", None)
        patch = torch._functorch.config.patch(activation_memory_budget=budget) if budget else _nullcontext()
        self._sync()
        t0 = time.perf_counter()
        with patch:
            loss = self.module(input_ids=self.inputs, labels=self.inputs).loss
            loss.backward()
        self._sync()
        return time.perf_counter() - t0

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().float().clone() if p.grad is not None else torch.zeros(()) for p in self.params]

    def clear(self) -> None:
        for p in self.params:
            p.grad = None


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _activation_bytes(cell: _Cell) -> int | None:
    """Bytes the step held beyond what was allocated before it, less the parameter gradients
    (a GPU's allocator counts them; on CPU there is no such counter, and RSS is too coarse)."""
    if cell.device.type != "cuda":
        return None
    grad_bytes = sum(p.numel() * p.element_size() for p in cell.params if p.requires_grad)
    torch.cuda.synchronize(cell.device)
    torch.cuda.reset_peak_memory_stats(cell.device)
    before = torch.cuda.memory_allocated(cell.device)
    cell.step()
    peak = torch.cuda.max_memory_allocated(cell.device)
    cell.clear()
    return peak - before - grad_bytes


def _rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        scale = float(w.abs().max()) or 1.0
        worst = max(worst, float((g - w).abs().max()) / scale)
    return worst


def run_torch(tiny: bool, deadline: float, rounds: int, steps_per_round: int) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = llama_config(tiny)
    base = build_llama(cfg, device, dtype)
    inputs = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), device=device)
    cells: list[_Cell] = []
    rows: list[dict[str, Any]] = []
    reference: dict[str, list[torch.Tensor]] = {}
    for name, build in strategies():
        if time.monotonic() > deadline:
            rows.append({"cell": name, "status": "not reached (deadline)"})
            continue
        cell = _Cell(name, None, inputs, device)
        if name.startswith("compile_budget"):
            # Dynamo's cache would hand this model compile:none's graphs (same code, same guards),
            # partitioned without the budget: start it from an empty cache. The other compiled
            # cells recompile once, in the untimed round below.
            torch._dynamo.reset()
        try:
            t0 = time.perf_counter()
            cell.module = build(copy.deepcopy(base))
            cell.params = list(cell.module.parameters())
            cell.row["first_step_s"] = cell.step()  # planning / compiling happen here
            cell.row["build_s"] = time.perf_counter() - t0
            grads = cell.grads()
            cell.clear()
            mode = "compile" if name.startswith("compile") else "eager"
            reference.setdefault(mode, grads)
            cell.row["grad_rel_err_vs_none"] = _rel_err(grads, reference[mode])
            cell.row["activation_bytes"] = _activation_bytes(cell)
            cell.row["status"] = "ok"
            cells.append(cell)
        except Exception as exc:  # a cell that fails is a finding, reported as such
            cell.row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        rows.append(cell.row)
    for cell in cells:  # untimed: whatever a cache reset made recompile does so here
        cell.step()
        cell.clear()
    for _ in range(rounds):  # interleaved: each cell's steps in every round
        for cell in cells:
            if time.monotonic() > deadline + 30:
                break
            for _ in range(steps_per_round):
                cell.times.append(cell.step())
                cell.clear()
    for cell in cells:
        if cell.times:
            cell.row["step_time_median_s"] = statistics.median(cell.times)
            cell.row["timed_steps"] = len(cell.times)
    by_name = {r["cell"]: r for r in rows}
    for r in rows:
        ref = by_name["compile:none" if r["cell"].startswith("compile") else "none"]
        for key in ("activation_bytes", "step_time_median_s"):
            if key in r and ref.get(key):
                r[f"{key.split('_')[0]}_vs_none"] = r[key] / ref[key]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "model": cfg,
        "parameters": sum(p.numel() for p in base.parameters()),
        "rows": rows,
    }


def run_jax(tiny: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check_jax", "--seconds", str(max(timeout - 60, 10))] + (
        ["--tiny"] if tiny else []
    )
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 30), env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"not finished within {timeout:.0f} s"}
    if done.returncode != 0:
        return {"status": f"failed (exit {done.returncode})", "stderr_tail": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def markdown(result: dict[str, Any]) -> str:
    t = result["torch"]
    lines = [
        f"# GPU check\n\nPyTorch {t['torch']} on {t['device']}, {t['dtype']}, Llama-style "
        f"{t['parameters'] / 1e9:.2f}B parameters, {t['model']}.\n",
        "| cell | status | activation MiB | × none | step median s | × none | grad rel err | first step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        mib = r.get("activation_bytes", None)
        lines.append(
            "| "
            + " | ".join(
                _fmt(x)
                for x in (
                    r["cell"],
                    r.get("status"),
                    None if mib is None else mib / 2**20,
                    r.get("activation_vs_none"),
                    r.get("step_time_median_s"),
                    r.get("step_vs_none"),
                    r.get("grad_rel_err_vs_none"),
                    r.get("first_step_s"),
                )
            )
            + " |"
        )
    j = result["jax"]
    lines.append(f"\n## JAX scanned GPT\n\nStatus: {j.get('status', 'ok')}. {j.get('config', '')}\n")
    if "rows" in j:
        lines += [
            "| strategy | status | temp MiB | × none | peak_bytes_in_use MiB | step median s | × none | first call s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in j["rows"].items():
            temp = r.get("temp_bytes")
            lines.append(
                "| "
                + " | ".join(
                    _fmt(x)
                    for x in (
                        name,
                        r.get("status"),
                        None if temp is None else temp / 2**20,
                        r.get("temp_vs_none"),
                        r.get("peak_mib"),
                        r.get("step_time_median_s"),
                        r.get("step_vs_none"),
                        r.get("first_call_s"),
                    )
                )
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes: a smoke run on CPU")
    parser.add_argument("--deadline", type=float, default=270.0, help="seconds in which PyTorch cells may start")
    parser.add_argument("--jax-seconds", type=float, default=150.0, help="seconds for the JAX part")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "reports" / "gpu"))
    parser.add_argument("--skip-jax", action="store_true")
    args = parser.parse_args(argv)
    start = time.monotonic()
    result: dict[str, Any] = {"torch": run_torch(args.tiny, start + args.deadline, args.rounds, args.steps_per_round)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["jax"] = {"status": "skipped (--skip-jax)"} if args.skip_jax else run_jax(args.tiny, args.jax_seconds)
    result["seconds"] = time.monotonic() - start
    write("gpu_check", result, markdown(result), pathlib.Path(args.out))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
