"""Tiny resumable training loops (JAX and PyTorch), each with dropout and a shuffled iterator.

    python tests/resume_helpers/train_loop.py {jax,torch} DIR OUT.npz [--die-after-save STEP]

Resumes from DIR if it holds a checkpoint, trains to NUM_STEPS, writes the final parameters to
OUT.npz. `--die-after-save STEP` SIGKILLs itself right after `save(STEP)` returns (the async
write may or may not have committed). SIGTERM/SIGINT/SIGUSR1 save after the current step and
exit with remat_kit.resume.EXIT_PREEMPTED; `--step-sleep` slows steps so a test can signal it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from remat_kit import resume  # noqa: E402

NUM_STEPS = 12
NUM_EXAMPLES, NUM_FEATURES, BATCH = 48, 8, 8


def dataset() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=(NUM_FEATURES, 1)) + 0.1).astype(np.float32)
    return x, y


def jax_loop(args: argparse.Namespace, x: np.ndarray, y: np.ndarray):
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = optax.adam(1e-2)

    def loss_fn(params, key, xb, yb):
        h = jnp.tanh(xb @ params["w1"])
        keep = jax.random.bernoulli(key, 0.7, h.shape)  # dropout
        h = jnp.where(keep, h / 0.7, 0.0)
        return jnp.mean((h @ params["w2"] - yb) ** 2)

    @jax.jit
    def train_step(state, xb, yb):
        key, dropout_key = jax.random.split(state["key"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], dropout_key, xb, yb)
        updates, opt_state = optimizer.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state, "key": key}, loss

    init = jax.random.normal(jax.random.key(1), (NUM_FEATURES, 16)) * 0.3
    params = {"w1": init, "w2": jnp.zeros((16, 1))}
    state = {"params": params, "opt": optimizer.init(params), "key": jax.random.key(42)}
    batches = resume.ShuffledIterator(NUM_EXAMPLES, batch_size=BATCH, seed=7)

    def run_step(state):
        idx = next(batches)
        return train_step(state, x[idx], y[idx])

    def to_save(state):
        return {"train": state, "data": batches}

    def from_restored(restored):
        return restored["train"]

    def final_params(state):
        return {k: np.asarray(v) for k, v in state["params"].items()}

    return state, to_save, from_restored, run_step, final_params


def torch_loop(args: argparse.Namespace, x: np.ndarray, y: np.ndarray):
    import torch

    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    batches = resume.ShuffledIterator(NUM_EXAMPLES, batch_size=BATCH, seed=7)
    rng = resume.GlobalRNG()  # dropout draws from torch's global RNG
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def run_step(state):
        idx = torch.from_numpy(next(batches))
        loss = torch.mean((model(xt[idx]) - yt[idx]) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return state, loss

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": batches, "rng": rng}
    return (
        state,
        lambda s: s,
        lambda restored: restored,
        run_step,
        lambda s: {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["jax", "torch"])
    parser.add_argument("directory")
    parser.add_argument("out")
    parser.add_argument("--die-after-save", type=int, default=None)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    x, y = dataset()
    loop = jax_loop if args.framework == "jax" else torch_loop
    state, to_save, from_restored, run_step, final_params = loop(args, x, y)
    with resume.Resumable(args.directory, keep=2, save_every=2) as ckpt, resume.PreemptionHandler() as preemption:
        restored = ckpt.restore_latest(template=to_save(state))
        start = 0
        if restored is not None:
            start, state = restored[0] + 1, from_restored(restored[1])
        print(f"start {start}", flush=True)
        for step in range(start, NUM_STEPS):
            state, loss = run_step(state)
            ckpt.save(step, to_save(state), metrics={"loss": float(loss)})
            print(f"step {step}", flush=True)
            if step == args.die_after_save:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(args.step_sleep)
            preemption.exit_if_requested(ckpt, step, to_save(state))
    np.savez(args.out, **final_params(state))


if __name__ == "__main__":
    main()
