"""A resumable PyTorch training loop: kill it at any moment, run it again, it continues.

    python examples/resume_torch.py --ckpt /tmp/resume_torch --steps 200

Model, optimizer and LR scheduler are saved through their state_dicts (as arrays, no pickle);
`GlobalRNG` carries torch's (and Python's and NumPy's) global RNG so dropout masks continue
the same stream; the `ShuffledIterator` resumes at the exact next batch.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from remat_kit import resume


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(1024, 16)).astype(np.float32))
    y = x @ torch.from_numpy(rng.normal(size=(16, 1)).astype(np.float32))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    batches = resume.ShuffledIterator(len(x), batch_size=32, seed=0)
    # Objects with state_dict()/get_state() are saved through them and loaded back in place.
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": batches, "rng": resume.GlobalRNG()}

    with resume.Resumable(args.ckpt, keep=3, save_every=20) as ckpt, resume.PreemptionHandler() as preemption:
        restored = ckpt.restore_latest(template=state)
        start = 0 if restored is None else restored[0] + 1
        if restored is not None:
            print(f"resumed from step {restored[0]}")
        loss = torch.tensor(float("nan"))
        for step in range(start, args.steps):
            idx = torch.from_numpy(next(batches))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            ckpt.save(step, state, metrics={"loss": loss.item()})
            preemption.exit_if_requested(ckpt, step, state)
        ckpt.save(args.steps - 1, state, force=True)
    print(f"done at step {args.steps - 1}: last loss {loss.item():.4f}" if start < args.steps else "already done")


if __name__ == "__main__":
    main()
