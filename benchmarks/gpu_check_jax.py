"""The JAX half of `benchmarks.gpu_check`: the scanned GPT of `benchmarks.jax_bench` on one device.

    python -m benchmarks.gpu_check_jax [--tiny] [--seconds 120]

Prints one JSON line. Per strategy (none, stock policies, `auto` at 0.3 / 0.5 / 0.7): the first
call's time (for `auto` planning and its verification compiles included), the compiled temp bytes
(`memory_analysis().temp_size_in_bytes`), `memory_stats()["peak_bytes_in_use"]` after one real
step, and the step time's median over interleaved rounds. The allocator's peak only grows, so the
steps run in order of compiled temp bytes, smallest first; a peak that did not grow is reported as
masked (`null`), not as the previous cell's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any

import jax

import remat_kit
from benchmarks.jax_bench import PRESETS, Config, init, make_loss

BUDGETS = (0.3, 0.5, 0.7)


def config(tiny: bool) -> Config:
    if tiny:
        return Config(layers=4, seq=64, d=64, heads=4, batch=2, vocab=256)
    return Config(layers=12, seq=1024, d=1024, heads=16, batch=8, vocab=32768, dtype="bfloat16")


def losses(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"none": make_loss(cfg)}
    for name in ("full", "dots_saveable", "dots_with_no_batch_dims_saveable"):
        out[name] = make_loss(cfg, PRESETS[name])
    for b in BUDGETS:
        out[f"auto@{b}"] = remat_kit.auto(make_loss(cfg), budget=b)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.seconds
    cfg = config(args.tiny)
    params = init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab)
    step_args = (params, tokens, jax.random.key(2))
    rows: dict[str, dict[str, Any]] = {}
    compiled: dict[str, Any] = {}
    for name, loss in losses(cfg).items():
        if time.monotonic() > deadline:
            rows[name] = {"status": "not reached (deadline)"}
            continue
        t0 = time.perf_counter()
        try:
            exe = jax.jit(jax.grad(loss)).lower(*step_args).compile()
        except remat_kit.InfeasibleBudgetError as exc:  # an honest answer at this size, reported
            rows[name] = {
                "status": f"InfeasibleBudgetError: {str(exc)[:200]}",
                "first_call_s": time.perf_counter() - t0,
            }
            continue
        rows[name] = {
            "first_call_s": time.perf_counter() - t0,
            "temp_bytes": exe.memory_analysis().temp_size_in_bytes,
            "status": "ok",
        }
        compiled[name] = exe
    device = jax.devices()[0]
    last_peak = 0
    for name in sorted(compiled, key=lambda n: rows[n]["temp_bytes"]):
        jax.block_until_ready(compiled[name](*step_args))
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        rows[name]["peak_mib"] = peak / 2**20 if peak is not None and peak > last_peak else None
        last_peak = max(last_peak, peak or 0)
    times: dict[str, list[float]] = {n: [] for n in compiled}
    for _ in range(args.rounds):
        for name, exe in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(exe(*step_args))
            times[name].append(time.perf_counter() - t0)
    none = rows.get("none", {})
    for name, ts in times.items():
        rows[name]["step_time_median_s"] = statistics.median(ts)
    for r in rows.values():
        if "temp_bytes" in r and none.get("temp_bytes"):
            r["temp_vs_none"] = r["temp_bytes"] / none["temp_bytes"]
        if "step_time_median_s" in r and none.get("step_time_median_s"):
            r["step_vs_none"] = r["step_time_median_s"] / none["step_time_median_s"]
    result = {"jax": jax.__version__, "device": device.device_kind, "config": dataclasses.asdict(cfg), "rows": rows}
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
