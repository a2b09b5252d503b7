"""Resumable data-parallel training with torch.distributed: DDP, or FSDP2 with --fsdp.

    torchrun --nproc-per-node=2 examples/resume_ddp.py --ckpt /tmp/resume_ddp --steps 40
    # stop it (SIGTERM to any rank: all save and exit 75) and run it again: it continues

The model and optimizer state go through torch.distributed.checkpoint's get_state_dict /
set_state_dict. Under DDP the tensors are replicated and rank 0 writes them; under FSDP2 they
are DTensors and every rank writes its shards through DCP, so the job may resume on another
number of ranks. Each rank's data order and dropout RNG are its own (`resume.PerProcess`).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from remat_kit import resume


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same data and initial weights on every rank
    x = torch.randn(512, 16)
    y = x.sum(dim=1, keepdim=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[3]):
            fully_shard(layer)
        trained = fully_shard(model)
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = resume.ShuffledIterator(len(x), batch_size=32, seed=rank)  # this rank's order
    torch.manual_seed(1 + rank)  # this rank's dropout masks

    def state() -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "rank": resume.PerProcess({"data": batches, "rng": resume.GlobalRNG()}),
        }

    with resume.Resumable(args.ckpt, keep=2) as ckpt, resume.PreemptionHandler() as preemption:
        restored = ckpt.restore_latest(state())  # the same step on every rank; loads in place
        start = 0
        if restored is not None:
            step, loaded = restored
            set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
            start = step + 1
            print(f"rank {rank}: resumed from step {step}", flush=True)
        for step in range(start, args.steps):
            index = torch.as_tensor(next(batches))
            loss = torch.nn.functional.mse_loss(trained(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 9:
                ckpt.save(step, state(), metrics={"loss": loss.item()})
            preemption.exit_if_requested(ckpt, step, state())  # a collective: every rank, every step
    print(f"rank {rank}: trained to step {args.steps - 1}", flush=True)
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
