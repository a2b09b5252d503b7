"""A 2-rank resumable training loop with dropout and a sharded, shuffled data iterator.

    python dist_train_loop.py {torch,jax} DIR OUT RANK WORLD PORT [--step-sleep S] [--save-every N] [--num-steps N]

torch: DDP over gloo. jax: `jax.distributed` with 2 CPU devices per process, parameters
replicated over the 4-device global mesh, each process feeding its own shard of the batch.
Each rank reads its own shard of the data in its own shuffled order, and draws its own
dropout masks (torch: the rank's global RNG; jax: a key folded with the process index), both
saved per rank (`resume.PerProcess`). Resumes from DIR, trains to NUM_STEPS, rank 0 writes the
final parameters to OUT (.npz). SIGTERM to any rank: every rank finishes its step, they save
together and exit with `resume.EXIT_PREEMPTED`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from remat_kit import resume

NUM_STEPS = 10
NUM_EXAMPLES, NUM_FEATURES, BATCH = 32, 6, 4  # per rank


def shard(rank: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + rank)  # each rank its own shard of the data
    x = rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32)
    return x, (x.sum(axis=1, keepdims=True) * 0.5).astype(np.float32)


def torch_loop(args: argparse.Namespace, ckpt: resume.Resumable, preemption: resume.PreemptionHandler) -> np.ndarray:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = shard(args.rank)
    data = resume.ShuffledIterator(NUM_EXAMPLES, batch_size=BATCH, seed=args.rank)
    torch.manual_seed(1000 + args.rank)  # each rank its own dropout masks
    state = {
        "model": model,
        "optimizer": optimizer,
        "rank": resume.PerProcess({"data": data, "rng": resume.GlobalRNG()}),
    }
    restored = ckpt.restore_latest(state)
    start = 0 if restored is None else restored[0] + 1
    for step in range(start, args.num_steps):
        index = next(data)
        optimizer.zero_grad()
        loss = ((ddp(torch.from_numpy(x[index])) - torch.from_numpy(y[index])) ** 2).mean()
        loss.backward()
        optimizer.step()
        after_step(args, ckpt, preemption, step, state)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def jax_loop(args: argparse.Namespace, ckpt: resume.Resumable, preemption: resume.PreemptionHandler) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    optimizer = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(NUM_FEATURES, 16)).astype(np.float32) * 0.3,
        "w2": rng.normal(size=(16, 1)).astype(np.float32) * 0.3,
    }
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)

    def loss_fn(p, key, xb, yb):
        h = jnp.tanh(xb @ p["w1"])
        keep = jax.random.bernoulli(key, 0.7, h.shape)  # dropout
        return jnp.mean((jnp.where(keep, h / 0.7, 0.0) @ p["w2"] - yb) ** 2)

    @jax.jit
    def train_step(p, o, key, xb, yb):
        grads = jax.grad(loss_fn)(p, key, xb, yb)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    x, y = shard(args.rank)
    data = resume.ShuffledIterator(NUM_EXAMPLES, batch_size=BATCH, seed=args.rank)
    state = {"params": params, "opt": opt_state, "key": jax.random.key(0), "rank": resume.PerProcess({"data": data})}
    restored = ckpt.restore_latest(state)
    start = 0
    if restored is not None:
        start, state = restored[0] + 1, restored[1]
        data = state["rank"].value["data"]
    for step in range(start, args.num_steps):
        index = next(data)
        xb = jax.make_array_from_process_local_data(batch_sharding, x[index])
        yb = jax.make_array_from_process_local_data(batch_sharding, y[index])
        key, step_key = jax.random.split(state["key"])
        params, opt_state = train_step(state["params"], state["opt"], step_key, xb, yb)
        state = {"params": params, "opt": opt_state, "key": key, "rank": state["rank"]}
        after_step(args, ckpt, preemption, step, state)
    return np.concatenate(
        [np.asarray(v.addressable_data(0)).reshape(-1) for v in (state["params"]["w1"], state["params"]["w2"])]
    )


def after_step(args, ckpt, preemption, step, state) -> None:
    if step % args.save_every == args.save_every - 1:
        ckpt.save(step, state)
    print(f"step {step}", flush=True)
    time.sleep(args.step_sleep)
    preemption.exit_if_requested(ckpt, step, state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["torch", "jax"])
    parser.add_argument("directory")
    parser.add_argument("out")
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("port")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--num-steps", type=int, default=NUM_STEPS)
    args = parser.parse_args()
    if args.framework == "torch":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://localhost:{args.port}", rank=args.rank, world_size=args.world
        )
    else:
        import jax

        jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.world, process_id=args.rank)
    with resume.Resumable(args.directory, keep=2) as ckpt, resume.PreemptionHandler() as preemption:
        print("ready", flush=True)
        final = (torch_loop if args.framework == "torch" else jax_loop)(args, ckpt, preemption)
    if args.rank == 0:
        np.savez(args.out, params=final)
    print("done", flush=True)
    if args.framework == "torch":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
