"""benchmarks/resume_bench.py rewrites only its generated part of reports/resume.md."""

from __future__ import annotations

import json

import pytest

from benchmarks import resume_bench
from benchmarks._resume_report import GENERATED_BEGIN, GENERATED_END, splice_generated


def test_a_default_bench_run_keeps_the_hand_written_sections_of_the_report(tmp_path):
    # Before, a default run wrote the whole file: the root-cause sections written by hand were lost.
    report = tmp_path / "resume.md"
    prose = "## Why the DDP example hung\n\nA GIL deadlock in torch's teardown.\n"
    report.write_text(f"{GENERATED_BEGIN}\n# old table\n{GENERATED_END}\n\n{prose}")
    splice_generated(report, "# new table\n| a |\n")
    assert report.read_text() == f"{GENERATED_BEGIN}\n# new table\n| a |\n{GENERATED_END}\n\n{prose}"
    splice_generated(report, "# newer table\n")  # idempotent in the prose
    assert report.read_text().endswith(f"{GENERATED_END}\n\n{prose}") and "new table" not in report.read_text()

    fresh = tmp_path / "other.md"  # no markers yet: the generated part goes first, the text after it
    fresh.write_text(prose)
    splice_generated(fresh, "# table\n")
    assert fresh.read_text() == f"{GENERATED_BEGIN}\n# table\n{GENERATED_END}\n\n{prose}"


def test_a_partial_run_is_refused_the_default_report_before_it_measures_anything(monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(resume_bench, "_cell", measured)
    for argv in (["--cells", "jax2"], ["--values", "constant"], ["--reduce-pass"]):
        monkeypatch.setattr("sys.argv", ["resume_bench", *argv])
        with pytest.raises(SystemExit, match="pass --out NAME"):  # it replaced resume.md and resume.json
            resume_bench.main()


def _medians(ratio_save: float) -> dict:
    row = {"save_s": 1.0, "restore_s": 1.0, "save_cpu_s": 1.0, "restore_cpu_s": 1.0, "extra_rss_bytes": 0}
    row["state_bytes"] = 2**30
    return {"torch x2 dcp": row, "torch x2 remat_kit": {**row, "save_s": ratio_save}}


def test_the_headline_names_every_cell_over_the_issue_s_limit_and_the_constant_values_run(tmp_path):
    from benchmarks._resume_report import summary

    cells = [("torch", 2, ["dcp", "remat_kit"])]
    side = tmp_path / "resume_constant.json"
    text = summary("cmd", _medians(1.25), 1024, cells, side=side)
    assert "Over 1.10x: torch, 2 processes, vs dcp: save wall 1.25x." in text
    assert "one constant per leaf" not in text  # no side run yet: no side line
    side.write_text(json.dumps({"command": "cmd --values constant", "medians": _medians(1.5)}))
    text = summary("cmd", _medians(1.05), 1024, cells, side=side)
    assert "Over 1.10x: none." in text
    assert "`cmd --values constant`" in text and "torch x2 save 1.50 (CPU 1.00)" in text


def test_a_bench_cell_refuses_a_restore_that_differs_from_the_save():
    # A fast restore of the wrong bytes is no figure: every cell compares after its timed part.
    import torch

    from benchmarks.resume_bench_torch import check_equal

    saved = {"w0": torch.arange(4.0)}
    check_equal({"w0": torch.arange(4.0)}, saved)
    with pytest.raises(RuntimeError, match="restored w0 differs"):
        check_equal({"w0": torch.zeros(4)}, saved)


@pytest.mark.slow
def test_the_two_process_fsdp2_cell_saves_and_restores_through_both_implementations():
    # The FSDP2 cell (issue 13 item 7): 2 gloo ranks, sharded DTensor state, the layer and plain DCP.
    for impl in ("dcp", "remat_kit"):
        result = resume_bench._cell("torch", impl, 1, 2)
        assert result["state_bytes"] == 2**20  # the whole model, counted once
        assert min(result[m] for m in ("save_s", "restore_s", "save_cpu_s", "restore_cpu_s")) > 0
        # the system part of the CPU time is kept apart (reports/resume.md reads it), summed like the whole
        assert (
            0 <= result["save_sys_s"] <= result["save_cpu_s"]
            and 0 <= result["restore_sys_s"] <= result["restore_cpu_s"]
        )
        # minor page faults, a count summed over both ranks (a key error if the cell lost them)
        assert result["save_minflt"] >= 0 and result["restore_minflt"] >= 0
