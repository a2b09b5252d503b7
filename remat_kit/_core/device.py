"""Device time constants: what recomputing an op costs on the device a plan runs on."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remat_kit._core.graph import Value


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Time constants: recomputing an op costs
    ``max(flops / peak_flops, bytes_moved / bandwidth) + op_overhead_seconds``
    (a roofline plus the launch / dispatch cost every op pays, whatever its size), where
    `bandwidth` is the measured rate in `op_bandwidth` of the op by name (the name an adapter
    records as ``Value.meta["op"]``, e.g. ``aten.gelu``), else of its kind (``rng``), else
    `memory_bandwidth`.

    Such rates exist because some ops are neither matmuls nor copies: on a CPU a dropout mask's
    random draws (`bernoulli_`) run tens of times slower per byte than a copy, a masked softmax
    or a GELU several times slower, so a copy-rate roofline prices the recompute of a
    dropout-heavy layer at a fraction of what it takes (reports/step_time_model.md).

    Calibrate per device with `DeviceSpec.calibrated` from a measured matmul, copy, tiny-op
    dispatch and a few named ops; `auto` does that on the device it runs on (the adapters measure,
    the core prices). `host_bandwidth` prices offload (device to host and back).
    """

    name: str = "generic-cpu"
    peak_flops: float = 1.0e11  # FLOP/s
    memory_bandwidth: float = 2.0e10  # bytes/s
    host_bandwidth: float = 1.0e10  # bytes/s, one direction
    op_overhead_seconds: float = 0.0  # per recomputed op: kernel launch, framework dispatch
    # ((op name or OpKind value, bytes/s), ...): ops whose measured rate differs from a copy's
    op_bandwidth: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        self._check_op_bandwidth()
        for field in ("peak_flops", "memory_bandwidth", "host_bandwidth"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"DeviceSpec.{field}={value!r} must be a positive finite number "
                    f"(FLOP/s or bytes/s); pass the measured rate of your device."
                )
        overhead = self.op_overhead_seconds
        if not (isinstance(overhead, (int, float)) and math.isfinite(overhead) and overhead >= 0):
            raise ValueError(
                f"DeviceSpec.op_overhead_seconds={overhead!r} must be a finite number >= 0 "
                f"(seconds each recomputed op costs besides its roofline time)."
            )

    def _check_op_bandwidth(self) -> None:
        # Normalised to a tuple of pairs: a JSON cache hands back lists.
        pairs = tuple((str(k), v) for k, v in dict(self.op_bandwidth).items())
        from remat_kit._core.graph import OpKind  # graph.py imports this module: import at use

        kinds = {k.value for k in OpKind}
        for key, rate in pairs:
            named = key in kinds or "." in key  # an op name carries its namespace: "aten.gelu"
            if not named or not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
                raise ValueError(
                    f"DeviceSpec.op_bandwidth has ({key!r}, {rate!r}): each entry is (op, bytes/s), the op an "
                    f"op name with its namespace ('aten.gelu') or a kind in {sorted(kinds)}, the rate positive "
                    f"and finite."
                )
        object.__setattr__(self, "op_bandwidth", tuple(sorted(pairs)))

    @classmethod
    def preset(cls, name: str) -> DeviceSpec:
        """Datasheet-level constants for common devices; calibrate for real numbers."""
        presets = {
            "generic-cpu": cls(),
            "h100": cls("h100", peak_flops=9.89e14, memory_bandwidth=3.35e12, host_bandwidth=5.0e10),
            "h200": cls("h200", peak_flops=9.89e14, memory_bandwidth=4.8e12, host_bandwidth=5.0e10),
            "a100": cls("a100", peak_flops=3.12e14, memory_bandwidth=2.0e12, host_bandwidth=2.5e10),
        }
        if name not in presets:
            raise ValueError(
                f"DeviceSpec.preset(name={name!r}): unknown device; known: {sorted(presets)}. "
                f"For another device use DeviceSpec.calibrated(...) with measured rates."
            )
        return presets[name]

    @classmethod
    def calibrated(
        cls,
        name: str,
        *,
        matmul_flops: float,
        matmul_seconds: float,
        copy_bytes: float,
        copy_seconds: float,
        host_bandwidth: float | None = None,
        op_overhead_seconds: float = 0.0,
        op_timings: Iterable[tuple[str, float, float]] = (),
    ) -> DeviceSpec:
        """Build constants from a measured matmul (FLOPs, seconds), copy (bytes moved, seconds),
        the time one tiny op takes end to end (`op_overhead_seconds`: launch and dispatch) and,
        and a few ops by name or kind: `op_timings` of (op, bytes it reads and writes, seconds)."""
        op_timings = tuple(op_timings)
        timed = [("matmul_seconds", matmul_seconds), ("copy_seconds", copy_seconds)]
        for label, value in (*timed, *((f"op_timings[{k!r}] seconds", t) for k, _, t in op_timings)):
            if not value > 0:
                raise ValueError(f"DeviceSpec.calibrated({label}={value!r}): must be > 0 seconds.")

        def rate(amount: float, seconds: float) -> float:
            # The measured op paid the overhead too; what is left is its rate.
            return amount / max(seconds - op_overhead_seconds, seconds / 2)

        bandwidth = rate(copy_bytes, copy_seconds)
        return cls(
            name,
            peak_flops=rate(matmul_flops, matmul_seconds),
            memory_bandwidth=bandwidth,
            host_bandwidth=host_bandwidth if host_bandwidth is not None else bandwidth / 4,
            op_overhead_seconds=op_overhead_seconds,
            op_bandwidth=tuple((op, rate(num_bytes, seconds)) for op, num_bytes, seconds in op_timings),
        )

    def seconds(self, flops: float, bytes_moved: float) -> float:
        """Roofline time of an op (no per-op overhead)."""
        return max(flops / self.peak_flops, bytes_moved / self.memory_bandwidth)

    def op_seconds(self, flops: float, bytes_moved: float) -> float:
        """Time to recompute one op of unknown kind: its roofline time plus the per-op overhead."""
        return self.seconds(flops, bytes_moved) + self.op_overhead_seconds

    def value_seconds(self, value: Value) -> float:
        """Time to recompute `value`'s op: the roofline at its op's (else its kind's) rate, plus the
        per-op overhead."""
        return self.named_op_seconds(value.op, value.kind.value, value.flops, value.bytes_moved)

    def named_op_seconds(self, op: str | None, kind: str | None, flops: float, bytes_moved: float) -> float:
        """Time to recompute one op known by name (``aten.gelu``) and kind (an `OpKind` value):
        the roofline at the op's (else its kind's, else a copy's) rate, plus the per-op overhead."""
        rates = self._rates
        bandwidth = rates.get(op) if op is not None else None
        if bandwidth is None:
            bandwidth = rates.get(kind, self.memory_bandwidth) if kind is not None else self.memory_bandwidth
        return max(flops / self.peak_flops, bytes_moved / bandwidth) + self.op_overhead_seconds

    @functools.cached_property
    def _rates(self) -> dict[str, float]:
        return dict(self.op_bandwidth)
