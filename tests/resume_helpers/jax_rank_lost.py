"""A JAX process lost mid-save: `python jax_rank_lost.py DIR PROCESS PORT {dies,hangs} TIMEOUT_S WHERE`.

Two processes (2 CPU devices each) save step 0 of a state sharded over the 4-device mesh, then
step 1: process 1 kills itself with SIGKILL ("dies") or sleeps ("hangs") at WHERE, "write" (in
Orbax's background write, writing its PerProcess part: process 0 then waits at Orbax's commit
barrier) or "seal" (at the layer's seal barrier, after Orbax committed). Process 0 must leave
with an error within bounded time and exit non-zero; step 0 stays the newest committed step.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import jax
import numpy as np

from remat_kit import resume
from remat_kit.resume import _host_item


def main() -> None:
    directory, index, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    timeout_s, where = float(sys.argv[5]), sys.argv[6]
    # A short heartbeat: JAX's own shutdown at exit waits for a lost task until it times out.
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=index, heartbeat_timeout_seconds=10)
    mesh = jax.make_mesh((4,), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    w = jax.make_array_from_callback((8, 4), sharding, lambda idx: np.arange(32.0).reshape(8, 4)[idx])
    state = {"w": w, "rank": resume.PerProcess({"data": resume.ShuffledIterator(8, batch_size=2, seed=index)})}
    with resume.Resumable(directory, collective_timeout=timeout_s) as ckpt:
        ckpt.save(0, state)
        ckpt.wait()
        print(f"process {index}: saved step 0", flush=True)

        def lose() -> None:
            if mode == "dies":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)

        if index == 1 and where == "write":
            write_local = _host_item.write_local

            def lost(*args, **kwargs):
                write_local(*args, **kwargs)
                lose()

            _host_item.write_local = lost
        elif index == 1:
            barrier = ckpt.processes.barrier

            def lost_at_seal(what: str) -> None:
                if what.startswith("seal"):
                    lose()
                barrier(what)

            ckpt.processes.barrier = lost_at_seal
        started = time.monotonic()
        try:
            ckpt.save(1, state)
            ckpt.wait()
        except resume.CollectiveError as error:
            print(f"process {index}: CollectiveError after {time.monotonic() - started:.1f} s: {error}", flush=True)
            if mode == "hangs":  # JAX's shutdown at exit would wait for the hung peer: what a launcher ends
                os._exit(1)
            raise
    print(f"process {index}: saved step 1 (unexpected)", flush=True)


if __name__ == "__main__":
    main()
