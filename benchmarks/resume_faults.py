"""kill -9 of one rank during a collective save, N trials per framework (remat_kit.resume).

    python -m benchmarks.resume_faults --trials 10     # writes reports/resume_faults.json

Each trial starts the 2-rank training loop of tests/resume_helpers/dist_train_loop.py (torch:
DDP on gloo; jax: jax.distributed, 2 CPU devices per process) saving after every step, waits a
random time, SIGKILLs one random rank and then the other (what torchrun's agent or a job
scheduler does once a worker dies), and checks from a fresh process:

* `list_steps(DIR)` shows what the kill left: a torn save (Orbax temporary directory or staged
  rank files) is never listed as complete;
* the run resumed from DIR (both ranks, to the end) reports no error and ends with parameters
  bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOOP = ROOT / "tests" / "resume_helpers" / "dist_train_loop.py"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _start(framework: str, directory: Path, out: Path) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    port = _port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(LOOP),
                framework,
                str(directory),
                str(out),
                str(rank),
                "2",
                str(port),
                "--save-every",
                "1",
                "--num-steps",
                "40",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]


def _run(framework: str, directory: Path, out: Path) -> list[int]:
    procs = _start(framework, directory, out)
    for proc in procs:
        proc.communicate(timeout=600)
    return [proc.returncode for proc in procs]


def _trial(framework: str, work: Path, reference: np.ndarray, rng: random.Random) -> dict:
    from remat_kit import resume

    directory, out = work / "ckpt", work / "out.npz"
    procs = _start(framework, directory, out)
    while not (procs[0].stdout.readline() or "step").startswith("step"):
        pass  # training has started: a save follows every step from here
    delay = rng.uniform(0.0, 3.0)
    time.sleep(delay)
    victim = rng.randrange(2)
    procs[victim].send_signal(signal.SIGKILL)
    time.sleep(0.2)
    procs[1 - victim].send_signal(signal.SIGKILL)  # the launcher tears the job down
    for proc in procs:
        proc.communicate()
    listed = [(info.step, info.status) for info in resume.list_steps(directory)] if directory.exists() else []
    staged = sorted(p.name for p in (directory / ".staging").iterdir()) if (directory / ".staging").is_dir() else []
    codes = _run(framework, directory, out)
    final = np.load(out)["params"] if out.exists() else None
    return {
        "framework": framework,
        "victim": victim,
        "delay_s": round(delay, 2),
        "listed_after_kill": listed,
        "staged_after_kill": staged,
        "torn_seen": any(s != "complete" for _, s in listed) or bool(staged),
        "resume_exit_codes": codes,
        "bit_identical": final is not None and final.tobytes() == reference.tobytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "reports" / "resume_faults.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    for framework in args.frameworks:
        with tempfile.TemporaryDirectory() as tmp:
            ref_dir = Path(tmp)
            assert _run(framework, ref_dir / "ref", ref_dir / "ref.npz") == [0, 0]
            reference = np.load(ref_dir / "ref.npz")["params"]
        for _trial_no in range(args.trials):
            with tempfile.TemporaryDirectory() as tmp:
                result = _trial(framework, Path(tmp), reference, rng)
            results.append(result)
            print(json.dumps(result), flush=True)
    summary = {
        f: {
            "trials": sum(r["framework"] == f for r in results),
            "bit_identical": sum(r["bit_identical"] for r in results if r["framework"] == f),
            "resumed_cleanly": sum(r["resume_exit_codes"] == [0, 0] for r in results if r["framework"] == f),
            "torn_seen": sum(r["torn_seen"] for r in results if r["framework"] == f),
        }
        for f in args.frameworks
    }
    Path(args.out).write_text(
        json.dumps(
            {
                "command": "python -m benchmarks.resume_faults " + " ".join(sys.argv[1:]),
                "summary": summary,
                "trials": results,
            },
            indent=1,
        )
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
