"""remat_kit.resume against plain Orbax and torch.distributed.checkpoint on the same state.

    python -m benchmarks.resume_bench --repeats 3     # 1 GiB, random values: resume.json, resume.md's tables
    python -m benchmarks.resume_bench --repeats 3 --values constant --out resume_constant  # its side line
    python -m benchmarks.resume_bench --cells jax2 --baseline /tmp/old_tree --out resume_overhead

A default run rewrites only the generated part of reports/resume.md (between its
`GENERATED_BEGIN` / `GENERATED_END` markers: the headline table and the kill -9 table); the
hand-written sections after it stay.

`--baseline TREE` also measures the layer as it is in TREE (an older checkout: `git archive`),
as "remat_kit@baseline", interleaved with the others in every repeat: before/after figures
from one run. `--cells` picks cells (jax1, jax2, torch1, torch2); `--out NAME` writes reports/NAME.*.
`--values constant` fills every leaf with one constant instead of normal noise.
`--reduce-pass` adds "reduce" to the JAX cells: one jitted reduction over the state and nothing
else, the least a check of every saved array on its devices costs (shown in both time columns;
the layer's fingerprint was that pass until it read CPU arrays with NumPy; on accelerators it is).

One fresh process per (implementation, repeat), implementations interleaved within each
repeat (in turn first, after an `os.sync()`: a save is mostly the kernel's work, and a run that
always followed another ran while the other's gigabyte was still being written back), medians
over repeats. Each process builds the state, then times a save (waited until
committed) and a restore into a template, in wall time and in CPU time (user + system, every
thread: getrusage; summed over a job's processes, it moves less than wall time when other jobs
share the cores; its system part, mostly page faults, is also kept apart in the JSON as
`*_sys_s`, and the minor page faults themselves, a count the load does not move, as `*_minflt`),
and reads its peak RSS (VmHWM) against the RSS just before the save: the extra host memory the
checkpoint path used. On CPU a JAX array already
lives in host memory, so "no full extra host copy" means extra RSS well under the state size.

Cells: JAX single process (remat_kit vs `ocp.CheckpointManager` with `StandardSave`), JAX 2
processes x 2 CPU devices with the state sharded over the 4-device mesh (same two), torch
single process (remat_kit with `async_save=False` vs `torch.distributed.checkpoint.save/load`
of the state dict, both synchronous), torch 2 processes on gloo with FSDP2 (`fully_shard` per
layer; the DTensor state dict from `get_model_state_dict` saved by every rank and restored
through `set_model_state_dict`, by the layer or by plain `dcp.save` / `dcp.load`). Every cell
checks after the timed part that the restored state equals the saved one. The torch cells
live in benchmarks/resume_bench_torch.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_LEAVES = 8


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _cpu_s() -> tuple[float, float, int]:
    """(user, system) CPU seconds of this process so far, every thread (Orbax's and tensorstore's too),
    and its minor page faults (a count, which the machine's load does not move)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def _jax_cell(impl: str, directory: Path, mib: int) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    rows = mib * 2**20 // 4 // NUM_LEAVES // 1024
    rows -= rows % len(jax.devices())

    def values(idx: tuple, i: int) -> np.ndarray:
        if os.environ.get("RESUME_BENCH_VALUES") == "random":  # incompressible, as trained weights are
            first, last, _ = idx[0].indices(rows)
            return np.random.default_rng([i, first]).standard_normal((last - first, 1024), np.float32)
        return np.full((rows, 1024), i, np.float32)[idx]

    state = {
        f"w{i}": jax.make_array_from_callback((rows, 1024), sharding, lambda idx, i=i: values(idx, i))
        for i in range(NUM_LEAVES)
    }
    jax.block_until_ready(state)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
    if impl == "reduce":  # one jitted pass over the state, as the layer's JAX fingerprint makes
        import jax.numpy as jnp

        reduce = jax.jit(lambda x: jnp.sum(jax.lax.bitcast_convert_type(x, jnp.uint32), dtype=jnp.uint32))
        for leaf in state.values():
            jax.block_until_ready(reduce(leaf))
        pass_s, pass_cpu_s, pass_sys_s, _ = _clock(
            lambda: jax.block_until_ready([reduce(leaf) for leaf in state.values()])
        )
        return {
            "save_s": pass_s,
            "restore_s": pass_s,
            "save_cpu_s": pass_cpu_s,
            "restore_cpu_s": pass_cpu_s,
            "save_sys_s": pass_sys_s,
            "restore_sys_s": pass_sys_s,
            "extra_rss_bytes": 0,
            "state_bytes": 4 * rows * 1024 * NUM_LEAVES,
        }
    if impl == "remat_kit":
        from remat_kit import resume

        saver = resume.Resumable(directory)

        def save(step):
            saver.save(step, state)
            saver.wait()

        def restore(step):
            return saver.restore(step, abstract)
    else:
        saver = ocp.CheckpointManager(directory)

        def save(step):
            saver.save(step, args=ocp.args.StandardSave(state))
            saver.wait_until_finished()

        def restore(step):
            return saver.restore(step, args=ocp.args.StandardRestore(abstract))

    cell = _timed(save, lambda step: jax.block_until_ready(restore(step)))
    saver.close()
    return {**cell, "state_bytes": sum(v.nbytes for v in state.values())}


def _clock(fn) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds of this process, the system part of them, minor page faults) that
    `fn()` took."""
    start, (user, system, faults) = time.perf_counter(), _cpu_s()
    fn()
    user_end, system_end, faults_end = _cpu_s()
    return time.perf_counter() - start, user_end - user + system_end - system, system_end - system, faults_end - faults


def _timed(save, restore) -> dict:
    """Warm-up save and restore of step 0, then `RESUME_BENCH_SAVES` (default 1) steps timed (wall,
    CPU), each save after an untimed `os.sync()`, with the peak RSS reset before the first: the
    medians over those steps (a training loop saves many times per process: every timed step after
    the first is one of those), and the first timed step's own figures as `first_*`."""
    save(0)  # warm-up: first-call set-up is not what a training run pays per save
    restore(0)
    before = _rss("VmRSS")
    _reset_peak()
    steps = []
    for step in range(1, 1 + int(os.environ.get("RESUME_BENCH_SAVES", "1"))):
        os.sync()  # the previous step's gigabyte written back before this save is timed
        _barrier()
        save_s, save_cpu_s, save_sys_s, save_faults = _clock(lambda: save(step))
        _barrier()
        restore_s, restore_cpu_s, restore_sys_s, restore_faults = _clock(lambda: restore(step))
        # The system part apart: mostly page faults on fresh allocations, whose count varies with the
        # allocator's state from process to process, for the plain libraries as for the layer.
        steps.append(
            {
                "save_s": save_s,
                "restore_s": restore_s,
                "save_cpu_s": save_cpu_s,
                "restore_cpu_s": restore_cpu_s,
                "save_sys_s": save_sys_s,
                "restore_sys_s": restore_sys_s,
                "save_minflt": save_faults,
                "restore_minflt": restore_faults,
            }
        )
    medians = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
    first = {f"first_{key}": value for key, value in steps[0].items()}
    return {**medians, **first, "extra_rss_bytes": _rss("VmHWM") - before}


