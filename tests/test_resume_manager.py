"""Resumable: save/restore, retention (keep, keep_best, last good), corruption fallback, errors, ls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")
from remat_kit import resume  # noqa: E402
from remat_kit.resume import _inspect  # noqa: E402
from remat_kit.resume.__main__ import main as cli_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def state_at(step: int) -> dict:
    return {"w": np.full((4, 8), step, np.float32), "step": step, "name": f"s{step}", "extra": [np.arange(step + 1)]}


def check_state(step: int, state: dict) -> None:
    expected = state_at(step)
    assert state["step"] == step and state["name"] == f"s{step}"
    np.testing.assert_array_equal(state["w"], expected["w"])
    np.testing.assert_array_equal(state["extra"][0], expected["extra"][0])


@pytest.mark.parametrize("async_save", [True, False])
def test_save_then_restore_latest_returns_the_newest_state(tmp_path, async_save):
    with resume.Resumable(tmp_path / "ckpt", async_save=async_save) as ckpt:
        assert ckpt.restore_latest() is None and ckpt.latest_step() is None
        for step in range(3):
            assert ckpt.save(step, state_at(step))
        step, state = ckpt.restore_latest(template=state_at(2))
        assert step == 2 and ckpt.all_steps() == [0, 1, 2]
        check_state(2, state)
        check_state(1, ckpt.restore(1))
    with resume.Resumable(tmp_path / "ckpt") as again:  # a new process sees the same steps
        assert again.latest_step() == 2
        check_state(2, again.restore_latest()[1])


def test_save_every_force_and_step_order(tmp_path):
    with resume.Resumable(tmp_path, save_every=5) as ckpt:
        saved = [step for step in range(12) if ckpt.save(step, state_at(step))]
        assert saved == [0, 5, 10]
        assert ckpt.save(11, state_at(11), force=True) and ckpt.all_steps() == [5, 10, 11]
        assert not ckpt.save(11, state_at(11), force=True)  # already on disk: nothing to do
        with pytest.raises(ValueError, match=r"step=7 is older than the latest saved step 11.*delete\(step\)"):
            ckpt.save(7, state_at(7), force=True)


@pytest.mark.parametrize("keep", [1, 2, 3])
@pytest.mark.parametrize("async_save", [True, False])
def test_keep_retains_exactly_the_newest_steps(tmp_path, keep, async_save):
    with resume.Resumable(tmp_path, keep=keep, async_save=async_save) as ckpt:
        for step in range(6):
            ckpt.save(step, state_at(step))
            ckpt.wait()
            assert ckpt.all_steps() == list(range(max(0, step + 1 - keep), step + 1))
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == list(range(6 - keep, 6))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_never_deletes_the_best_step_even_across_restarts(tmp_path, mode):
    losses = [5.0, 2.0, 4.0, None, 1.5, 3.0, float("nan"), 6.0]  # None: a save without the metric
    sign = 1 if mode == "min" else -1
    for step, loss in enumerate(losses):
        # A new Resumable every step: Orbax must read the metrics back from disk.
        with resume.Resumable(tmp_path, keep=1, keep_best=("val_loss", mode)) as ckpt:
            ckpt.save(step, state_at(step), metrics=None if loss is None else {"val_loss": loss, "acc": 0.5})
            ckpt.wait()
            seen = [(sign * v, s) for s, v in enumerate(losses[: step + 1]) if v is not None and v == v]
            best = min(seen)[1] if seen else None
            assert ckpt.all_steps() == sorted({best, step} - {None}), (step, ckpt.all_steps())
            assert ckpt.best_step() == best
    infos = resume.list_steps(tmp_path)
    assert [i.step for i in infos if i.is_best] == [best]


def test_the_last_good_step_survives_while_newer_ones_are_not_sealed(tmp_path, monkeypatch):
    with resume.Resumable(tmp_path, keep=1, async_save=False) as ckpt:
        ckpt.save(0, state_at(0))
        # Newer saves that never become known good (say verify kept failing) must not evict 0.
        monkeypatch.setattr(_inspect, "seal", lambda step_dir: None)
        for step in (1, 2, 3):
            ckpt.save(step, state_at(step))
        assert ckpt.all_steps() == [0, 3]
        monkeypatch.undo()
        ckpt.save(4, state_at(4))  # 4 is sealed now; the next save may drop 0
        ckpt.save(5, state_at(5))
        assert ckpt.all_steps() == [5]


def _array_files(step_dir: Path) -> list[Path]:
    """JAX arrays: Orbax's data files under arrays/; host arrays: host/*.npy."""
    return [
        p
        for p in step_dir.rglob("*")
        if p.is_file()
        and (("/d/" in p.as_posix() and "arrays" in p.parts) or (p.suffix == ".npy" and "host" in p.parts))
    ]


