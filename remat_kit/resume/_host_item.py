"""The `host` item of a step: the state's host arrays, per-process parts and DTensor shards.

    host/a<k>.npy                 arrays outside PerProcess, written by process 0 only
    host/process_<i>/spec.json    process i's PerProcess parts: their spec and arrays
    host/process_<i>/a<k>.npy
    host/dcp/                     torch.distributed.checkpoint files of the DTensors (all ranks)
    host/fingerprints.json        JAX array key -> process 0's part of its fingerprint
    host/fingerprints_<i>.json    process i's part (multi-process JAX; the parts combine)

An Orbax handler, so the files are written inside Orbax's temporary step directory and become
visible only with Orbax's commit. Files that other ranks wrote before the commit (the DTensor
shards, other torch ranks' PerProcess parts: each torch rank is a separate JAX world, see
`_processes`) are staged in `DIR/.staging/<step>/` and moved in by the handler on rank 0.
Arrays are stored as their raw bytes (`.npy` of uint8, never pickled); dtype and shape live
in the spec, with a CRC32 of the bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from orbax.checkpoint import args as ocp_args
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint import handlers as ocp_handlers

from remat_kit.resume._inspect import HOST_ITEM as HOST_ITEM

DCP_DIR = "dcp"
STAGING_DIR = ".staging"
FINGERPRINTS = "fingerprints.json"


def process_dir(index: int) -> str:
    return f"process_{index}"


def fingerprints_file(index: int) -> str:
    # Process 0's name is the one steps saved before the parts were split hold the whole value in.
    return FINGERPRINTS if index == 0 else f"fingerprints_{index}.json"


def write_arrays(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        np.save(directory / f"{key}.npy", raw, allow_pickle=False)


def read_array(
    directory: Path, key: str, dtype: np.dtype, shape: list[int], out: np.ndarray | None = None
) -> np.ndarray:
    """The array stored as `key`, read into `out` (a C-contiguous array of that dtype and shape,
    e.g. a view of the template's tensor) when given, so no second host copy is made. Raises
    OSError / ValueError on a missing or truncated file."""
    size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    with open(directory / f"{key}.npy", "rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            raw_shape, _, raw_dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            raw_shape, _, raw_dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f"{key}.npy has .npy format version {version}, not 1.0 or 2.0")
        if raw_dtype != np.uint8 or len(raw_shape) != 1:
            raise ValueError(f"{key}.npy holds {raw_dtype}{list(raw_shape)}, not raw bytes")
        if raw_shape[0] != size:
            raise ValueError(f"{key}.npy holds {raw_shape[0]} bytes, {dtype}{shape} needs {size}")
        target = np.empty(shape, dtype) if out is None else out
        # readinto fills the target's own pages: np.load would allocate (and fault in) a new array.
        read = file.readinto(memoryview(target.reshape(-1).view(np.uint8))) if size else 0
        if read != size:
            raise ValueError(f"{key}.npy is truncated: {read} of {size} bytes")
    return target


def write_local(directory: Path, index: int, spec: Any, arrays: dict[str, np.ndarray]) -> None:
    target = directory / process_dir(index)
    write_arrays(target, arrays)
    tmp = target / ".spec.json.tmp"
    tmp.write_text(json.dumps({"spec": spec}))
    os.replace(tmp, target / "spec.json")


def read_local_spec(directory: Path, index: int) -> Any:
    return json.loads((directory / process_dir(index) / "spec.json").read_text())["spec"]


class HostHandler(ocp_handlers.AsyncCheckpointHandler):
    """Writes `HostSave` in Orbax's background thread; restore is `read_array` (plain files)."""

    async def _write(self, directory: Any, args: HostSave) -> None:
        path = Path(str(directory))
        path.mkdir(parents=True, exist_ok=True)
        if args.staged is not None:
            staged = Path(args.staged)
            for entry in sorted(staged.iterdir()):
                os.replace(entry, path / entry.name)
            shutil.rmtree(staged, ignore_errors=True)
        await asyncio.to_thread(self._write_files, path, args)

    @staticmethod
    def _write_files(path: Path, args: HostSave) -> None:
        if args.fingerprints:
            from remat_kit.resume._fingerprint import part

            # On this writer thread, not the training loop's, while Orbax writes the arrays.
            values = {key: part(pending) for key, pending in args.fingerprints.items()}
            (path / fingerprints_file(args.process_index)).write_text(json.dumps(values))
        if args.shared:
            write_arrays(path, args.shared)
        if args.local is not None:
            write_local(path, args.process_index, *args.local)

    async def async_save(self, directory: Any, args: HostSave) -> list[Any]:
        return [
            ocp_future.CommitFutureAwaitingContractedSignals(self._write(directory, args), name="remat_kit_host_save")
        ]

    def save(self, directory: Any, args: HostSave) -> None:
        asyncio.run(self._write(directory, args))

    def restore(self, directory: Any, args: Any = None) -> Any:
        raise NotImplementedError("remat_kit.resume reads the host item with read_array / read_local_spec")

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass


@ocp_args.register_with_handler(HostHandler, for_save=True)
@dataclasses.dataclass
class HostSave(ocp_args.CheckpointArgs):
    """shared: process 0's host arrays (None elsewhere); local: (spec, arrays) of this process's
    PerProcess parts or None; staged: a directory whose entries are moved into the item."""

    shared: dict[str, np.ndarray] | None
    local: tuple[Any, dict[str, np.ndarray]] | None
    process_index: int
    staged: str | None = None
    fingerprints: dict[str, Any] | None = None


@ocp_args.register_with_handler(HostHandler, for_restore=True)
@dataclasses.dataclass
class HostRestore(ocp_args.CheckpointArgs):
    """Registered so Orbax knows the handler both ways; the layer reads the files itself."""
