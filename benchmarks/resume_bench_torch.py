"""The torch cells of benchmarks/resume_bench.py (one process; FSDP2 over 2 gloo ranks).

Each cell builds its state, times a save and a restore with `timed` (resume_bench's protocol)
and checks afterwards that the restored state equals the saved one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

NUM_LEAVES = 8  # as in resume_bench


def _torch_values(numel: int, i: int, generator):  # -> torch.Tensor (torch imported lazily)
    import torch

    if os.environ.get("RESUME_BENCH_VALUES") == "random":
        return torch.randn(numel, generator=generator)
    return torch.full((numel,), float(i))


def torch_cell(impl: str, directory: Path, mib: int, timed: Callable) -> dict:
    import torch

    numel = mib * 2**20 // 4 // NUM_LEAVES
    generator = torch.Generator().manual_seed(0)
    state = {f"w{i}": _torch_values(numel, i, generator) for i in range(NUM_LEAVES)}
    template = {k: torch.empty_like(v) for k, v in state.items()}
    if impl == "remat_kit":
        from remat_kit import resume

        # Synchronous like dcp.save: an async save copies torch tensors first (in-place updates).
        saver = resume.Resumable(directory, async_save=False)

        def save(step):
            saver.save(step, state)

        def restore(step):
            saver.restore(step, template)
    else:
        import torch.distributed.checkpoint as dcp

        def save(step):
            dcp.save(state, checkpoint_id=str(directory / str(step)))

        def restore(step):
            dcp.load(template, checkpoint_id=str(directory / str(step)))

    result = timed(save, restore)
    check_equal(template, state)
    return {**result, "state_bytes": sum(v.nbytes for v in state.values())}


def check_equal(got: dict, want: dict) -> None:
    """The restored state is the saved one (outside the timed part): a fast wrong restore is no figure."""
    import torch

    for key, value in want.items():
        a, b = got[key], value
        if hasattr(b, "full_tensor"):  # DTensor: this rank's shard
            a, b = a.to_local(), b.to_local()
        if not torch.equal(a, b):
            raise RuntimeError(f"restored {key} differs from the saved one")


def _fsdp_model(numel: int):
    """NUM_LEAVES bias-free linear layers of `numel` weights each, every layer `fully_shard`ed over the ranks."""
    import torch
    from torch.distributed.fsdp import fully_shard

    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, numel // 1024, bias=False) for _ in range(NUM_LEAVES)))
    with torch.no_grad():
        for i, layer in enumerate(model):
            layer.weight.copy_(_torch_values(numel, i, generator).view_as(layer.weight))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def torch_fsdp_cell(impl: str, directory: Path, mib: int, timed: Callable) -> dict:
    """FSDP2 on gloo: the model's sharded state dict (DTensors, from get_model_state_dict) saved by every
    rank and restored through set_model_state_dict, by the layer or by plain dcp.save / dcp.load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    numel = mib * 2**20 // 4 // NUM_LEAVES
    model = _fsdp_model(numel)
    saved = {k: v.detach().clone() for k, v in get_model_state_dict(model).items()}  # DTensors, this rank's shard
    if impl == "remat_kit":
        from remat_kit import resume

        saver = resume.Resumable(directory, async_save=False)

        def save(step):
            saver.save(step, {"model": get_model_state_dict(model)})

        def restore(step):
            restored = saver.restore(step, {"model": get_model_state_dict(model)})
            set_model_state_dict(model, restored["model"])
    else:

        def save(step):
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(directory / str(step)))

        def restore(step):
            template = {"model": get_model_state_dict(model)}
            dcp.load(template, checkpoint_id=str(directory / str(step)))
            set_model_state_dict(model, template["model"])

    result = timed(save, restore)
    check_equal(get_model_state_dict(model), saved)
    return {**result, "state_bytes": 4 * numel * NUM_LEAVES}  # the whole model, not this rank's shard