def _largest_array_file(step_dir: Path) -> Path:
    return max(_array_files(step_dir), key=lambda p: p.stat().st_size)


def corrupt(step_dir: Path, how: str) -> None:
    if how == "truncate":
        path = _largest_array_file(step_dir)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete_meta":
        (step_dir / "meta" / "metadata").unlink()
    elif how == "delete_arrays":
        for path in _array_files(step_dir):
            path.unlink()
    elif how == "flip_bytes_unsealed":  # same size, no manifest: only the CRC32s can tell
        (step_dir / _inspect.MANIFEST_NAME).unlink()
        path = _largest_array_file(step_dir)
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 8):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "torn":  # a kill before the rename: Orbax's temporary directory is left behind
        step_dir.rename(step_dir.with_name(f"{step_dir.name}.orbax-checkpoint-tmp-1234"))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("big", ["numpy", "jax"])
@pytest.mark.parametrize("how", ["truncate", "delete_meta", "delete_arrays", "flip_bytes_unsealed", "torn"])
def test_corrupt_latest_is_reported_and_restore_falls_back_to_the_newest_good_step(tmp_path, how, big, capsys):
    def big_array(step):
        values = np.random.default_rng(step).normal(size=(64, 64))
        return values if big == "numpy" else jax.numpy.asarray(values, np.float32)

    jax = pytest.importorskip("jax")
    with resume.Resumable(tmp_path, keep=3) as ckpt:
        for step in range(3):
            ckpt.save(step, {**state_at(step), "big": big_array(step)})
    corrupt(tmp_path / "2", how)
    assert cli_main(["ls", str(tmp_path), "--verify"]) == 1
    listing = capsys.readouterr().out
    assert "2     " + ("incomplete" if how == "torn" else "corrupt") in listing and "1     complete" in listing

    with resume.Resumable(tmp_path, keep=3) as ckpt:
        if how == "torn":
            result = ckpt.restore_latest()  # Orbax never lists an uncommitted step: no warning needed
        else:
            with pytest.warns(resume.CorruptCheckpointWarning, match="checkpoint step 2 is corrupt"):
                result = ckpt.restore_latest()
        assert result is not None and result[0] == 1
        check_state(1, result[1])
        assert ckpt.save(2, state_at(2))  # training goes on past the bad step
    assert [i.status for i in resume.list_steps(tmp_path, verify=True)] == ["complete"] * 3


