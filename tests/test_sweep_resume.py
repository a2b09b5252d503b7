"""The sweep survives SIGTERM and kill -9 (no row lost or duplicated), records crashing, hanging
and failing cells and goes on, and shards merge into one sweep.

Most cells here are made to fail fast with REMAT_SWEEP_FAULT (the harness's fault injection), so
the tests exercise the sweep's bookkeeping in seconds; one test measures a real cell end to end.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("orbax.checkpoint")
ROOT = pathlib.Path(__file__).resolve().parents[1]
CELLS = dict(strategies=("none", "all", "every_2", "sqrt_n"), steps=2, warmup=1)


@pytest.fixture
def sweep(sweep_run):
    """A sweep of the four cells, every cell made to fail fast unless the test says otherwise."""

    def run(out: pathlib.Path, *extra: str, fault: str = "jax/=error", wait: bool = True, timeout: float = 180):
        return sweep_run(out, *extra, **CELLS, fault=fault, wait=wait, timeout=timeout)

    return run


def rows(out: pathlib.Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def wait_for(done, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll the files the sweep writes until `done()`; fail if the sweep exits first or stalls."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the sweep exited before {what}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g}s"
        time.sleep(0.1)


def wait_for_hang(out: pathlib.Path, proc: subprocess.Popen, n: int) -> None:
    """Until n rows are committed and the hanging cell (every_2) says it hangs in its log."""
    log = out / "logs" / "jax__mlp__tiny__every_2.log"
    wait_for(lambda: (out / "progress" / str(n)).is_dir(), proc, f"{n} committed rows")
    wait_for(lambda: log.is_file() and "hangs now" in log.read_text(errors="replace"), proc, "the hanging cell")


def check_complete(out: pathlib.Path) -> list[dict]:
    got = rows(out)
    ids = [r["cell_id"] for r in got]
    assert ids == [f"jax/mlp/tiny/{s}" for s in ("none", "all", "every_2", "sqrt_n")]  # each once, in order
    return got


def test_sigterm_saves_prints_resume_command_and_resumes(sweep, tmp_path):
    out = tmp_path / "run"
    proc = sweep(out, fault="every_2=hang,jax/=error", wait=False)
    wait_for_hang(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, text
    assert "Resume with:" in text and "python -m benchmarks.sweep --out" in text
    first = rows(out)
    assert [r["cell_id"] for r in first] == ["jax/mlp/tiny/none", "jax/mlp/tiny/all"]
    again = sweep(out)
    assert again.returncode == 0, again.output
    assert "resuming" in again.output and "2 of 4 cells done" in again.output
    done = check_complete(out)
    assert done[:2] == first  # kept, not measured again


def test_kill_9_loses_nothing_and_leaves_no_orphan(sweep, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    proc = sweep(out, fault="every_2=hang,jax/=error", wait=False)
    wait_for_hang(out, proc, 2)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the hanging cell should be running"
    proc.kill()
    proc.communicate()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"cell processes outlived the sweep: {alive}"
    assert sweep(out).returncode == 0
    check_complete(out)


def test_fresh_starts_over_and_other_settings_are_refused(sweep, tmp_path):
    out = tmp_path / "run"
    assert sweep(out).returncode == 0
    assert all(r["status"].startswith("error: RuntimeError: fault injected") for r in rows(out))
    other = sweep(out, "--budgets", "0.4")
    assert other.returncode == 2
    assert "budgets: saved [0.35, 0.5, 0.7], now [0.4]" in other.output and "--fresh" in other.output
    # Measured again, not kept: each cell now fails another way (evidence from the rows, not the clock).
    fresh = sweep(out, "--fresh", fault="jax/=crash")
    assert fresh.returncode == 0, fresh.output
    assert [r["status"] for r in check_complete(out)] == ["crash: SIGSEGV"] * 4


@pytest.mark.slow  # over 10 s in CI's --durations
def test_crash_hang_and_error_are_recorded_and_the_sweep_goes_on(sweep, tmp_path):
    """`none` is measured for real; the other three cells crash, hang past --timeout, and raise."""
    out = tmp_path / "run"
    proc = sweep(out, "--timeout", "20", fault="all=crash,every_2=hang,sqrt_n=error")
    assert proc.returncode == 0
    got = {r["strategy"]: r for r in check_complete(out)}
    assert got["none"]["status"] == "ok"
    assert got["none"]["activation_bytes"] > 0 and got["none"]["flops"] > 0 and got["none"]["grad_ok"]
    assert got["none"]["rss_peak_bytes"] > 0 and got["none"]["step_time_s"] > 0
    assert got["all"]["status"] == "crash: SIGSEGV"
    assert got["every_2"]["status"].startswith("timeout")
    assert got["sqrt_n"]["status"].startswith("error: RuntimeError: fault injected")
    for name in ("results.csv", "report.md", "pareto.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "jax/mlp/tiny/all`: crash: SIGSEGV" in report


def test_shards_merge_into_one_sweep(sweep, tmp_path):
    for k in (1, 2):
        assert sweep(tmp_path / f"s{k}", "--shard", f"{k}/2").returncode == 0
    assert {r["cell_id"] for r in rows(tmp_path / "s1")}.isdisjoint(r["cell_id"] for r in rows(tmp_path / "s2"))
    merge = [sys.executable, "-m", "benchmarks.sweep", "merge"]
    ok = subprocess.run(
        [*merge, str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "all")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    check_complete(tmp_path / "all")
    half = subprocess.run(
        [*merge, str(tmp_path / "s1"), "--out", str(tmp_path / "half")], cwd=ROOT, capture_output=True, text=True
    )
    assert half.returncode == 1 and "missing: jax/mlp/tiny/all" in half.stderr
    twice = subprocess.run(
        [*merge, str(tmp_path / "s1"), str(tmp_path / "s1"), "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert twice.returncode == 2 and "jax/mlp/tiny/none" in twice.stderr
