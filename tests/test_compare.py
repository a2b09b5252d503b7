"""`python -m benchmarks.compare`: a deliberately worse plan fails the check and is named; a rerun
that differs only by timing noise passes; missing and new cells are listed, never skipped."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys

import pytest

pytest.importorskip("orbax.checkpoint")
ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real reruns on this shared 2-core machine move time/none by up to ~3x on millisecond steps, so the
# comparisons of real runs below judge memory, FLOPs and status only (a time tolerance no noise
# reaches); how time is judged is tested on edited copies of one run, where it is deterministic.
TIME_NOT_JUDGED = ("--time-tol", "1000")
SWEEP = dict(strategies=("none", "all", "sqrt_n"), steps=5, warmup=2)


@pytest.fixture(scope="module")
def run_sweep(sweep_run):
    """A sweep of three cells into `out`, which must end well; returns `out`."""

    def run(out: pathlib.Path, fault: str = "") -> pathlib.Path:
        done = sweep_run(out, **SWEEP, fault=fault, timeout=300)
        assert done.returncode == 0, done.output
        return out

    return run


def compare(base: pathlib.Path, cur: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", str(base), str(cur), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def baseline(run_sweep, tmp_path_factory) -> pathlib.Path:
    return run_sweep(tmp_path_factory.mktemp("base") / "run")


def edited(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    data = json.loads((src / "results.json").read_text())
    edit(data)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "results.json").write_text(json.dumps(data))
    return dst


def test_worse_plan_fails_and_names_the_cell(run_sweep, baseline, tmp_path):
    # The sqrt_n cell measured with no remat at all: what a broken preset or solver would do.
    worse = run_sweep(tmp_path / "worse", fault="sqrt_n=as:none")
    md = tmp_path / "report.md"
    result = compare(baseline, worse, "--md", str(md), *TIME_NOT_JUDGED)
    assert result.returncode == 1, result.stdout
    regressions = result.stdout.split("### Regressions")[1].split("###")[0]
    assert "`jax/mlp/tiny/sqrt_n`: activation +" in regressions
    assert "jax/mlp/tiny/all" not in regressions and "jax/mlp/tiny/none" not in regressions
    assert md.read_text() == result.stdout.rstrip("\n") + "\n"


def _slower(row: dict, factor: float) -> None:
    """The cell's steps `factor` times slower against the `none` steps timed beside them."""
    row["step_time_s"] *= factor
    row["step_time_min_s"] *= factor
    row["step_time_vs_none"] *= factor


def test_rerun_with_only_timing_noise_passes(run_sweep, baseline, tmp_path):
    again = run_sweep(tmp_path / "again")
    # Memory and FLOPs are exact, so equal; the real rerun's time ratios move with machine load.
    real = compare(baseline, again, *TIME_NOT_JUDGED)
    assert real.returncode == 0, real.stdout
    assert "| `jax/mlp/tiny/sqrt_n` | ok | = | = | = |" in real.stdout

    rng = random.Random(0)

    def noisy(data):  # a 3x slower machine, plus +-25% per cell process (its own none too)
        for row in data["rows"]:
            factor = 3.0 * rng.uniform(0.8, 1.25)
            row["step_time_s"] *= factor
            row["step_time_min_s"] *= factor
            row["none_step_time_s"] = row["none_step_time_s"] and row["none_step_time_s"] * factor

    assert compare(baseline, edited(baseline, tmp_path / "noisy", noisy)).returncode == 0

    def slower_all(data):
        for row in data["rows"]:
            if row["strategy"] == "all":
                _slower(row, 3.0)

    slow = compare(baseline, edited(baseline, tmp_path / "slow", slower_all))
    assert slow.returncode == 1 and "`jax/mlp/tiny/all`: time/none" in slow.stdout


def test_missing_new_and_broken_cells_are_listed(baseline, tmp_path):
    def drop_and_add(data):
        data["rows"] = [r for r in data["rows"] if r["strategy"] != "all"]
        data["rows"].append({**data["rows"][0], "cell_id": "jax/mlp/tiny/every_2", "strategy": "every_2"})

    cur = edited(baseline, tmp_path / "cur", drop_and_add)
    result = compare(baseline, cur)
    assert result.returncode == 1
    assert "### Missing from current" in result.stdout and "- `jax/mlp/tiny/all`" in result.stdout
    assert "### New cells" in result.stdout and "- `jax/mlp/tiny/every_2`" in result.stdout
    assert compare(baseline, cur, "--allow-missing").returncode == 0

    def broken(data):
        row = next(r for r in data["rows"] if r["strategy"] == "sqrt_n")
        row.update(status="crash: SIGSEGV", activation_bytes=None)

    result = compare(baseline, edited(baseline, tmp_path / "broken", broken))
    assert result.returncode == 1 and "`jax/mlp/tiny/sqrt_n`: was ok, now crash: SIGSEGV" in result.stdout


def test_bad_input_is_named(baseline, tmp_path):
    result = compare(baseline, tmp_path / "nowhere")
    assert result.returncode == 2 and "nowhere" in result.stderr and "does not exist" in result.stderr
    assert compare(baseline, baseline, "--mem-tol", "-1").returncode == 2


def _bench(path: pathlib.Path, medians: dict[str, float]) -> pathlib.Path:
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    {
                        "name": f"test_step_time[jax-gpt-{s}]",
                        "stats": {"median": m},
                        "extra_info": {"framework": "jax", "model": "gpt", "strategy": s},
                    }
                    for s, m in medians.items()
                ]
            }
        )
    )
    return path


def test_pytest_benchmark_json(tmp_path):
    base = _bench(tmp_path / "base.json", {"none": 0.010, "all": 0.013})
    noisy = _bench(tmp_path / "noisy.json", {"none": 0.020, "all": 0.028})  # a slower machine
    slow = _bench(tmp_path / "slow.json", {"none": 0.010, "all": 0.030})
    assert compare(base, noisy).returncode == 0
    result = compare(base, slow)
    assert result.returncode == 1 and "`test_step_time[jax-gpt-all]` | 1.30 | 3.00 | ❌ regression" in result.stdout


def test_a_slowdown_counts_only_if_the_rerun_confirms_it(baseline, tmp_path):
    def slower_all(data):
        for row in data["rows"]:
            if row["strategy"] == "all":
                _slower(row, 3.0)

    slow = edited(baseline, tmp_path / "slow", slower_all)
    # The rerun is as fast as the baseline: one noisy run, not a regression.
    passed = compare(baseline, slow, "--confirm", str(baseline))
    assert passed.returncode == 0, passed.stdout
    assert "not confirmed by the rerun" in passed.stdout
    # The rerun is slow too: a regression.
    failed = compare(baseline, slow, "--confirm", str(slow))
    assert (
        failed.returncode == 1 and "`jax/mlp/tiny/all`: time/none" in failed.stdout and "on the rerun" in failed.stdout
    )

    def more_memory(data):
        for row in data["rows"]:
            if row["strategy"] == "all":
                row["activation_bytes"] *= 2
                _slower(row, 3.0)

    worse = edited(baseline, tmp_path / "worse", more_memory)
    # Memory is exact: a rerun never excuses it.
    both = compare(baseline, worse, "--confirm", str(baseline))
    assert both.returncode == 1 and "activation +100.0%" in both.stdout