def test_async_save_errors_are_raised_at_the_next_call(tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    with resume.Resumable(tmp_path, async_save=True) as ckpt:
        ckpt.save(0, state_at(0))
        ckpt.wait()

        async def disk_full(self, x, directory):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
        assert ckpt.save(1, state_at(1))  # returns before the background write fails
        with pytest.raises(resume.AsyncSaveError, match=r"saving step\(s\) \[1\].*No space left"):
            ckpt.wait()
        monkeypatch.undo()
        ckpt.wait()  # reported once, not at every later call
        step, state = ckpt.restore_latest()
        assert step == 0
        check_state(0, state)
        assert ckpt.save(1, state_at(1))  # the same Resumable can retry
        ckpt.wait()
        assert ckpt.all_steps() == [0, 1]


def test_verify_reads_back_and_seals(tmp_path):
    with resume.Resumable(tmp_path, verify=True) as ckpt:
        ckpt.save(0, state_at(0), metadata={"config": {"lr": 0.1}})
        assert _inspect.is_sealed(tmp_path / "0")
        meta = ckpt.metadata(0)
        assert meta["metadata"] == {"config": {"lr": 0.1}} and "numpy" in meta["versions"] and meta["saved_at"]


def test_bad_arguments_get_errors_that_name_the_argument_and_the_fix(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"directory='.*file' is a file, not a directory"):
        resume.Resumable(a_file)
    with pytest.raises(ValueError, match=r"keep=0 is not allowed; pass an int >= 1"):
        resume.Resumable(tmp_path / "d", keep=0)
    with pytest.raises(ValueError, match=r"keep_best=\('loss', 'median'\).*'min' \| 'max'"):
        resume.Resumable(tmp_path / "d", keep_best=("loss", "median"))
    with pytest.raises(ValueError, match=r"save_every=0"):
        resume.Resumable(tmp_path / "d", save_every=0)
    with resume.Resumable(tmp_path / "d") as ckpt:
        with pytest.raises(ValueError, match=r"step=-1 is not allowed"):
            ckpt.save(-1, {})
        with pytest.raises(TypeError, match=r"metrics\['loss'\]='low'"):
            ckpt.save(0, {}, metrics={"loss": "low"})
        with pytest.raises(TypeError, match=r"metadata=.* must be a JSON-serializable dict"):
            ckpt.save(0, {}, metadata={"when": object()})
        ckpt.save(0, state_at(0))
        ckpt.save(3, state_at(3))
        with pytest.raises(ValueError, match=r"step=2 does not exist in .*; saved steps: \[0, 3\]"):
            ckpt.restore(2)
        with pytest.raises(resume.TemplateMismatchError, match=r"state\['w'\]: saved float32\[4, 8\], template has"):
            ckpt.restore_latest(template={**state_at(0), "w": np.zeros((2, 2), np.float32)})
        assert ckpt.all_steps() == [0, 3]  # a template mistake is not corruption: nothing moved
        ckpt.delete(0)
        assert ckpt.all_steps() == [3]
    with pytest.raises(resume.ResumeError, match="is closed"):
        ckpt.save(4, {})


def test_ls_command_prints_steps_status_metrics_and_best(tmp_path):
    with resume.Resumable(tmp_path / "ck", keep=5, keep_best=("loss", "min")) as ckpt:
        for step, loss in enumerate([3.0, 1.0, 2.0]):
            ckpt.save(step, state_at(step), metrics={"loss": loss})
    result = subprocess.run(
        [sys.executable, "-m", "remat_kit.resume", "ls", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "SIZE", "FILES", "CREATED", "(UTC)", "BEST", "METRICS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"0", "1", "2"} and all("complete" in row for row in rows.values())
    assert "*" in rows["1"] and "*" not in rows["0"] + rows["2"] and "loss=1" in rows["1"]


def test_ls_json_and_exit_codes(tmp_path, capsys):
    assert cli_main(["ls", str(tmp_path / "missing")]) == 2
    (tmp_path / "f").write_text("")
    assert cli_main(["ls", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    with resume.Resumable(tmp_path / "ck") as ckpt:
        ckpt.save(0, state_at(0), metrics={"loss": 1.0})
    capsys.readouterr()
    assert cli_main(["ls", str(tmp_path / "ck"), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["step"] == 0 and entry["status"] == "complete" and entry["sealed"] and entry["num_files"] > 3
    assert entry["metrics"] == {"loss": 1.0} and entry["size_bytes"] > 0


def test_a_plain_orbax_checkpoint_is_refused_not_treated_as_corrupt(tmp_path):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(7, args=ocp.args.StandardSave({"w": np.ones(3)}))
    with resume.Resumable(tmp_path) as ckpt:
        with pytest.raises(resume.ResumeError, match=r"step 7 .* not written by remat_kit.resume.*left untouched"):
            ckpt.restore_latest()
    assert (tmp_path / "7").is_dir() and not (tmp_path / ".corrupt").exists()
    assert [(i.step, i.status) for i in resume.list_steps(tmp_path)] == [(7, "foreign")]


def test_retention_deletes_old_steps_off_the_save_s_path_and_close_waits_for_it(tmp_path, monkeypatch):
    # Unlinking a deleted step's files took 0.3 s per GiB inside the save that applied retention
    # (with every other rank waiting at the next barrier); it now runs on a background thread.
    import threading

    release, started = threading.Event(), threading.Event()
    real_empty = _inspect.empty_trash

    def slow_empty(directory):
        started.set()
        assert release.wait(30)
        real_empty(directory)

    ckpt = resume.Resumable(tmp_path, keep=1, async_save=False)
    monkeypatch.setattr(_inspect, "empty_trash", slow_empty)
    for step in range(3):
        ckpt.save(step, {"w": np.full(1000, step, np.float32)})  # returns with the trash still held
    assert started.is_set() and ckpt.all_steps() == [2]
    release.set()
    ckpt.close()
    assert not any((tmp_path / _inspect.TRASH_DIR).iterdir())
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["2"]
