"""JAX benchmark: `remat_kit.auto` against stock remat policies on a scanned GPT decoder.

    python -m benchmarks.jax_bench                 # ~5 min on a 2-core CPU; writes reports/jax/
    python -m benchmarks.jax_bench --quick         # smaller model, for a smoke run
    python -m benchmarks.jax_bench --time 5        # also time 5 steps per strategy, interleaved with none

Per strategy, in one process: compiled temp memory (`memory_analysis().temp_size_in_bytes`;
on a GPU also `memory_stats()["peak_bytes_in_use"]` of a real step), FLOPs of the step
(`cost_analysis()["flops"]` of a compile with the layer scan unrolled, since XLA counts a loop
body once), compile time, and for `auto` the planning time (trace + cost graph + solve) and the
verification time (its extra compiles). Then the paper check: a GPT layer with 5·a·s/h = 80
(Korthikanti et al. 2022), Megatron's selective recompute against `auto` at the same memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import remat_kit
from remat_kit import auto, megatron_bytes_per_layer, simulate
from remat_kit.measure import jax_flops, jax_trace
from remat_kit.presets import megatron_selective

POL = jax.checkpoint_policies
# MaxText `get_remat_policy` name presets (src/maxtext/layers/decoders.py), on our tag names.
PRESETS: dict[str, Any] = {
    "full": "nothing",
    "dots_saveable": POL.dots_saveable,
    "dots_with_no_batch_dims_saveable": POL.dots_with_no_batch_dims_saveable,
    "maxtext_minimal": POL.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj", "mlpwi", "mlpwo"),
    "maxtext_save_qkv_proj": POL.save_only_these_names("query_proj", "key_proj", "value_proj"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 8
    seq: int = 512
    d: int = 512
    heads: int = 8
    batch: int = 1
    vocab: int = 1024
    dropout: float = 0.1
    dtype: str = "float32"


def init(cfg: Config, key: jax.Array) -> dict:
    ks = jax.random.split(key, 8)
    dt = jnp.dtype(cfg.dtype)
    L, d = cfg.layers, cfg.d

    def w(k, *shape):
        return (jax.random.normal(k, shape) / math.sqrt(shape[-2])).astype(dt)

    return {
        "embed": w(ks[0], cfg.vocab, d),
        "pos": w(ks[1], cfg.seq, d),
        "ln_f": jnp.ones((d,), dt),
        "layers": {
            "ln1": jnp.ones((L, d), dt),
            "ln2": jnp.ones((L, d), dt),
            "wq": w(ks[2], L, d, d),
            "wk": w(ks[3], L, d, d),
            "wv": w(ks[4], L, d, d),
            "wo": w(ks[5], L, d, d),
            "w1": w(ks[6], L, d, 4 * d),
            "w2": w(ks[7], L, 4 * d, d),
        },
    }


def _ln(x, scale):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * scale


def _dropout(x, key, rate):
    keep = jax.random.bernoulli(key, 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


def layer(cfg: Config, p: dict, x: jax.Array, key: jax.Array) -> jax.Array:
    b, s, d = x.shape
    a, dh = cfg.heads, d // cfg.heads
    k_attn, k_out, k_mlp = jax.random.split(key, 3)
    h = _ln(x, p["ln1"])
    q = checkpoint_name(h @ p["wq"], "query_proj").reshape(b, s, a, dh)
    k = checkpoint_name(h @ p["wk"], "key_proj").reshape(b, s, a, dh)
    v = checkpoint_name(h @ p["wv"], "value_proj").reshape(b, s, a, dh)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, jnp.asarray(-1e9, scores.dtype))
    probs = _dropout(jax.nn.softmax(scores, axis=-1), k_attn, cfg.dropout)
    ctx = checkpoint_name(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d), "context")
    x = x + _dropout(checkpoint_name(ctx @ p["wo"], "out_proj"), k_out, cfg.dropout)
    h = _ln(x, p["ln2"])
    m = jax.nn.gelu(checkpoint_name(h @ p["w1"], "mlpwi"))
    return x + _dropout(checkpoint_name(m @ p["w2"], "mlpwo"), k_mlp, cfg.dropout)


def make_loss(cfg: Config, policy: Any = None, *, unroll: int = 1):
    """Loss of the scanned decoder; `policy` checkpoints the scan body (None: no remat)."""

    def body(carry, p):
        x, key = carry
        key, sub = jax.random.split(key)
        return (layer(cfg, p, x, sub), key), None

    if policy is not None:  # inside a loop the recompute cannot be merged into the forward: no CSE prevention
        body = jax.checkpoint(body, policy=None if policy == "nothing" else policy, prevent_cse=False)

    def loss(params, tokens, key):
        x = params["embed"][tokens] + params["pos"][None]
        (x, _), _ = lax.scan(body, (x, key), params["layers"], unroll=unroll)
        logits = _ln(x, params["ln_f"]) @ params["embed"].T
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(tokens, -1, axis=1)[..., None], axis=-1))

    return loss


def measure(loss, count_loss, args, *, steps: int, num_layers: int) -> dict:
    """`count_loss` is `loss` with two layers per loop step: XLA's cost analysis counts a loop body
    once, so one layer's FLOPs are the difference and the step's are F1 + (L - 1) * (F2 - F1)."""
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
    row = {"compile_s": time.perf_counter() - t0, "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}
    f1 = jax_flops(compiled)
    f2 = jax_flops(jax.jit(jax.grad(count_loss)).lower(*args).compile())
    per_layer = (f2 - f1) / (1 + num_layers % 2)  # an odd length peels one more copy
    row["flops"] = f1 + (num_layers - 1) * per_layer
    dev = jax.devices()[0]
    if steps or dev.platform == "gpu":
        jax.block_until_ready(compiled(*args))  # warm-up; timed later, interleaved (`time_interleaved`)
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            row["gpu_peak_bytes"] = int(stats["peak_bytes_in_use"])
    row["_step"] = (compiled, args)
    return row


def time_interleaved(rows: dict[str, dict], steps: int) -> None:
    """Step times in rounds, one step of every strategy per round, `none` among them, so each
    ratio to `none` comes from the same stretch of the same process (a loaded machine slows all
    strategies alike). Adds step_s_median and step_ratio_to_none (median of per-round ratios)."""
    timed = {name: r.pop("_step") for name, r in rows.items() if "_step" in r}
    if not steps:
        return
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(steps):
        for name, (compiled, args) in timed.items():
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        rows[name]["step_s_median"] = statistics.median(ts)
        if "none" in times:
            rows[name]["step_ratio_to_none"] = statistics.median(t / n for t, n in zip(ts, times["none"]))


def run_main(cfg: Config, budgets: list[float], steps: int) -> dict:
    params = init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab)
    args = (params, tokens, jax.random.key(2))
    rows: dict[str, dict] = {}
    rows["none"] = measure(make_loss(cfg), make_loss(cfg, unroll=2), args, steps=steps, num_layers=cfg.layers)
    for name, policy in PRESETS.items():
        rows[name] = measure(
            make_loss(cfg, policy), make_loss(cfg, policy, unroll=2), args, steps=steps, num_layers=cfg.layers
        )
        _say(name, rows[name])

    # Planning alone: trace + cost graph, as auto's first call does, without its verification compiles.
    t0 = time.perf_counter()
    step = jax_trace(make_loss(cfg), *args)
    planning_s = time.perf_counter() - t0
    graph = step.graph
    mega = megatron_selective(graph)
    rows["megatron_selective"] = measure(
        step.run(mega),
        step.run(mega, unroll=2),
        args,
        steps=steps,
        num_layers=cfg.layers,
    )
    rows["megatron_selective"].update(
        predicted_fraction=mega.activation_fraction, predicted_recompute_flops=mega.predicted_recompute_flops
    )
    _say("megatron_selective", rows["megatron_selective"])
    for b in budgets:
        wrapped = auto(make_loss(cfg), b)
        t0 = time.perf_counter()
        jax.jit(jax.grad(wrapped)).lower(*args)  # the first trace: plan, then verify by compiling
        first_trace_s = time.perf_counter() - t0
        plan = remat_kit.plan_of(wrapped)[0]
        row = measure(wrapped, step.run(plan, unroll=2), args, steps=steps, num_layers=cfg.layers)
        row.update(
            predicted_fraction=plan.activation_fraction,
            predicted_recompute_flops=plan.predicted_recompute_flops,
            first_trace_with_verify_s=first_trace_s,
            plan=plan.summary(),
        )
        rows[f"auto@{b}"] = row
        _say(f"auto@{b}", row)
    time_interleaved(rows, steps)
    none = rows["none"]
    for r in rows.values():
        r["temp_fraction"] = r["temp_bytes"] / none["temp_bytes"]
        r["extra_flops_fraction"] = r["flops"] / none["flops"] - 1
    checks = {}
    for b in budgets:
        a = rows[f"auto@{b}"]
        fitting = {
            n: r for n, r in rows.items() if not n.startswith("auto") and n != "none" and r["temp_fraction"] <= b
        }
        checks[f"auto@{b}"] = {
            "fits_budget": a["temp_fraction"] <= b,
            "presets_that_fit": sorted(fitting),
            "extra_flops_le_every_fitting_preset": all(a["flops"] <= r["flops"] * (1 + 1e-3) for r in fitting.values()),
        }
    return {
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "checks": checks,
        "planning_s": planning_s,
        "compile_none_s": none["compile_s"],
        "graph": repr(graph),
    }


def paper_check(steps: int) -> dict:
    """Korthikanti et al. (2022): a GPT layer with 5·a·s/h = 80 (h=256, a=4, s=1024), bf16."""
    # four layers: with two per loop step (FLOP counting) the loops keep a trip count above one,
    # so XLA cannot inline them and merge the recompute into the forward
    cfg = Config(layers=4, seq=1024, d=256, heads=4, batch=1, vocab=512, dropout=0.1, dtype="bfloat16")
    params = init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab)
    args = (params, tokens, jax.random.key(2))
    step = jax_trace(make_loss(cfg), *args)
    graph = step.graph
    kept = simulate(graph).kept_bytes_by_block
    per_layer = [kept[b] for b in step.scan_blocks[0]]
    formula = megatron_bytes_per_layer(seq_len=cfg.seq, batch=cfg.batch, hidden=cfg.d, num_heads=cfg.heads)
    mega = megatron_selective(graph)
    L = cfg.layers
    measured = {
        "none": measure(make_loss(cfg), make_loss(cfg, unroll=2), args, steps=steps, num_layers=L),
        "megatron_selective": measure(
            step.run(mega),
            step.run(mega, unroll=2),
            args,
            steps=steps,
            num_layers=L,
        ),
    }
    # auto at the memory Megatron reaches, measured: its verification holds it to that.
    same_memory = measured["megatron_selective"]["temp_bytes"] / measured["none"]["temp_bytes"]
    wrapped = auto(make_loss(cfg), same_memory)
    jax.jit(jax.grad(wrapped)).lower(*args)
    plan = remat_kit.plan_of(wrapped)[0]
    measured["auto"] = measure(wrapped, step.run(plan, unroll=2), args, steps=steps, num_layers=L)
    time_interleaved(measured, steps)
    # and on the model alone: auto at Megatron's predicted memory
    model_plan = step.plan(max(mega.activation_fraction, 1e-6))
    return {
        "config": dataclasses.asdict(cfg),
        "5as_over_h": 5 * cfg.heads * cfg.seq / cfg.d,
        "formula_bytes_per_layer": formula,
        "traced_kept_bytes_per_layer": per_layer,
        "megatron": {
            "predicted_fraction": mega.activation_fraction,
            "predicted_recompute_flops": mega.predicted_recompute_flops,
        },
        "auto": {
            "budget": same_memory,
            "predicted_fraction": plan.activation_fraction,
            "predicted_recompute_flops": plan.predicted_recompute_flops,
        },
        "auto_model_only": {
            "budget": mega.activation_fraction,
            "predicted_fraction": model_plan.activation_fraction,
            "predicted_recompute_flops": model_plan.predicted_recompute_flops,
        },
        "auto_recompute_le_megatron_predicted": model_plan.predicted_recompute_flops <= mega.predicted_recompute_flops,
        "auto_flops_le_megatron_measured": measured["auto"]["flops"] <= measured["megatron_selective"]["flops"],
        "auto_temp_le_megatron_measured": measured["auto"]["temp_bytes"]
        <= measured["megatron_selective"]["temp_bytes"],
        "measured": measured,
    }


def _say(name: str, row: dict) -> None:
    extra = f" (predicted {row['predicted_fraction']:.2f})" if "predicted_fraction" in row else ""
    print(f"{name:34s} {row['temp_bytes'] / 2**20:8.1f} MiB temp, {row['flops'] / 1e9:8.2f} GFLOP{extra}", flush=True)


def write_report(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
    rows = result["main"]["rows"]
    lines = [
        "# JAX: remat_kit.auto against stock policies",
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}, jax {result['jax']}  ",
        f"Model: {result['main']['config']}  ",
        "",
        "| strategy | temp MiB | vs none | predicted | GFLOP | extra FLOPs | compile s | step / none |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        pred = f"{r['predicted_fraction']:.3f}" if "predicted_fraction" in r else ""
        lines.append(
            f"| {name} | {r['temp_bytes'] / 2**20:.1f} | {r['temp_fraction']:.3f} | {pred} | {r['flops'] / 1e9:.2f} | "
            f"{r['extra_flops_fraction']:+.1%} | {r['compile_s']:.1f} | "
            + (f"{r['step_ratio_to_none']:.3f} |" if "step_ratio_to_none" in r else "|")
        )
    m = result["main"]
    lines += [
        "",
        f"Planning (trace + cost graph + solve, first call): {m['planning_s']:.2f} s; compile of the no-remat step: "
        f"{m['compile_none_s']:.2f} s. auto's first trace including its verification compiles: "
        + ", ".join(f"{k} {r['first_trace_with_verify_s']:.1f} s" for k, r in rows.items() if k.startswith("auto")),
        "",
        "Checks (measured temp memory vs budget × none; auto's FLOPs vs every preset that fits the same budget):",
        "",
    ]
    for k, c in m["checks"].items():
        lines.append(
            f"- {k}: fits={c['fits_budget']}, presets that fit: {', '.join(c['presets_that_fit']) or 'none'}; "
            f"auto FLOPs <= each of them: {c['extra_flops_le_every_fitting_preset']}"
        )
    p = result.get("paper")
    if p:
        lines += [
            "",
            "## Paper check (Korthikanti et al. 2022, 5·a·s/h = 80)",
            "",
            f"Layer h={p['config']['d']}, a={p['config']['heads']}, s={p['config']['seq']}, bf16. Formula s·b·h·(34+5as/h): "
            f"{p['formula_bytes_per_layer'] / 2**20:.2f} MiB per layer; traced graph keeps "
            + ", ".join(f"{b / 2**20:.2f}" for b in p["traced_kept_bytes_per_layer"])
            + " MiB per layer under no remat.",
            "",
            f"Model: Megatron selective predicted {p['megatron']['predicted_fraction']:.3f} of no remat, recompute "
            f"{p['megatron']['predicted_recompute_flops'] / 1e9:.3f} GFLOP; auto at that budget predicted "
            f"{p['auto_model_only']['predicted_fraction']:.3f}, recompute {p['auto_model_only']['predicted_recompute_flops'] / 1e9:.3f} GFLOP "
            f"(<= Megatron: {p['auto_recompute_le_megatron_predicted']}).",
            "",
            f"Compiled: auto with budget = Megatron's measured fraction ({p['auto']['budget']:.3f}): FLOPs <= Megatron: "
            f"{p['auto_flops_le_megatron_measured']}, temp <= Megatron: {p['auto_temp_le_megatron_measured']}.",
            "",
            "| measured | temp MiB | GFLOP |",
            "| --- | ---: | ---: |",
        ]
        for k, r in p["measured"].items():
            lines.append(f"| {k} | {r['temp_bytes'] / 2**20:.1f} | {r['flops'] / 1e9:.2f} |")
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 4-layer, seq-256 model (smoke run)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--time", type=int, default=0, metavar="N", help="time N steps per strategy (0: compile only)")
    ap.add_argument("--no-paper", action="store_true", help="skip the Megatron paper check")
    ap.add_argument("--out", default="reports/jax")
    args = ap.parse_args(argv)
    cfg = Config(layers=4, seq=256, d=256) if args.quick else Config()
    dev = jax.devices()[0]
    result = {
        "command": " ".join(["python -m benchmarks.jax_bench", *(argv if argv is not None else sys.argv[1:])]),
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        "jax": jax.__version__,
    }
    t0 = time.perf_counter()
    result["main"] = run_main(cfg, args.budgets, args.time)
    if not args.no_paper:
        result["paper"] = paper_check(args.time)
    result["total_s"] = time.perf_counter() - t0
    write_report(result, args.out)
    print(f"wrote {args.out}/bench.md and bench.json in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
