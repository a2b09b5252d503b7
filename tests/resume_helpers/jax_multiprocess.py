"""Multi-process JAX resume check: `python jax_multiprocess.py DIR PROCESS_ID NUM_PROCESSES PORT`
(XLA_FLAGS=--xla_force_host_platform_device_count=2 each; NUM_PROCESSES=1 with 4 devices works too).

Every process: save a state sharded over the 4-device global mesh (plus a PerProcess iterator
and a PRNG key) at steps 1, 2 and 3 in DIR/saved, restore it into another mesh layout
(resharding), check values, shardings and the per-process part; a template whose sharding
cannot hold a leaf is named in the error on every process. Then, in the same processes, the
same steps saved in DIR/torn and never read there (a process that read a step may hold its
Orbax nodes in tensorstore's cache): a torn shard file of step 2 and a torn PerProcess file of
step 3 written by the last process make every process fall back to step 1 together. Prints
"save ok" then "torn ok" per process.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import jax
import numpy as np

root, process_id, num_processes, port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if num_processes > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id)

from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from remat_kit import resume  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
rows = jax.make_mesh((4,), ("data",))
grid = jax.make_mesh((2, 2), ("x", "y"))


def global_array(values: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def values_at(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.normal(size=(64, 6)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}


def state_at(step: int) -> dict:
    v = values_at(step)
    iterator = resume.ShuffledIterator(16, batch_size=2, seed=process_id)  # each process its own shard order
    for _ in range(step + process_id):
        next(iterator)
    return {
        "params": {
            "w": global_array(v["w"], NamedSharding(rows, P("data", None))),
            "b": global_array(v["b"], NamedSharding(rows, P())),
        },
        "key": jax.random.key(step),
        "step": step,
        "data": resume.PerProcess(iterator),
    }


def template() -> dict:
    return {
        "params": {
            "w": jax.ShapeDtypeStruct((64, 6), np.float32, sharding=NamedSharding(grid, P("y", "x"))),
            "b": jax.ShapeDtypeStruct((4,), np.float32, sharding=NamedSharding(grid, P("x"))),
        },
        "key": jax.random.key(0),
        "step": 0,
        "data": resume.PerProcess(resume.ShuffledIterator(16, batch_size=2, seed=process_id)),
    }


def check(step: int, restored: dict) -> None:
    v = values_at(step)
    for name in ("w", "b"):
        leaf = restored["params"][name]
        assert leaf.sharding == template()["params"][name].sharding, (name, leaf.sharding)
        for shard in leaf.addressable_shards:  # each process checks the shards it holds
            np.testing.assert_array_equal(np.asarray(shard.data), v[name][shard.index])
    assert restored["step"] == step
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(jax.random.key(step)))
    expected = resume.ShuffledIterator(16, batch_size=2, seed=process_id)
    for _ in range(step + process_id):
        next(expected)
    assert next(restored["data"].value).tolist() == next(expected).tolist()


def fingerprint_check() -> None:
    """Each process combines the shards it holds; the parts exchanged equal the device reduction
    (SUM) and the CRC-32C of the whole array's bytes (CRC32C), in every sharding."""
    import crc32c

    from remat_kit.resume import _fingerprint, _processes

    processes = _processes.detect()
    gather = processes.gather if num_processes > 1 else None
    w = values_at(1)["w"]
    for spec in (P("data", None), P("y", "x"), P(None, "x"), P()):
        x = global_array(w, NamedSharding(rows if "data" in spec else grid, spec))
        want = int(np.asarray(_fingerprint._on_device(x).addressable_data(0)))
        assert _fingerprint.fingerprints([x], gather) == [want], spec
        crc = crc32c.crc32c(np.ascontiguousarray(w).tobytes())
        assert _fingerprint.fingerprints([x], gather, _fingerprint.CRC32C) == [crc], spec


def save_phase(directory: Path) -> None:
    fingerprint_check()
    with resume.Resumable(directory, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state_at(step))
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2, 3], ckpt.all_steps()
        got_step, restored = ckpt.restore_latest(template())
        assert got_step == 3
        check(3, restored)

        bad = template()
        bad["params"]["w"] = jax.ShapeDtypeStruct((64, 6), np.float32, sharding=NamedSharding(rows, P(None, "data")))
        try:
            ckpt.restore(2, bad)
        except resume.TemplateMismatchError as error:
            assert "state['params']['w']: the template's sharding" in str(error), str(error)
            assert "cannot hold shape [64, 6]" in str(error), str(error)
        else:
            raise SystemExit("a template sharding that cannot split 6 columns 4 ways was accepted")


def torn_phase(directory: Path) -> None:
    with resume.Resumable(directory, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state_at(step))
    # Step 3: only the last process's own file (its PerProcess part) is cut short, so only that
    # process sees the damage; every process must still fall back together. Step 2: the array
    # data files lose their tail (a kill mid-write on a filesystem without atomic rename).
    if process_id == 0:
        spec = directory / "3" / "host" / f"process_{num_processes - 1}" / "spec.json"
        spec.write_text(spec.read_text()[:20])
        for path in (directory / "2" / "arrays").rglob("*"):
            if path.is_file() and "/d/" in path.as_posix():
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        for step in (2, 3):  # so only reading can tell
            (directory / str(step) / "remat_kit_manifest.json").unlink()
    if num_processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"corrupted {directory}")
    with resume.Resumable(directory, keep=3) as ckpt, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_step, restored = ckpt.restore_latest(template())
        assert got_step == 1, got_step
        check(1, restored)
        messages = [str(w.message) for w in caught]
        assert any("checkpoint step 3 is corrupt" in m for m in messages), messages
        assert any("checkpoint step 2 is corrupt" in m for m in messages), messages
        assert ckpt.all_steps() == [1]
        ckpt.save(2, state_at(2))  # training goes on past the torn steps
        assert ckpt.restore_latest(template())[0] == 2


def mixed_phase(directory: Path) -> None:
    """The last process lacks the crc32c package: every process must write the same kind of
    fingerprint part (they combine only within one kind), so the step is checked as a SUM."""
    import json

    from remat_kit.resume import _fingerprint, _inspect

    if process_id == num_processes - 1:
        _fingerprint.crc32c_installed = lambda: False
    with resume.Resumable(directory) as ckpt:
        ckpt.save(1, state_at(1))
        ckpt.wait()
        meta = json.loads((directory / "1" / _inspect.META_ITEM / "metadata").read_text())
        assert meta["fingerprint"] == _fingerprint.SUM, meta["fingerprint"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a fingerprint mismatch warns and falls back
            got_step, restored = ckpt.restore_latest(template())
        corrupt = [str(w.message) for w in caught if issubclass(w.category, resume.CorruptCheckpointWarning)]
        assert got_step == 1 and not corrupt, (got_step, corrupt)
        check(1, restored)


save_phase(root / "saved")
print(f"process {process_id}: save ok", flush=True)
mixed_phase(root / "mixed")
print(f"process {process_id}: mixed ok", flush=True)
torn_phase(root / "torn")
print(f"process {process_id}: torn ok", flush=True)
