"""A rank lost mid-save: `python torch_rank_lost.py DIR RANK PORT {dies,hangs} TIMEOUT_S`.

Two gloo ranks save step 0 together, then save step 1: inside that save, while writing its
PerProcess files, rank 1 kills itself with SIGKILL ("dies") or sleeps ("hangs", a stuck rank
the test kills later). Rank 0 must leave the save with `resume.CollectiveError` within
`collective_timeout=TIMEOUT_S` and exit non-zero; step 0 stays the newest committed step.
Rank 0 also checks that the layer issued no collective on the default process group (its own
gloo group carries them; see remat_kit/resume/_processes.py for the deadlock that avoids).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from remat_kit import resume
from remat_kit.resume import _host_item


def main() -> None:
    directory, rank, port, mode, timeout_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
    dist.init_process_group("gloo", init_method=f"tcp://localhost:{port}", rank=rank, world_size=2)
    on_default: list[str] = []
    for name in ("barrier", "all_gather_object", "all_gather", "broadcast_object_list"):
        original = getattr(dist, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            if kwargs.get("group") in (None, dist.group.WORLD):
                on_default.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, recorded)
    model = torch.nn.Linear(4, 2)
    state = {"model": model, "rank": resume.PerProcess({"data": resume.ShuffledIterator(8, batch_size=2, seed=rank)})}
    with resume.Resumable(directory, collective_timeout=timeout_s) as ckpt:
        ckpt.save(0, state)
        assert not on_default, f"the layer used the default group for {on_default}"
        print(f"rank {rank}: saved step 0", flush=True)
        if rank == 1:
            write_local = _host_item.write_local

            def lost(*args, **kwargs):
                write_local(*args, **kwargs)  # its files half staged, the step not committed
                if mode == "dies":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)

            _host_item.write_local = lost
        started = time.monotonic()
        try:
            ckpt.save(1, state)
        except resume.CollectiveError as error:
            print(f"rank {rank}: CollectiveError after {time.monotonic() - started:.1f} s: {error}", flush=True)
            raise
    print(f"rank {rank}: saved step 1 (unexpected)", flush=True)


if __name__ == "__main__":
    main()
