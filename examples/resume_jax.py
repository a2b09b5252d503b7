"""A resumable JAX/Flax-style training loop: kill it at any moment, run it again, it continues.

    python examples/resume_jax.py --ckpt /tmp/resume_jax --steps 200

Saved every 20 steps and on SIGTERM / SIGINT / SIGUSR1 (exit code 75, see
examples/resume_job.sh). Model parameters, the Adam state, the dropout PRNG key and the data
iterator's position are all in the checkpoint, so the resumed run computes the same bits as an
uninterrupted one.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from remat_kit import resume


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 16)).astype(np.float32)
    y = (x @ rng.normal(size=(16, 1))).astype(np.float32)
    optimizer = optax.adamw(1e-2)

    def loss_fn(params, key, xb, yb):
        h = jax.nn.relu(xb @ params["w1"])
        h = jnp.where(jax.random.bernoulli(key, 0.9, h.shape), h / 0.9, 0.0)  # dropout
        return jnp.mean((h @ params["w2"] - yb) ** 2)

    @jax.jit
    def train_step(state, xb, yb):
        key, dropout_key = jax.random.split(state["key"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], dropout_key, xb, yb)
        updates, opt_state = optimizer.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state, "key": key}, loss

    params = {"w1": jax.random.normal(jax.random.key(1), (16, 64)) * 0.1, "w2": jnp.zeros((64, 1))}
    state = {"params": params, "opt": optimizer.init(params), "key": jax.random.key(0)}
    batches = resume.ShuffledIterator(len(x), batch_size=32, seed=0)

    with resume.Resumable(args.ckpt, keep=3, save_every=20) as ckpt, resume.PreemptionHandler() as preemption:
        # The template gives types, shapes and shardings; `batches` is put back in place.
        restored = ckpt.restore_latest(template={"train": state, "data": batches})
        start = 0
        if restored is not None:
            step, saved = restored
            state, start = saved["train"], step + 1
            print(f"resumed from step {step}")
        loss = jnp.nan
        for step in range(start, args.steps):
            idx = next(batches)
            state, loss = train_step(state, x[idx], y[idx])
            snapshot = {"train": state, "data": batches}
            ckpt.save(step, snapshot, metrics={"loss": float(loss)}, metadata={"lr": 1e-2})
            preemption.exit_if_requested(ckpt, step, snapshot)
        ckpt.save(args.steps - 1, {"train": state, "data": batches}, force=True)  # the final state
    print(f"done at step {args.steps - 1}: last loss {float(loss):.4f}" if start < args.steps else "already done")


if __name__ == "__main__":
    main()
