"""Turn one `save` call into Orbax's Composite args, staging what other torch ranks write.

    arrays  ocp.args.StandardSave(jax arrays as they are)   every JAX process its shards
    host    HostSave (_host_item)                          process 0: shared host arrays;
                                                           each process: its PerProcess part
    meta    ocp.args.JsonSave(spec, metrics, metadata)     process 0

Under torch.distributed only rank 0 runs Orbax, so the files of the other ranks (their
PerProcess parts) and the DTensor shards written by torch.distributed.checkpoint (all ranks)
go to `DIR/.staging/<step>/` first; after a barrier rank 0's host handler moves them into the
step inside Orbax's temporary directory, so they are committed with the step or not at all.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from remat_kit.resume import _codec, _host_item, _inspect
from remat_kit.resume._processes import Processes, detect

log = logging.getLogger("remat_kit.resume")


@dataclasses.dataclass
class Encoded:
    spec: Any
    arrays: dict[str, Any]  # shared host arrays (written by process 0)
    jax_arrays: dict[str, Any]
    dtensors: dict[str, Any]
    local: tuple[list[Any], dict[str, Any]] | None  # (PerProcess specs, their host arrays)
    fingerprints: dict[str, Any]  # JAX array key -> its fingerprint begun (_fingerprint.start)
    fingerprint_kind: str | None  # _fingerprint.CRC32C or SUM; None without JAX arrays


def encode(state: Any, processes: Processes | None = None, *, copy_host: bool = True) -> Encoded:
    """Walks the state: host copies of host arrays, JAX arrays and DTensors kept as they are.
    The JAX fingerprints are begun here (views of CPU shards, or a device reduction dispatched:
    a collective in a multi-process JAX job) and computed by the host item's writer thread,
    alongside Orbax's write. Their kind is agreed by every process (`processes`, default: detected)."""
    encoder = _codec.encode(state, copy_host=copy_host)
    fingerprints: dict[str, Any] = {}
    kind = None
    if encoder.jax_arrays:
        from remat_kit.resume._fingerprint import crc32c_installed, kind_for, start

        arrays = list(encoder.jax_arrays.values())
        processes = processes or detect()
        everywhere = processes.all_true(crc32c_installed(), "whether every process has the crc32c package")
        kind = kind_for(arrays, everywhere)
        fingerprints = dict(zip(encoder.jax_arrays, start(arrays, kind)))
    local = (encoder.local_specs, encoder.local.arrays) if encoder.local is not None else None
    return Encoded(encoder.spec, encoder.arrays, encoder.jax_arrays, encoder.dtensors, local, fingerprints, kind)


def staging_dir(directory: Path, step: int) -> Path:
    return directory / _host_item.STAGING_DIR / str(step)


def clear_staging(directory: Path) -> None:
    """Removes staged files of saves that never committed (a rank died before rank 0's commit)."""
    staging = directory / _host_item.STAGING_DIR
    if staging.is_dir():
        torn = sorted(entry.name for entry in staging.iterdir())
        if torn:
            log.warning(
                "found staged files of uncommitted save(s) of step(s) %s (a rank died mid-save); removing them",
                ", ".join(torn),
            )
        shutil.rmtree(staging, ignore_errors=True)


def _stage(directory: Path, step: int, encoded: Encoded, processes: Processes) -> Path:
    staged = staging_dir(directory, step)
    if processes.is_primary:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    processes.barrier(f"save of step {step}: staging")
    if processes.kind == "torch" and encoded.local is not None:
        _host_item.write_local(staged, processes.index, *encoded.local)
    if encoded.dtensors:
        import torch.distributed.checkpoint as dcp

        # Collective over the default process group: each rank writes the shards it holds.
        dcp.save(encoded.dtensors, checkpoint_id=str(staged / _host_item.DCP_DIR), process_group=processes.group)
    processes.barrier(f"save of step {step}: staged")
    return staged


def save_args(
    directory: Path, step: int, encoded: Encoded, meta: dict[str, Any], processes: Processes
) -> ocp.args.Composite:
    """The Composite args for `CheckpointManager.save` (only used on processes that run Orbax)."""
    meta = {
        **meta,
        "spec": encoded.spec,
        "num_arrays": len(encoded.arrays),
        "num_jax_arrays": len(encoded.jax_arrays),
        "num_processes": processes.count,
        "processes": processes.kind,
        "per_process": encoded.local is not None,
        "dtensors": bool(encoded.dtensors),
        # Processes whose host item stores a part of the JAX fingerprints (they combine).
        "fingerprint_parts": processes.count if processes.kind == "jax" else 1,
        "fingerprint": encoded.fingerprint_kind,
    }
    staged = None
    if processes.kind == "torch" or encoded.dtensors:
        staged = _stage(directory, step, encoded, processes)
    local = encoded.local if processes.kind != "torch" else None  # torch ranks' parts are staged
    items: dict[str, Any] = {
        _inspect.META_ITEM: ocp.args.JsonSave(meta),
        _inspect.HOST_ITEM: _host_item.HostSave(
            shared=encoded.arrays if processes.is_primary else None,
            local=local,
            fingerprints=encoded.fingerprints if processes.kind == "jax" or processes.is_primary else None,
            process_index=processes.index,
            staged=str(staged) if staged and processes.is_primary else None,
        ),
    }
    if encoded.jax_arrays:  # Orbax rejects an empty item ("Found empty item")
        items[_inspect.ARRAYS_ITEM] = ocp.args.StandardSave(encoded.jax_arrays)
    return ocp.args.Composite(**items)
