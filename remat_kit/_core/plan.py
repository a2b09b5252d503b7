"""The plan: for every activation SAVE / RECOMPUTE / OFFLOAD, as frozen, JSON-serializable data."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from typing import Any

from remat_kit._core.graph import CostGraph

SCHEMA_VERSION = 1


class Decision(str, enum.Enum):
    SAVE = "save"  # keep it from the forward until its backward use
    RECOMPUTE = "recompute"  # drop it after the forward, recompute at its block's backward
    OFFLOAD = "offload"  # move it to host memory after the forward, bring it back for the backward


class DecisionCode(enum.IntEnum):
    """A decision as the simulator, the solvers and the adapters index it: one small int per value in
    arrays and menus. The one map between codes and `Decision`; an IntEnum, so a code compares and
    indexes as the int it is."""

    SAVE = 0
    RECOMPUTE = 1
    OFFLOAD = 2

    @property
    def decision(self) -> Decision:
        return Decision[self.name]

    @classmethod
    def of(cls, decision: Decision | str) -> DecisionCode:
        """The code of a decision (or of its string value, as plans serialize it)."""
        return cls[Decision(decision).name]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do with every activation of one cost graph, with the predictions that justify it.

    `decisions` maps stable value names to a Decision; a value not listed is SAVE. Predictions
    come from the exact simulator (`remat_kit.simulate`) for the graph the plan was solved on.
    """

    decisions: tuple[tuple[str, Decision], ...]
    block_names: tuple[str, ...] = ()
    segments: tuple[tuple[str, ...], ...] = ()  # model blocks per checkpointed unit; () = one per block
    graph_fingerprint: str = ""
    predicted_peak_bytes: int = 0
    predicted_activation_bytes: int = 0
    baseline_activation_bytes: int = 0
    predicted_recompute_flops: int = 0
    predicted_recompute_seconds: float = 0.0
    # The step time over no remat, where an adapter predicts more than the recompute (eager torch:
    # the replay modes' forward too); 0.0 where nothing predicts it.
    predicted_extra_step_seconds: float = 0.0
    num_recomputed_ops: int = 0
    budget: str = ""
    solver: str = ""
    schema_version: int = SCHEMA_VERSION

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_decisions(
        cls, graph: CostGraph, decisions: Mapping[str, Decision | str], *, device: Any = None, **fields: Any
    ) -> Plan:
        """A plan for `graph` with predictions filled in by the simulator (recompute priced on `device`)."""
        from remat_kit._core.simulate import simulate

        clean: dict[str, Decision] = {}
        for name, d in decisions.items():
            graph.index(name)  # raises KeyError naming the value
            clean[name] = Decision(d)
        ordered = tuple(
            (graph.values[i].name, clean.get(graph.values[i].name, Decision.SAVE)) for i in graph.activations
        )
        merged = any(len(seg) > 1 for seg in graph.segments)
        bare = cls(
            decisions=ordered,
            block_names=graph.block_names,
            segments=graph.segments if merged else (),
            graph_fingerprint=graph.fingerprint(),
            **fields,
        )
        return bare.with_predictions(simulate(graph, bare, device=device))

    def with_predictions(self, result: Any) -> Plan:
        return dataclasses.replace(
            self,
            predicted_peak_bytes=result.peak_bytes,
            predicted_activation_bytes=result.activation_bytes,
            baseline_activation_bytes=result.baseline_activation_bytes,
            predicted_recompute_flops=result.recompute_flops,
            predicted_recompute_seconds=result.recompute_seconds,
            num_recomputed_ops=result.num_recomputed_ops,
        )

    # -- queries ---------------------------------------------------------------------------
    def decision(self, name: str) -> Decision:
        return self.as_dict().get(name, Decision.SAVE)

    def as_dict(self) -> dict[str, Decision]:
        return dict(self.decisions)

    def names(self, decision: Decision | str) -> tuple[str, ...]:
        """Names of the values with this decision, in forward order."""
        decision = Decision(decision)
        return tuple(n for n, d in self.decisions if d is decision)

    @property
    def activation_fraction(self) -> float:
        """Predicted activation memory as a fraction of no remat."""
        if self.baseline_activation_bytes == 0:
            return 1.0
        return self.predicted_activation_bytes / self.baseline_activation_bytes

    def graph_for(self, graph: CostGraph) -> CostGraph:
        """`graph` regrouped into this plan's segments (the graph itself when they already agree)."""
        if not self.segments or graph.segments == self.segments:
            return graph
        key = ("segments", self.segments)
        if key not in graph._cache:
            graph._cache[key] = graph.regroup(self.segments)
        return graph._cache[key]

    def check_graph(self, graph: CostGraph) -> None:
        """Raise ValueError if this plan was made for a different graph."""
        if self.graph_fingerprint and self.graph_fingerprint != graph.fingerprint():
            known = {n for n, _ in self.decisions}
            names = {graph.values[i].name for i in graph.activations}
            missing, extra = sorted(known - names)[:5], sorted(names - known)[:5]
            raise ValueError(
                f"plan was made for graph {self.graph_fingerprint}, not this one ({graph.fingerprint()}); "
                f"names only in the plan: {missing}, only in the graph: {extra}. Re-solve for this model "
                "or input shape."
            )

    # -- serialization ---------------------------------------------------------------------
    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["decisions"] = {n: d.value for n, d in self.decisions}
        data["block_names"] = list(self.block_names)
        data["segments"] = [list(seg) for seg in self.segments]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Plan.from_json: not JSON ({e}); pass the text Plan.to_json() wrote.") from None
        if not isinstance(data, dict) or "decisions" not in data:
            raise ValueError("Plan.from_json: expected an object with a 'decisions' field, as Plan.to_json() writes.")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"Plan.from_json: schema_version={version!r}, this remat_kit reads {SCHEMA_VERSION}; "
                "re-solve the plan with this version."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"Plan.from_json: unknown fields {unknown}; allowed: {sorted(fields)}.")
        try:
            decisions = tuple((str(n), Decision(d)) for n, d in data.pop("decisions").items())
        except ValueError as e:
            raise ValueError(f"Plan.from_json: {e}; decisions must be one of {[d.value for d in Decision]}.") from None
        data["block_names"] = tuple(data.get("block_names", ()))
        data["segments"] = tuple(tuple(seg) for seg in data.get("segments", ()))
        return cls(decisions=decisions, **data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        with open(path) as f:
            return cls.from_json(f.read())

    def summary(self) -> str:
        counts = {d.value: len(self.names(d)) for d in Decision}
        return (
            f"Plan({self.solver or 'manual'}, budget={self.budget or '-'}: activation "
            f"{self.predicted_activation_bytes / 2**20:.2f} MiB = {self.activation_fraction:.0%} of no remat, "
            f"recompute {self.predicted_recompute_flops / 1e9:.3f} GFLOP in {self.num_recomputed_ops} ops; {counts})"
        )
