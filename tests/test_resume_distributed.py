"""remat_kit.resume beyond one process: sharded JAX arrays through Orbax as they are, multi-process
JAX (2 processes x 2 CPU devices), torch DDP / FSDP2 on 2 gloo ranks (restored on 2 and on 1).

Each multi-process check is a script under tests/resume_helpers/ started in subprocesses with a
timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")
from remat_kit import resume  # noqa: E402

HELPERS = Path(__file__).resolve().parent / "resume_helpers"
sys.path.insert(0, str(HELPERS))
from launch import finish, free_port, run_ok, start  # noqa: E402


def test_jax_arrays_go_to_orbax_as_they_are_and_carry_a_fingerprint():
    jax = pytest.importorskip("jax")
    import crc32c

    from remat_kit.resume._fingerprint import CRC32C, SUM, fingerprints, part
    from remat_kit.resume._processes import detect
    from remat_kit.resume._writing import encode

    w = jax.numpy.arange(12.0).reshape(3, 4)
    encoded = encode({"w": w, "key": jax.random.key(1), "n": np.ones(2)}, detect())
    assert encoded.jax_arrays["j0"] is w  # no host copy: the array object itself goes to Orbax
    assert list(encoded.arrays) == ["a0"]  # only the numpy array was copied to host
    # On CPU devices the fingerprint is the CRC-32C of the array's C-order bytes.
    assert encoded.fingerprint_kind == CRC32C
    base = fingerprints([w], kind=CRC32C)[0]
    assert base == crc32c.crc32c(np.asarray(w).tobytes())
    assert part(encoded.fingerprints["j0"]) == base  # begun at save, read by the writer thread
    for kind in (CRC32C, SUM):
        base = fingerprints([w], kind=kind)[0]
        for index in np.ndindex(3, 4):  # any single changed element changes the fingerprint
            assert fingerprints([w.at[index].add(1.0)], kind=kind)[0] != base, kind
        assert fingerprints([w.T], kind=kind)[0] != base, kind  # C order
        assert fingerprints([w.reshape(4, 3)], kind=kind)[0] == base, kind


def test_the_crc32c_of_any_split_into_shards_is_the_crc32c_of_the_whole_array():
    import crc32c

    from remat_kit.resume import _crc32c

    rng = np.random.default_rng(2)
    shapes = [(), (0, 3), (7,), (6, 10), (4, 6, 5), (3, 4), (5, 2, 3), (3, 4), (2, 3, 2, 5)]
    dtypes = ["float32", "int8", "float32", "float16", "float32", "float64", "complex64", "bool", "int64"]
    for shape, dtype in zip(shapes, dtypes):
        values = (rng.normal(size=shape) * 100).astype(dtype)
        want = crc32c.crc32c(values.tobytes())
        for _ in range(4):  # boxes as shards are: every dim split in two at a random point
            cuts = [sorted({0, int(rng.integers(0, n + 1)), n}) for n in shape]
            got = _crc32c.of_zeros(values.nbytes)  # process 0's constant
            for box in np.ndindex(*[len(c) - 1 for c in cuts]):
                index = tuple(slice(c[b], c[b + 1]) for c, b in zip(cuts, box))
                start = tuple(c[b] for c, b in zip(cuts, box))
                got ^= _crc32c.box_part(*_crc32c.as_bytes(values[index], start, shape))
            assert got == want, (shape, dtype, cuts)
    # One value (a contiguous box) is shifted in Python ints, many in NumPy: the same arithmetic.
    values = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
    nbytes = rng.integers(0, 2**40, 64, dtype=np.uint64)
    many = _crc32c.shift(values, nbytes)
    assert [_crc32c._shift_one(int(v), int(n)) for v, n in zip(values, nbytes)] == many.tolist()


def test_the_host_fingerprint_of_any_split_into_shards_adds_up_to_the_device_reduction(monkeypatch):
    jax = pytest.importorskip("jax")
    from remat_kit.resume import _fingerprint

    monkeypatch.setattr(_fingerprint, "_BLOCK", 7)  # blocks of rows and of columns, as on large shards
    monkeypatch.setattr(_fingerprint, "_ROW", 2)  # long rows cut into sub-rows, as on large shards
    rng = np.random.default_rng(0)
    dtypes = ["float32", "bfloat16", "float16", "int8", "bool", "uint32", "complex64", "float64", "int64"]
    for dtype in dtypes:
        with jax.enable_x64(np.dtype(jax.numpy.dtype(dtype)).itemsize == 8):
            values = np.asarray(rng.normal(size=(4, 6, 5)) * 100).astype(jax.numpy.dtype(dtype))
            # The device reduction once per dtype (one compile each): NumPy reads the same bits.
            assert _fingerprint.fingerprints([jax.numpy.asarray(values)]) == [
                int(_fingerprint._on_device(jax.numpy.asarray(values)))
            ], dtype
    shapes = [(), (0, 3), (7,), (6, 10), (4, 6, 5), (3, 4), (5, 2, 3)]
    for shape, dtype in zip(shapes, ["float32", "int8", "float32", "float16", "float32", "float64", "complex64"]):
        values = (rng.normal(size=shape) * 100).astype(dtype)
        bits = _fingerprint._host_bits(values, (0,) * len(shape), shape)[0]  # checked against XLA above
        flat = bits.reshape(-1).astype(np.uint64)
        want = int((flat * (2 * np.arange(flat.size, dtype=np.uint64) + 1)).sum() % 2**32)
        # Boxes as shards are: split every dim in two at a random point (a 2x..x2 grid).
        cuts = [sorted({0, int(rng.integers(0, n + 1)), n}) for n in shape]
        got = 0
        for box in np.ndindex(*[len(c) - 1 for c in cuts]):
            index = tuple(slice(c[b], c[b + 1]) for c, b in zip(cuts, box))
            start = tuple(c[b] for c, b in zip(cuts, box))
            got += _fingerprint._box_sum(*_fingerprint._host_bits(values[index], start, shape))
        assert got % 2**32 == want, (shape, cuts)


@pytest.mark.parametrize("kind", ["crc32c", "sum"])
def test_the_restore_fingerprint_split_into_row_pieces_on_threads_matches_the_save_one(monkeypatch, kind):
    # At restore the host fingerprint is cut into row pieces computed by a thread pool (each
    # piece waits for its own shard); the pieces must combine into the save-time value.
    jax = pytest.importorskip("jax")
    from remat_kit.resume import _fingerprint

    monkeypatch.setattr(_fingerprint, "_BLOCK", 7)
    monkeypatch.setattr(_fingerprint, "_PIECE_BYTES", 24)  # a few rows per piece, many pieces
    monkeypatch.setattr(_fingerprint, "_ROW", 5)
    rng = np.random.default_rng(1)
    shapes = [(), (0, 3), (7,), (13, 10), (5, 6, 5), (9, 4)]
    arrays = [
        jax.numpy.asarray((rng.normal(size=shape) * 100).astype(dtype))
        for shape, dtype in zip(shapes, ["float32", "int8", "float32", "float16", "float32", "complex64"])
    ]
    saved = [_fingerprint.part(pending) for pending in _fingerprint.start(arrays, kind)]
    assert len(_fingerprint._pieces(arrays[3])) > 1
    assert _fingerprint.fingerprints(arrays, kind=kind) == saved
    assert _fingerprint.fingerprints(arrays[::-1], kind=kind) == saved[::-1]
    if kind == "crc32c":
        import crc32c

        assert saved == [crc32c.crc32c(np.asarray(x).tobytes()) for x in arrays]


def test_a_save_of_cpu_arrays_runs_no_device_reduction_for_the_fingerprint(tmp_path, monkeypatch):
    # Before, every save ran one jitted pass per JAX array: on CPU slower than Orbax's whole
    # save (reports/resume.md). The fingerprint is now read from the shards' own buffers.
    jax = pytest.importorskip("jax")
    from remat_kit.resume import _fingerprint

    def refuse(x):
        raise AssertionError("device reduction run for a CPU array")

    monkeypatch.setattr(_fingerprint, "_on_device", refuse)
    with resume.Resumable(tmp_path) as ckpt:
        ckpt.save(1, {"w": jax.numpy.arange(12.0).reshape(3, 4)})
        step, state = ckpt.restore_latest()
    assert step == 1 and float(state["w"][2, 3]) == 11.0


def test_a_jax_array_whose_fingerprint_differs_after_restore_is_corrupt_and_skipped(tmp_path):
    jax = pytest.importorskip("jax")
    import json

    with resume.Resumable(tmp_path) as ckpt:
        for step in range(2):
            ckpt.save(step, {"w": jax.numpy.full((4, 4), step, np.float32)})
    path = tmp_path / "1" / "host" / "fingerprints.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: (v + 1) % 2**32 for k, v in saved.items()}))  # same size: the manifest passes
    with resume.Resumable(tmp_path) as ckpt, pytest.warns(resume.CorruptCheckpointWarning, match="fingerprint"):
        step, state = ckpt.restore_latest()
    assert step == 0 and float(state["w"][0, 0]) == 0.0


def test_a_step_saved_with_the_position_weighted_sum_and_no_kind_still_restores_and_is_checked(tmp_path, monkeypatch):
    # Steps saved before the CRC-32C name no fingerprint kind in their metadata: they are SUM.
    jax = pytest.importorskip("jax")
    import json

    from remat_kit.resume import _fingerprint, _inspect

    monkeypatch.setattr(_fingerprint, "kind_for", lambda arrays, everywhere: _fingerprint.SUM)
    with resume.Resumable(tmp_path) as ckpt:
        for step in range(2):
            ckpt.save(step, {"w": jax.numpy.full((4, 4), step + 0.5, np.float32)})
    monkeypatch.undo()
    for step in range(2):
        meta_path = tmp_path / str(step) / _inspect.META_ITEM / "metadata"
        meta = json.loads(meta_path.read_text())
        assert meta.pop("fingerprint") == _fingerprint.SUM
        meta_path.write_text(json.dumps(meta))
        _inspect.seal(tmp_path / str(step))  # as an older layer sealed it
    with resume.Resumable(tmp_path) as ckpt:
        assert float(ckpt.restore(1)["w"][0, 0]) == 1.5
    path = tmp_path / "1" / "host" / "fingerprints.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: (v + 1) % 2**32 for k, v in saved.items()}))
    _inspect.seal(tmp_path / "1")
    with resume.Resumable(tmp_path) as ckpt, pytest.warns(resume.CorruptCheckpointWarning, match="fingerprint"):
        step, state = ckpt.restore_latest()
    assert step == 0 and float(state["w"][0, 0]) == 0.5


def test_a_bit_flipped_in_orbax_data_restores_silently_in_orbax_and_is_caught_by_the_fingerprint(tmp_path):
    # Why the restore-time fingerprint stays: tensorstore checksums OCDBT's own nodes (and zarr3
    # shard indexes), not the chunks' bytes, so Orbax alone returns the changed values.
    jax = pytest.importorskip("jax")
    import orbax.checkpoint as ocp

    values = {step: np.random.default_rng(step).normal(size=(64, 64)).astype(np.float32) for step in range(2)}
    with resume.Resumable(tmp_path) as ckpt:
        for step in range(2):
            ckpt.save(step, {"w": jax.numpy.asarray(values[step])})
    arrays = tmp_path / "1" / "arrays"
    data = max((p for p in arrays.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    data.write_bytes(bytes(flipped))  # same size: the layer's manifest passes
    like = jax.ShapeDtypeStruct((64, 64), np.float32, sharding=jax.numpy.zeros(1).sharding)
    with ocp.StandardCheckpointer() as plain:
        silently = np.asarray(plain.restore(arrays, {"j0": like})["j0"])
    assert silently.shape == (64, 64) and not np.array_equal(silently, values[1])
    with resume.Resumable(tmp_path) as ckpt, pytest.warns(resume.CorruptCheckpointWarning, match="fingerprint"):
        step, state = ckpt.restore_latest()
    assert step == 0 and np.array_equal(np.asarray(state["w"]), values[0])


def test_a_multi_process_jax_restore_takes_three_agreements_and_no_orbax_barrier(tmp_path, monkeypatch):
    # Each agreement is a round trip through JAX's coordinator: the restored arrays' fingerprint
    # parts travel with the agreement on Orbax's read (before: an exchange of their own), and the
    # arrays are read by Orbax's handler, whose Checkpointer would add a device barrier the
    # agreement makes redundant. A 1-process "jax" job with the exchange recorded stands in.
    jax = pytest.importorskip("jax")
    from orbax.checkpoint._src.multihost import multihost

    from remat_kit.resume._processes import Processes
    from remat_kit.resume._reading import read_step

    with resume.Resumable(tmp_path) as ckpt:
        ckpt.save(1, {"w": jax.numpy.arange(12.0).reshape(3, 4), "n": np.ones(2)})
    exchanged, barriers = [], []
    monkeypatch.setattr(Processes, "_gather", lambda self, key, value: exchanged.append(value) or [value])
    monkeypatch.setattr(multihost, "sync_global_processes", lambda *a, **k: barriers.append(a))
    processes = Processes("jax", 0, 1)
    exchanged_names = []
    gather = Processes.gather
    monkeypatch.setattr(
        Processes, "gather", lambda self, value, what="": exchanged_names.append(what) or gather(self, value, what)
    )
    state = read_step(tmp_path / "1", 1, processes=processes)
    assert float(state["w"][2, 3]) == 11.0 and state["n"].tolist() == [1.0, 1.0]
    assert exchanged_names == ["restore of step 1"] * 3 and barriers == []
    # The agreement on the read carries this process's fingerprint part, the one saved.
    assert exchanged[1][1] == [int(json.loads((tmp_path / "1" / "host" / "fingerprints.json").read_text())["j0"])]

    # Arrays on accelerators (stood in for by CPU arrays taken for device ones): a CRC-32C step's
    # check still reads their shards on the host, no collective; a SUM step's (what a save from
    # accelerators writes) is a device collective, so it is exchanged after the agreement, never
    # inside the stage.
    from remat_kit.resume import _fingerprint

    monkeypatch.setattr(_fingerprint, "_on_host", lambda x: False)
    exchanged_names.clear()
    assert float(read_step(tmp_path / "1", 1, processes=processes)["w"][2, 3]) == 11.0
    assert exchanged_names == ["restore of step 1"] * 3
    with monkeypatch.context() as patch:
        patch.setattr(_fingerprint, "kind_for", lambda arrays, everywhere: _fingerprint.SUM)
        with resume.Resumable(tmp_path) as ckpt:
            ckpt.save(2, {"w": jax.numpy.arange(12.0).reshape(3, 4), "n": np.ones(2)})
    exchanged_names.clear()
    assert float(read_step(tmp_path / "2", 2, processes=processes)["w"][2, 3]) == 11.0
    assert exchanged_names == ["restore of step 2"] * 2 + ["the restored arrays' fingerprints", "restore of step 2"]
    for step in (1, 2):
        path = tmp_path / str(step) / "host" / "fingerprints.json"
        path.write_text(json.dumps({k: (v + 1) % 2**32 for k, v in json.loads(path.read_text()).items()}))
        with pytest.raises(resume.CorruptCheckpointError, match="fingerprint"):
            read_step(tmp_path / str(step), step, processes=processes)


@pytest.mark.slow
def test_two_jax_processes_save_one_sharded_checkpoint_and_agree_on_restore_and_corruption(tmp_path):
    # One launch for both checks (process start-up is most of their time): the torn one runs on
    # steps these processes saved but never read.
    port = str(free_port())
    outs = run_ok(
        [[str(HELPERS / "jax_multiprocess.py"), str(tmp_path), str(i), "2", port] for i in range(2)],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    for i, out in enumerate(outs):
        for phase in ("save", "mixed", "torn"):
            assert f"process {i}: {phase} ok" in out, out[-3000:]
    assert [i.status for i in resume.list_steps(tmp_path / "torn")] == ["complete", "complete"]


@pytest.fixture(scope="module")
def torch_two_ranks(tmp_path_factory) -> tuple[Path, list[str]]:
    """One launch of 2 gloo ranks for the DDP / FSDP2 and the async checks (torch_distributed.py's
    save phase runs torch_async.py's check after its own): (directory, each rank's output)."""
    pytest.importorskip("torch")
    directory = tmp_path_factory.mktemp("torch_two_ranks")
    outs = run_ok(
        [[str(HELPERS / "torch_distributed.py"), str(directory), "2", "save", str(rank)] for rank in range(2)], {}
    )
    return directory, outs


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_gloo_ranks_save_together_and_restore_on_two_and_on_one(torch_two_ranks):
    tmp_path, outs = torch_two_ranks
    for rank, out in enumerate(outs):
        assert f"rank {rank}/2: save ok" in out, out[-3000:]
    # FSDP2 shards written by both ranks through torch.distributed.checkpoint, inside the step.
    assert list((tmp_path / "fsdp" / "3" / "host" / "dcp").glob("*.distcp"))
    assert not (tmp_path / "fsdp" / ".staging").exists() or not any((tmp_path / "fsdp" / ".staging").iterdir())
    out = run_ok([[str(HELPERS / "torch_distributed.py"), str(tmp_path), "1", "restore", "0"]], {})[0]
    assert "rank 0/1: restore ok" in out, out[-3000:]


def _start_loop(framework: str, directory: Path, out: Path, port: int, step_sleep: float) -> list[subprocess.Popen]:
    script = str(HELPERS / "dist_train_loop.py")
    argvs = [
        [script, framework, str(directory), str(out), str(rank), "2", str(port), "--step-sleep", str(step_sleep)]
        for rank in range(2)
    ]
    return start(argvs, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})


@pytest.mark.slow
@pytest.mark.parametrize(("framework", "signalled"), [("torch", [1]), ("jax", [0, 1])])
def test_sigterm_to_some_ranks_saves_one_checkpoint_together_and_the_resumed_run_is_bit_identical(
    tmp_path, framework, signalled
):
    if framework == "torch":
        pytest.importorskip("torch")
    reference = finish(_start_loop(framework, tmp_path / "ref", tmp_path / "ref.npz", free_port(), 0.0))
    assert [code for code, _ in reference] == [0, 0], reference[0][1][-3000:] + reference[1][1][-3000:]

    procs = _start_loop(framework, tmp_path / "run", tmp_path / "run.npz", free_port(), 0.25)
    seen = ""
    while "step 3" not in seen:  # mid-run, between two periodic saves (every 3 steps)
        line = procs[0].stdout.readline()
        assert line, "rank 0 ended before step 3"
        seen += line
    for rank in signalled:
        procs[rank].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [code for code, _ in results] == [resume.EXIT_PREEMPTED] * 2, [out[-2000:] for _, out in results]
    infos = resume.list_steps(tmp_path / "run")
    assert infos[-1].status == "complete" and 3 <= infos[-1].step < 9, infos  # one step, saved by both

    resumed = finish(_start_loop(framework, tmp_path / "run", tmp_path / "run.npz", free_port(), 0.0))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    assert f"step {infos[-1].step + 1}" in resumed[0][1] and f"step {infos[-1].step}\n" not in resumed[0][1]
    want, got = np.load(tmp_path / "ref.npz")["params"], np.load(tmp_path / "run.npz")["params"]
    assert want.tobytes() == got.tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_rank_lost_mid_save_makes_the_other_exit_with_collective_error_within_the_timeout(tmp_path, mode):
    pytest.importorskip("torch")
    timeout_s = 5.0
    port = str(free_port())
    procs = start(
        [[str(HELPERS / "torch_rank_lost.py"), str(tmp_path), str(r), port, mode, str(timeout_s)] for r in range(2)]
    )
    # Rank 0 alone (rank 1 is dead, or stuck until killed below). Without the layer's timeout it
    # waited until the launcher ended the job: here until finish() kills it and fails the test.
    code, out = finish(procs[:1], timeout_s=90)[0]
    procs[1].kill()
    procs[1].communicate()
    assert code != 0, out[-3000:]
    line = next((x for x in out.splitlines() if x.startswith("rank 0: CollectiveError after")), None)
    assert line is not None, out[-3000:]
    assert "process 0 of 2" in line and "save of step 1" in line and "collective_timeout=5 s" in line, line
    if mode == "hangs":  # rank 1 is alive: only the timeout can end the wait
        assert "Timed out" in line or "timed out" in line, line
    assert [(i.step, i.status) for i in resume.list_steps(tmp_path)] == [(0, "complete")]


def _jax_process_lost(tmp_path: Path, mode: str, stage: str) -> str:
    """Two JAX processes through resume_helpers/jax_rank_lost.py, process 1 `mode` ("dies" or
    "hangs") at `stage` with collective_timeout=5 s: process 0's CollectiveError line."""
    pytest.importorskip("jax")
    script = str(HELPERS / "jax_rank_lost.py")
    port = str(free_port())
    procs = start(
        [[script, str(tmp_path), str(i), port, mode, "5", stage] for i in range(2)],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    code, out = finish(procs[:1], timeout_s=90)[0]
    procs[1].kill()
    procs[1].communicate()
    assert code != 0, out[-3000:]
    line = next((x for x in out.splitlines() if x.startswith("process 0: CollectiveError after")), None)
    assert line is not None, out[-3000:]
    assert "collective_timeout=5 s" in line, line
    return line


@pytest.mark.slow
def test_a_jax_process_lost_at_the_seal_makes_the_other_raise_collective_error_and_exit(tmp_path):
    # Before collective_timeout the layer's agreements were device collectives with no timeout.
    line = _jax_process_lost(tmp_path, "dies", "seal")
    assert "process 0 of 2" in line and "'seal of step 1'" in line, line


@pytest.mark.slow
def test_a_jax_process_hung_in_orbax_write_makes_the_other_raise_collective_error_within_the_timeout(tmp_path):
    # Before, Orbax's commit barrier waited AsyncOptions' default 20 min for the hung process
    # (alive, so JAX's heartbeat never declared it lost): here until finish() failed the test.
    line = _jax_process_lost(tmp_path, "hangs", "write")
    assert "'commit of step(s) [1]'" in line, line
    assert [i.step for i in resume.list_steps(tmp_path) if i.status != "incomplete"] == [0]


@pytest.mark.slow
def test_torch_async_save_returns_before_the_commit_and_keeps_the_values_of_the_call(torch_two_ranks):
    _, outs = torch_two_ranks  # torch_async.py's check, run by the ranks of the DDP / FSDP2 launch
    for rank, out in enumerate(outs):
        assert f"rank {rank}: async ok" in out, out[-3000:]
