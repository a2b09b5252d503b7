"""Asynchronous saves under torch.distributed, 2 gloo ranks: `check_async(DIR, RANK)` in ranks
that already joined a process group (torch_distributed.py's save phase calls it, so the check
shares that launch), or `python torch_async.py DIR RANK PORT` on its own.

Rank 0's host writer is slowed down, so a save that returns before its commit is seen: the step
is not on disk yet when `save` returns (a synchronous save commits first). The model is then
updated in place (as an optimizer step does) before the write finishes; after `wait()` every
rank restores the values of the moment of `save`, its own PerProcess part included.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from remat_kit import resume
from remat_kit.resume import _host_item


def check_async(directory: str, rank: int) -> None:
    write_files = _host_item.HostHandler._write_files

    def slow(path, args):
        time.sleep(1.0)
        write_files(path, args)

    _host_item.HostHandler._write_files = staticmethod(slow)
    try:
        _check_async(directory, rank)
    finally:
        _host_item.HostHandler._write_files = staticmethod(write_files)
    print(f"rank {rank}: async ok", flush=True)


def _check_async(directory: str, rank: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = resume.ShuffledIterator(16, batch_size=4, seed=rank)
    next(data)
    state = {"model": model, "rank": resume.PerProcess({"data": data})}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with resume.Resumable(directory, async_save=True, collective_timeout=60) as ckpt:
        ckpt.save(0, state)
        if rank == 0:
            assert not (ckpt.directory / "0").exists(), "save returned after the commit: not asynchronous"
        with torch.no_grad():  # in place, while rank 0's write may still run
            for p in model.parameters():
                p.add_(1.0)
        expected_batch = next(data)
        ckpt.wait()
        fresh = torch.nn.Linear(4, 3)
        other = resume.ShuffledIterator(16, batch_size=4, seed=rank)
        step, _ = ckpt.restore_latest({"model": fresh, "rank": resume.PerProcess({"data": other})})
    assert step == 0
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert list(next(other)) == list(expected_batch)


def main() -> None:
    directory, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://localhost:{port}", rank=rank, world_size=2)
    check_async(directory, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
