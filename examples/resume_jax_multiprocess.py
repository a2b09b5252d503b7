"""Resumable multi-process JAX training: every process runs this script, Orbax writes each
array's shards from the processes that hold them, and every process resumes from the same step.

    # on each of N hosts (SLURM: jax.distributed.initialize() alone reads its environment)
    python examples/resume_jax_multiprocess.py --ckpt /shared/ckpt --coordinator HOST0:1234 \
        --num-processes N --process-id I
    # stop it (SIGTERM to any process: all save and exit 75) and run it again: it continues

On one CPU machine, with XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu,
two processes make a 4-device mesh. The first layer's weights are sharded over it, the second
replicated; each process feeds its own shard of every batch, in its own order (`PerProcess`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from remat_kit import resume


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    args = parser.parse_args()

    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    # Auto axes: XLA chooses the layout of intermediates (data-sharded batch times a sharded w1).
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)  # the same initial weights on every process
    params = {
        "w1": jax.device_put(rng.normal(size=(16, 64)).astype(np.float32) * 0.3, NamedSharding(mesh, P(None, "data"))),
        "w2": jax.device_put(rng.normal(size=(64, 1)).astype(np.float32) * 0.3, NamedSharding(mesh, P())),
    }
    optimizer = optax.adam(1e-2)
    batch_sharding = NamedSharding(mesh, P("data"))
    local = np.random.default_rng(100 + jax.process_index())  # this process's shard of the data
    x = local.normal(size=(256, 16)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)
    data = resume.ShuffledIterator(len(x), batch_size=8, seed=jax.process_index())

    def loss_fn(p, key, xb, yb):
        h = jax.nn.relu(xb @ p["w1"])
        keep = jax.random.bernoulli(key, 0.9, h.shape)  # dropout
        return jnp.mean((jnp.where(keep, h / 0.9, 0.0) @ p["w2"] - yb) ** 2)

    @jax.jit
    def train_step(p, o, key, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(p, key, xb, yb)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    state = {
        "params": params,
        "opt": optimizer.init(params),
        "key": jax.random.key(0),
        "rank": resume.PerProcess({"data": data}),
    }
    with resume.Resumable(args.ckpt, keep=2) as ckpt, resume.PreemptionHandler() as preemption:
        restored = ckpt.restore_latest(state)  # into the template's shardings, the same step everywhere
        start = 0
        if restored is not None:
            start, state = restored[0] + 1, restored[1]
            print(f"process {jax.process_index()}: resumed from step {restored[0]}", flush=True)
        for step in range(start, args.steps):
            index = next(state["rank"].value["data"])
            xb = jax.make_array_from_process_local_data(batch_sharding, x[index])
            yb = jax.make_array_from_process_local_data(batch_sharding, y[index])
            key, step_key = jax.random.split(state["key"])
            params, opt_state, loss = train_step(state["params"], state["opt"], step_key, xb, yb)
            state = {**state, "params": params, "opt": opt_state, "key": key}
            if step % 10 == 9:
                ckpt.save(step, state, metrics={"loss": float(loss)})
            preemption.exit_if_requested(ckpt, step, state)  # a collective: every process, every step
    print(f"process {jax.process_index()}: trained to step {args.steps - 1}", flush=True)


if __name__ == "__main__":
    main()
