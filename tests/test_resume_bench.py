"""benchmarks/resume_bench.py rewrites only its generated part of reports/resume.md."""

from __future__ import annotations

import pytest

from benchmarks import resume_bench
from benchmarks.resume_bench import GENERATED_BEGIN, GENERATED_END, splice_generated


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
    for argv in (["--cells", "jax2"], ["--values", "random"], ["--reduce-pass"]):
        monkeypatch.setattr("sys.argv", ["resume_bench", *argv])
        with pytest.raises(SystemExit, match="pass --out NAME"):  # it replaced resume.md and resume.json
            resume_bench.main()
