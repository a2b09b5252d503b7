"""The CI gate's time check reads the ratio each cell measured interleaved with `none` in its own
process, not fastest steps from different processes (issue 12, truthful time in the harness)."""

from __future__ import annotations

from benchmarks.compare import compare_sweeps


def _rows(vs_none: float | None, fastest: float) -> dict[str, dict]:
    group = "torch/gpt/tiny"
    common = dict(status="ok", grad_ok=True, activation_bytes=100, peak_bytes=200, flops=1000)
    return {
        f"{group}/none": dict(common, step_time_min_s=1.0, step_time_s=1.0, step_time_vs_none=None),
        f"{group}/all": dict(common, step_time_min_s=fastest, step_time_s=fastest, step_time_vs_none=vs_none),
    }


def _time_verdict(base: dict, cur: dict) -> tuple[str, list[str]]:
    verdicts, missing, new = compare_sweeps(base, cur, mem_tol=0.001, time_tol=0.5)
    (v,) = [v for v in verdicts if v.cell.endswith("/all")]
    assert not missing and not new
    return v.cells.get("time", ""), v.regressions


def test_the_interleaved_ratio_decides_where_both_runs_have_it():
    # The `all` process's fastest step looks 3x `none`'s (another process's, under other load),
    # but timed against `none` in its own process it is 1.2x both times: no regression.
    text, regressions = _time_verdict(_rows(1.2, 1.3), _rows(1.2, 3.9))
    assert text == "1.20→1.20" and regressions == []
    # And a real slowdown measured interleaved is one, whatever the fastest steps say.
    text, regressions = _time_verdict(_rows(1.2, 1.3), _rows(2.0, 1.3))
    assert text == "1.20→2.00" and regressions == ["time/none 1.20→2.00"]


def test_a_baseline_without_the_interleaved_ratio_compares_fastest_steps_on_both_sides():
    text, regressions = _time_verdict(_rows(None, 1.3), _rows(1.2, 3.9))
    assert text == "1.30→3.90" and regressions == ["time/none 1.30→3.90"]