def _barrier() -> None:
    # Both ranks start each timed phase together, so a rank's time is not the other's start-up.
    dist = sys.modules.get("torch.distributed")  # never imported by a JAX worker for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _worker(argv: list[str]) -> None:
    framework, impl, directory, mib = argv[0], argv[1], Path(argv[2]), int(argv[3])
    distributed = len(argv) > 4  # process id, count, port
    if distributed and framework == "jax":
        import jax

        jax.distributed.initialize(f"localhost:{argv[6]}", num_processes=int(argv[5]), process_id=int(argv[4]))
    if distributed and framework == "torch":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://localhost:{argv[6]}", rank=int(argv[4]), world_size=int(argv[5])
        )
    if framework == "jax":
        result = _jax_cell(impl, directory, mib)
    else:
        # A top-level import: a worker runs as a script, so this file's own folder comes first on
        # its path, before a --baseline tree's `benchmarks` (which may predate the module).
        from resume_bench_torch import torch_cell, torch_fsdp_cell

        result = (torch_fsdp_cell if distributed else torch_cell)(impl, directory, mib, _timed)
    if distributed and framework == "torch":
        dist.barrier()  # both ranks past their last collective before either tears gloo down
        dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _cell(
    framework: str, impl: str, mib: int, processes: int, tree: Path = ROOT, values: str = "random", saves: int = 1
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        devices = 4 // processes if framework == "jax" else 1
        env = {
            **os.environ,
            "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}",  # the layer from `tree`, this worker
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "RESUME_BENCH_VALUES": values,
            "RESUME_BENCH_SAVES": str(saves),
        }
        worker = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        base = [*worker, framework, impl.split("@")[0], f"{tmp}/ckpt", str(mib)]
        port = str(_port())
        argvs = [base] if processes == 1 else [base + [str(i), str(processes), port] for i in range(processes)]
        procs = [
            subprocess.Popen(a, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for a in argvs
        ]
        outs = [p.communicate(timeout=1200)[0] for p in procs]
    results = [json.loads(line[7:]) for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
    if len(results) != processes:
        raise RuntimeError(f"{framework}/{impl} x{processes} failed:\n{outs[0][-2000:]}")
    # The job's time is the slowest process's; its CPU time and extra memory are sums over processes.
    summed = ("cpu", "sys", "rss", "minflt")
    return {
        key: results[0][key]
        if key == "state_bytes"
        else sum(r[key] for r in results)
        if any(part in key for part in summed)
        else max(r[key] for r in results)
        for key in results[0]
    }


CELLS = [
    ("jax", 1, ["orbax", "remat_kit"]),
    ("jax", 2, ["orbax", "remat_kit"]),
    ("torch", 1, ["dcp", "remat_kit"]),
    ("torch", 2, ["dcp", "remat_kit"]),  # FSDP2, sharded DTensor state
]
CELL_NAMES = {"jax1": 0, "jax2": 1, "torch1": 2, "torch2": 3}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--saves", type=int, default=1, help="timed saves and restores per process (their median; `first_*`: the first)"
    )
    parser.add_argument("--cells", nargs="+", choices=sorted(CELL_NAMES), default=sorted(CELL_NAMES))
    parser.add_argument("--baseline", type=Path, help="a tree whose remat_kit is measured too, as 'before'")
    parser.add_argument("--out", default="resume", help="reports/OUT.json and reports/OUT.md")
    parser.add_argument(
        "--values",
        choices=["constant", "random"],
        default="random",
        help="normal noise (incompressible, as trained weights are) or one constant per leaf (Orbax's zstd "
        "compresses it almost for free, so fixed per-save costs dominate)",
    )
    parser.add_argument(
        "--reduce-pass", action="store_true", help="JAX cells: also time one jitted pass over the state"
    )
    args = parser.parse_args()
    # Imported here, not at the top: a worker runs with a --baseline tree's `benchmarks` first on its path.
    from benchmarks._resume_report import splice_generated, summary, write_comparison

    if args.baseline is not None and not (args.baseline / "remat_kit" / "resume").is_dir():
        raise SystemExit(f"--baseline {args.baseline}: no remat_kit/resume/ in it; pass an older checkout")
    cells = [CELLS[CELL_NAMES[name]] for name in sorted(set(args.cells), key=CELL_NAMES.get)]
    default = args.values == "random" and not args.reduce_pass and len(cells) == len(CELLS) and not args.baseline
    if args.out == "resume" and not default:
        # Its table would replace reports/resume.md (and resume.json) with a partial comparison.
        raise SystemExit(
            "--out resume is the default run's report (all cells, random values, no --baseline or "
            "--reduce-pass); pass --out NAME for this run, e.g. --out resume_constant"
        )
    raw: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for framework, processes, impls in cells:
            extra = (["remat_kit@baseline"] if args.baseline else []) + (
                ["reduce"] if args.reduce_pass and framework == "jax" else []
            )
            order = impls + extra
            # Interleaved, in turn first: the one that ran second always ran while the kernel
            # still wrote back the first one's gigabyte (a save's time is mostly system time).
            for impl in order if repeat % 2 == 0 else order[::-1]:
                os.sync()  # and none starts with another's dirty pages to write back
                key = f"{framework} x{processes} {impl}"
                tree = args.baseline if impl.endswith("@baseline") else ROOT
                raw.setdefault(key, []).append(
                    _cell(framework, impl, args.mib, processes, tree, args.values, args.saves)
                )
                print(key, raw[key][-1], flush=True)
    medians = {key: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for key, runs in raw.items()}
    command = " ".join(["python -m benchmarks.resume_bench", *sys.argv[1:]])
    if args.out == "resume":
        command = f"python -m benchmarks.resume_bench --mib {args.mib} --repeats {args.repeats}" + (
            f" --saves {args.saves}" if args.saves != 1 else ""
        )
    (ROOT / "reports" / f"{args.out}.json").write_text(
        json.dumps({"command": command, "medians": medians, "raw": raw}, indent=1)
    )
    if args.out == "resume":
        splice_generated(ROOT / "reports" / "resume.md", summary(command, medians, args.mib, CELLS))
    else:
        write_comparison(ROOT / "reports" / f"{args.out}.md", command, medians, cells, args.mib)


if __name__ == "__main__":
    main()
