"""The time constants `auto` plans with on torch: measured on the device the model runs on.

A short microbenchmark (a matmul, an elementwise op over a large tensor, a chain of tiny ops with
autograd recording, and one op per kind a copy's rate misprices: dropout's random draws, the
masked softmax of torch's attention, a layer norm) gives the roofline rates, the per-kind rates
and the per-op dispatch cost every recomputed op pays in eager mode; the memory-bound ones are timed
after a write over the last-level cache (`_evictor`), as a recompute runs them.
`remat_kit._core.calibration` caches the result in the process and on disk
(``REMAT_KIT_CALIBRATE=0`` turns measuring off). Eager CPU recompute of norms, GELU and dropout
costs time that FLOPs do not show (issue 12); these constants are what prices it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

import torch

from remat_kit._core.calibration import Measurement, calibrated_spec
from remat_kit._core.graph import DeviceSpec

REPEATS = 5
WARMUP = 8
COLD_BYTES = 128 * 2**20  # more than the last-level cache of the CPUs we know (32-96 MB)
TINY_OPS = 200  # ops per timed chain of tiny ops
MEASURED = "cold-out"  # the version of what `measure` times (part of the cache key)


def device_of(module: torch.nn.Module | None) -> torch.device:
    """Where `module` runs: its first parameter's (or buffer's) device; CPU when it has none."""
    if module is not None:
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


def default_device(module: torch.nn.Module | None = None) -> DeviceSpec:
    """Calibrated constants for the device `module` runs on (measured once, cached)."""
    dev = device_of(module)
    if dev.type == "cuda":
        kind = f"torch-{torch.__version__}-cuda-{torch.cuda.get_device_name(dev)}"
    else:
        kind = f"torch-{torch.__version__}-{dev.type}-threads{torch.get_num_threads()}"
    # MEASURED names what `measure` times: a cache written by an earlier microbenchmark is not read back.
    return calibrated_spec(f"{kind}-{MEASURED}", lambda: measure(dev))


def _clock(dev: torch.device) -> Callable[[], float]:
    """The clock to time `dev`'s ops by. On a CPU running torch on one thread, that thread's CPU
    time: every op runs on it, so it is the op's time, and other processes on a shared machine do
    not stretch it (wall-clock minima there moved the calibrated rates by 30% between runs). With
    several intra-op threads the work spreads over threads this one does not see: wall clock."""
    if dev.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def _least_seconds(
    fn: Callable[[], object], dev: torch.device, repeats: int = REPEATS, before: Callable[[], object] | None = None
) -> float:
    """Least time of `repeats` calls of `fn` after warm-up; `before` runs ahead of each timed
    call, untimed (`_evictor`)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
    clock = _clock(dev)
    # Warm-up: lazy initialisation, and the allocator's steady state (glibc serves the first
    # few multi-MB outputs from fresh pages, five to ten times slower: first-touch faults a
    # training process that has run a step no longer pays).
    for _ in range(WARMUP):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
            sync(dev)
        start = clock()
        fn()
        sync(dev)
        times.append(clock() - start)
    # The least of a few: load from other processes only ever slows a run down, and the constants
    # are cached on disk, so they should describe the device, not the moment.
    return min(times)


def measure(dev: torch.device) -> Measurement:
    """Least times (of a few runs) of a matmul, a large elementwise op and one tiny op, on `dev`.

    Sizes: big enough that the matmul and the copy run at their rate (tens of MB on CPU, a
    4096-wide bf16 matmul on a GPU), small enough to finish in well under a second."""
    gpu = dev.type == "cuda"
    n = 4096 if gpu else 512
    dtype = torch.bfloat16 if gpu else torch.float32
    with torch.no_grad():
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        matmul_seconds = _least_seconds(lambda: a @ b, dev)
        x = torch.randn((64 if gpu else 1) * 2**20, device=dev)
        xs, evict = _cold_copies(x), _evictor(dev)
        copy_seconds = _least_seconds(lambda: next(xs) * 2.0, dev, before=evict)
    tiny = torch.randn(8, device=dev, requires_grad=True)  # recompute runs with autograd recording

    def chain():
        y = tiny
        for _ in range(TINY_OPS):
            y = y * 1.0
        return y

    op_seconds = _least_seconds(chain, dev) / TINY_OPS
    return Measurement(
        matmul_flops=2.0 * n**3,
        matmul_seconds=matmul_seconds,
        copy_bytes=2.0 * x.numel() * x.element_size(),
        copy_seconds=copy_seconds,
        op_overhead_seconds=op_seconds,
        op_timings=op_timings(dev),
    )


