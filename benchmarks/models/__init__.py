"""Model zoo for the sweep: JAX and PyTorch twins selected by name and size.

    from benchmarks.models import SIZES, config
    cfg = config("gpt", "tiny")          # a plain dict of shapes
    from benchmarks.models import jax_zoo, torch_zoo

Models: `gpt` (pre-LN decoder; JAX scans its layers, `gpt_unrolled` is the same decoder as a
Python loop, which XLA schedules differently), `vit` (encoder on patches), `mlp` (deep residual
MLP chain) and `convnet` (residual conv blocks). Each model is a chain of `num_layers` identical
blocks, the unit every remat strategy in the sweep works on. `tiny` keeps CI fast; `small` and
`medium` are for real comparisons (activations dominate parameters in all of them).
"""

from __future__ import annotations

from typing import Any

MODELS = ("gpt", "gpt_unrolled", "vit", "mlp", "convnet")
TRANSFORMERS = ("gpt", "gpt_unrolled", "vit")  # models with an attention core (attn_core preset)
JAX_ONLY = ("gpt_unrolled",)  # torch executes eagerly: its gpt is already "unrolled"
SIZES = ("tiny", "small", "medium")

_SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "gpt": {
        "tiny": dict(num_layers=4, hidden=64, num_heads=4, seq_len=64, batch=4, vocab=256),
        "small": dict(num_layers=8, hidden=128, num_heads=4, seq_len=256, batch=8, vocab=512),
        "medium": dict(num_layers=12, hidden=256, num_heads=8, seq_len=512, batch=8, vocab=1024),
    },
    "vit": {
        "tiny": dict(num_layers=4, hidden=64, num_heads=4, image=16, patch=4, channels=3, batch=8, classes=10),
        "small": dict(num_layers=8, hidden=128, num_heads=4, image=32, patch=4, channels=3, batch=16, classes=10),
        "medium": dict(num_layers=12, hidden=256, num_heads=8, image=64, patch=4, channels=3, batch=16, classes=100),
    },
    "mlp": {
        "tiny": dict(num_layers=8, hidden=64, expansion=4, batch=64),
        "small": dict(num_layers=16, hidden=256, expansion=4, batch=256),
        "medium": dict(num_layers=32, hidden=512, expansion=4, batch=512),
    },
    "convnet": {
        "tiny": dict(num_layers=4, channels=8, image=16, batch=8, classes=10),
        "small": dict(num_layers=8, channels=32, image=32, batch=16, classes=10),
        "medium": dict(num_layers=12, channels=64, image=64, batch=16, classes=100),
    },
}


def config(model: str, size: str) -> dict[str, Any]:
    """The shapes of `model` at `size` (a fresh dict)."""
    base = "gpt" if model == "gpt_unrolled" else model
    if base not in _SHAPES:
        raise ValueError(f"model={model!r} is not in the zoo; choose one of {', '.join(MODELS)}.")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; choose one of {', '.join(SIZES)}.")
    return dict(_SHAPES[base][size])


def models_for(framework: str) -> tuple[str, ...]:
    """The zoo's model names available in `framework` ("jax" or "torch")."""
    if framework == "jax":
        return MODELS
    if framework == "torch":
        return tuple(m for m in MODELS if m not in JAX_ONLY)
    raise ValueError(f"framework={framework!r} is not allowed; choose 'jax' or 'torch'.")
