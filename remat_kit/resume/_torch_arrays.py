"""torch.Tensor <-> numpy without pickle, keeping the exact dtype (bfloat16, float8) and device.

torch stays optional: nothing here imports it. A tensor can only exist if the user imported
torch, so `sys.modules` tells us whether to look (and restoring a torch tensor imports it).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

# torch dtypes numpy lacks: stored as the ml_dtypes type of the same name (readable by JAX and
# tensorstore), moved between the two frameworks as a same-width integer view.
_VIEW_DTYPES = {
    "bfloat16": "int16",
    "float8_e4m3fn": "uint8",
    "float8_e4m3fnuz": "uint8",
    "float8_e5m2": "uint8",
    "float8_e5m2fnuz": "uint8",
    "float8_e8m0fnu": "uint8",
}
_warned_devices: set[str] = set()


def _torch():
    return sys.modules.get("torch")


def is_tensor(obj: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def is_dtensor(obj: Any) -> bool:
    """A torch.distributed DTensor (FSDP2 parameters and their optimizer state)."""
    torch = _torch()
    if torch is None or not isinstance(obj, torch.Tensor):
        return False
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(obj, dtensor.DTensor)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def is_generator(obj: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Generator)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def to_numpy(tensor: Any, path: str, *, copy: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """`tensor` on the host as numpy (a copy unless `copy=False`), plus what is needed to
    rebuild it exactly."""
    torch = _torch()
    if tensor.is_sparse or tensor.is_quantized or tensor.layout != torch.strided:
        raise TypeError(
            f"{path} is a {tensor.layout} tensor (sparse={tensor.is_sparse}, "
            f"quantized={tensor.is_quantized}); only dense strided tensors can be saved. "
            "Convert it with .to_dense() / .dequantize() before saving."
        )
    name = _dtype_name(tensor.dtype)
    # clone() so the async write never sees later in-place updates of a CPU tensor.
    host = tensor.detach().resolve_conj().resolve_neg().to("cpu", copy=copy).contiguous()
    if name in _VIEW_DTYPES:
        import ml_dtypes

        view = host.view(getattr(torch, _VIEW_DTYPES[name])).numpy()
        array = view.view(getattr(ml_dtypes, name))
    else:
        try:
            array = host.numpy()
        except TypeError as error:
            raise TypeError(
                f"{path} has dtype torch.{name}, which has no numpy equivalent; supported are "
                f"numpy dtypes and {sorted(_VIEW_DTYPES)}. Cast it, e.g. tensor.float()."
            ) from error
    return array, {"kind": "torch", "torch_dtype": name, "device": str(tensor.device)}


def _device(saved: str, template: Any) -> Any:
    torch = _torch()
    if template is not None:
        return template.device
    device = torch.device(saved)
    if device.type == "cuda" and not torch.cuda.is_available():
        if saved not in _warned_devices:
            _warned_devices.add(saved)
            warnings.warn(
                f"a tensor saved on {saved} is restored on cpu because CUDA is not available; "
                "pass a template with tensors on the device you want to choose explicitly",
                stacklevel=4,
            )
        return torch.device("cpu")
    return device


def from_numpy(array: np.ndarray, node: dict[str, Any], template: Any = None) -> Any:
    """Rebuilds a tensor with the saved dtype on the saved device (or the template's device)."""
    import torch  # a torch tensor was saved, so restoring one needs torch

    name = node["torch_dtype"]
    if name in _VIEW_DTYPES:
        # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
        host = torch.from_numpy(np.array(array, copy=True, order="C").view(_VIEW_DTYPES[name]))
        host = host.view(getattr(torch, name))
    else:
        # The array was just read for this restore: share it rather than copy it again.
        own = isinstance(array, np.ndarray) and array.flags.writeable and array.flags.c_contiguous
        host = torch.from_numpy(array if own else np.array(array, copy=True))
    return host.to(_device(node["device"], template))


def host_view(tensor: Any) -> np.ndarray | None:
    """A numpy array sharing `tensor`'s memory (bytes in the saved dtype), or None when the
    tensor is not a plain contiguous CPU tensor (another device, a view with conj/neg bits)."""
    torch = _torch()
    if (
        tensor.device.type != "cpu"
        or not tensor.is_contiguous()
        or tensor.is_conj()
        or tensor.is_neg()
        or tensor.layout != torch.strided
        or is_dtensor(tensor)
    ):
        return None
    name = _dtype_name(tensor.dtype)
    plain = tensor.detach()
    try:
        if name in _VIEW_DTYPES:
            import ml_dtypes

            return plain.view(getattr(torch, _VIEW_DTYPES[name])).numpy().view(getattr(ml_dtypes, name))
        return plain.numpy()
    except (TypeError, RuntimeError):  # no numpy equivalent: the caller copies through a buffer
        return None


def copy_into(tensor: Any, value: Any) -> None:
    with _torch().no_grad():
        tensor.copy_(value)


def module_state(template: Any, keys: list[str] | None) -> Any:
    """`template.state_dict()` when `template` is a torch module whose state has exactly `keys`."""
    torch = _torch()
    if torch is None or keys is None or not isinstance(template, torch.nn.Module):
        return None
    own = template.state_dict()
    return own if list(own) == keys else None


def generator_state(generator: Any) -> tuple[np.ndarray, dict[str, Any]]:
    state = generator.get_state().numpy().copy()
    return state, {"kind": "torch_generator", "device": str(generator.device)}


def generator_from_numpy(array: np.ndarray, node: dict[str, Any], template: Any = None) -> Any:
    import torch

    generator = template if template is not None else torch.Generator(device=_device(node["device"], None))
    generator.set_state(torch.from_numpy(np.array(array, copy=True)))
    return generator


def rng_state() -> dict[str, Any]:
    """torch's global CPU (and, once CUDA is initialized, per-GPU) RNG states; {} without torch."""
    torch = _torch()
    if torch is None:
        return {}
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    import torch

    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