def _cold_copies(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Copies of `x`, in turn, enough that together they overflow a CPU's last-level cache: each
    timed op reads memory it has not touched lately. A recompute reads what the forward saved long
    before, from memory, not cache (a GELU timed on one cache-resident tensor ran at half the time
    it took inside the recompute). On a GPU, `x` alone is larger than its L2."""
    count = 1 if x.device.type == "cuda" else max(2, COLD_BYTES // (x.numel() * x.element_size()))
    return itertools.cycle([x.clone() for _ in range(count)])


def _evictor(dev: torch.device) -> Callable[[], object] | None:
    """On a CPU, what to run before each timed memory-bound op: a write over more than the
    last-level cache, so that the op's output lands in memory the cache no longer holds, as in a
    recompute (each output a fresh allocation, other ops' megabytes in between). Timed back to
    back, the output reuses the buffer just freed, still in cache: a copy then ran at 1.5x and a
    GELU at 1.25x its speed after such a write (reports/step_time_model.md), and the recompute
    ran at the slower one. None on a GPU (outputs go to HBM through a far smaller L2)."""
    if dev.type != "cpu":
        return None
    scratch = torch.empty(COLD_BYTES // 2, dtype=torch.uint8, device=dev)
    return lambda: scratch.fill_(1)


def op_timings(dev: torch.device) -> tuple[tuple[str, float, float], ...]:
    """(op kind or name, bytes read and written as the trace counts them, least seconds) of the
    ops whose time a copy's rate does not describe (reports/step_time_model.md):

    * rng: `bernoulli_` in place, what dropout runs (a mask's random draws are per-element work:
      on a CPU tens of times a copy's time per byte);
    * attention: the masked softmax torch's own attention runs (`_safe_softmax`, the math path of
      `scaled_dot_product_attention`; `softmax` where a release lacks it);
    * norm: `layer_norm` over the last dimension;
    * the activations transformers use, by name (`aten.gelu`, `aten.silu`, `aten.tanh`: GPT-2's
      GELU approximation), whose transcendental functions cost more per element than a copy.

    Random draws use a generator of their own: calibration leaves the default one untouched."""
    gpu = dev.type == "cuda"
    rows, width = (2**14 if gpu else 2**11), 512
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        x = torch.linspace(-4, 4, rows * width, device=dev).reshape(rows, width)
        xs, evict = _cold_copies(x), _evictor(dev)
        weight, bias = torch.ones(width, device=dev), torch.zeros(width, device=dev)
        softmax = getattr(torch.ops.aten, "_safe_softmax", None)
        attention = (lambda: softmax(next(xs), -1)) if softmax is not None else (lambda: next(xs).softmax(-1))
        ops = {
            "attention": attention,
            "norm": lambda: torch.nn.functional.layer_norm(next(xs), (width,), weight, bias),
            "aten.gelu": lambda: torch.nn.functional.gelu(next(xs)),
            "aten.silu": lambda: torch.nn.functional.silu(next(xs)),
            "aten.tanh": lambda: torch.tanh(next(xs)),
            # Last: drawing in place overwrites the copies with zeros and ones.
            "rng": lambda: next(xs).bernoulli_(0.9, generator=gen),
        }
        timed = {op: _least_seconds(fn, dev, before=evict) for op, fn in ops.items()}
    # Every one of these reads one tensor of x's size and writes one (the norm's statistics and
    # parameters are a row's worth, left out).
    num_bytes = 2.0 * x.numel() * x.element_size()
    return tuple((op, num_bytes, seconds) for op, seconds in timed.items())
