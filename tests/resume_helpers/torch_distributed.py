"""torch.distributed resume check on gloo (CPU): `python torch_distributed.py DIR WORLD PHASE RANK`,
one process per rank (started by the test, or by `torchrun`-like launchers).

PHASE "save" (WORLD 2): DDP (rank 0 writes the replicated model and optimizer, each rank its
own PerProcess data iterator) and FSDP2 (`fully_shard`: DTensor parameters and Adam state from
`get_state_dict`, written sharded by both ranks through torch.distributed.checkpoint); both
ranks restore and compare with what was saved. PHASE "restore" (WORLD 1 or 2): a fresh job
restores both checkpoints (FSDP2 resharded by DCP onto WORLD ranks) and compares.
The expected full tensors are written by rank 0 to DIR/expected.pt during "save". The save
phase then runs torch_async.py's check of asynchronous saves in DIR/async (one launch for both:
process start-up is most of their time).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from remat_kit import resume


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iterator: resume.ShuffledIterator,
    data: torch.Tensor,
    steps: int,
) -> None:
    for _ in range(steps):
        batch = data[torch.as_tensor(next(iterator))]
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()


def fsdp(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    model, _ = model_and_optimizer(seed)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def full(state: dict) -> dict:
    """Every tensor of a (possibly DTensor) state dict as a full plain tensor."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = full(value)
        elif isinstance(value, torch.Tensor):
            out[key] = value.full_tensor() if hasattr(value, "full_tensor") else value.detach().clone()
        else:
            out[key] = value
    return out


def assert_equal(got, want, path="state") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), (path, sorted(got), sorted(want))
        for key in want:
            assert_equal(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), path
    else:
        assert got == want, (path, got, want)


def save_phase(directory: Path, rank: int, world: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    model, optimizer = model_and_optimizer(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    iterator = resume.ShuffledIterator(32, batch_size=4, seed=rank)  # each rank its own order
    train(ddp, optimizer, iterator, data, 3)
    with resume.Resumable(directory / "ddp") as ckpt:
        assert ckpt.processes.kind == "torch"
        group = ckpt.processes.group
        ckpt.save(3, {"model": model, "optimizer": optimizer, "data": resume.PerProcess(iterator)})
    # close() destroyed the layer's gloo group: left to interpreter exit, its workers' last works
    # could abort the process there (about 1 exit in 15, SIGABRT instead of the exit code).
    try:
        dist.get_process_group_ranks(group)
        raise AssertionError("the layer's gloo group outlived Resumable.close()")
    except KeyError:
        pass
    fresh, fresh_opt = model_and_optimizer(1)
    fresh_it = resume.ShuffledIterator(32, batch_size=4, seed=rank)
    with resume.Resumable(directory / "ddp") as ckpt:
        step, _ = ckpt.restore_latest({"model": fresh, "optimizer": fresh_opt, "data": resume.PerProcess(fresh_it)})
    assert step == 3
    assert_equal(fresh.state_dict(), model.state_dict())
    assert next(fresh_it).tolist() == next(iterator).tolist()

    sharded, sharded_opt = fsdp(0)
    train(sharded, sharded_opt, resume.ShuffledIterator(32, batch_size=4, seed=rank), data, 3)
    model_sd, optim_sd = get_state_dict(sharded, sharded_opt)
    assert any(hasattr(v, "full_tensor") for v in model_sd.values())  # DTensors, not gathered copies
    with resume.Resumable(directory / "fsdp") as ckpt:
        ckpt.save(3, {"model": model_sd, "optim": optim_sd})
    expected = {"model": full(model_sd), "optim": full(optim_sd), "ddp": full(model.state_dict())}
    if rank == 0:
        torch.save(expected, directory / "expected.pt")
    check_fsdp(directory, expected)
    set_state_dict(sharded, sharded_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if world == 2:
        from torch_async import check_async  # this script's folder is on sys.path

        check_async(str(directory / "async"), rank)


def check_fsdp(directory: Path, expected: dict) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    other, other_opt = fsdp(7)
    template = dict(zip(("model", "optim"), get_state_dict(other, other_opt)))
    with resume.Resumable(directory / "fsdp") as ckpt:
        step, restored = ckpt.restore_latest(template)
    assert step == 3
    set_state_dict(other, other_opt, model_state_dict=restored["model"], optim_state_dict=restored["optim"])
    model_sd, optim_sd = get_state_dict(other, other_opt)
    assert_equal(full(model_sd), expected["model"])
    assert_equal(full(optim_sd), expected["optim"])


def restore_phase(directory: Path, rank: int, world: int) -> None:
    expected = torch.load(directory / "expected.pt")
    check_fsdp(directory, expected)
    fresh, fresh_opt = model_and_optimizer(1)
    with resume.Resumable(directory / "ddp") as ckpt:
        ckpt.restore_latest(
            {
                "model": fresh,
                "optimizer": fresh_opt,
                "data": resume.PerProcess(resume.ShuffledIterator(32, batch_size=4, seed=rank)),
            }
        )
    assert_equal(full(fresh.state_dict()), expected["ddp"])


def main(rank: int, world: int, directory: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/init-{phase}-{world}", rank=rank, world_size=world)
    (save_phase if phase == "save" else restore_phase)(Path(directory), rank, world)
    print(f"rank {rank}/{world}: {phase} ok", flush=True)
    dist.barrier()  # both ranks past their last collective before either tears gloo down
    dist.destroy_process_group()


if __name__ == "__main__":
    directory, world, phase, rank = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    os.makedirs(directory, exist_ok=True)
    main(rank, world, directory, phase)
