"""What a plan costs: integer recompute and offload time per value, as the solvers compare plans.

Recompute time of a value is its roofline time at its op kind's rate plus the device's per-op
launch / dispatch overhead (`DeviceSpec.value_seconds`): on an eager framework a recomputed norm
or GELU costs a dispatch whatever its FLOPs, so a plan of many small recomputes is not free, and
a dropout mask's random draws cost far more than their bytes at copy speed (issue 12).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from remat_kit._core.graph import CostGraph, DeviceSpec
from remat_kit._core.simulate import _OFFLOAD, _RECOMPUTE, _SAVE, needed_and_recomputed


class Costs:
    """Integer recompute / offload costs per value (picoseconds: roofline time plus per-op overhead)."""

    def __init__(self, graph: CostGraph, device: DeviceSpec):
        self.graph = graph
        vals = graph.values
        self.recompute = [round(device.value_seconds(v) * 1e12) for v in vals]
        self.offload = [round(2 * v.num_bytes / device.host_bandwidth * 1e12) for v in vals]

    def of(self, codes: Sequence[int] | Mapping[int, int]) -> tuple[int, int]:
        """(cost, number of recomputed ops) of a decision vector, as the simulator runs it: a full
        one, or a mapping {value index: code} of the values not saved (O(its size): block menus
        price thousands of options on graphs of thousands of values)."""
        if isinstance(codes, Mapping):
            return self._of_sparse(codes)
        needed, recomputed = needed_and_recomputed(self.graph, list(codes))
        cost, ops = 0, 0
        for i in self.graph.activations:
            if recomputed[i]:
                cost += self.recompute[i]
                ops += 1
            elif needed[i] and codes[i] == _OFFLOAD:
                cost += self.offload[i]
        return cost, ops

    def _of_sparse(self, codes: Mapping[int, int]) -> tuple[int, int]:
        graph, vals = self.graph, self.graph.values
        wanted: set[int] = set()  # read by a recomputed value (the simulator's `needed`)
        cost, ops = 0, 0
        for i in sorted((i for i, c in codes.items() if c != _SAVE), reverse=True):  # deps come earlier
            if not vals[i].is_activation or not (graph.is_residual[i] or graph.is_forced[i] or i in wanted):
                continue
            if codes[i] == _RECOMPUTE:
                cost += self.recompute[i]
                ops += 1
                wanted.update(graph.index(d) for d in vals[i].deps)
            elif codes[i] == _OFFLOAD:
                cost += self.offload[i]
        return cost, ops
