"""Budget parsing: a fraction of no-remat activation memory, or absolute bytes per device."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any, TypeAlias

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_ALLOWED = (
    "a float in (0, 1] (fraction of no-remat activation memory), a percentage string like '70%', "
    "an int of bytes, or a size string like '12GiB' / '512MB'"
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed budget. `fraction` limits activation memory; `bytes` limits the whole step's peak."""

    kind: str  # "fraction" | "bytes"
    value: float

    def limit_activation_bytes(self, baseline_activation_bytes: int, constant_bytes: int) -> int:
        """The activation-memory limit in bytes this budget sets on a graph."""
        if self.kind == "fraction":
            # Rounded before the floor: a named floor X / baseline passed back times the baseline
            # read X - 1e-13 in floats and floored a byte short of X (its plan then refused).
            return math.floor(round(self.value * baseline_activation_bytes, 6))
        return int(self.value) - constant_bytes

    def __str__(self) -> str:
        return f"{self.value:g}" if self.kind == "fraction" else format_bytes(int(self.value))


# What a user may pass as `budget=`: a fraction in (0, 1] (1 means no remat), a percentage string
# ("70%"), an int of bytes, a size string ("12GiB"), or a parsed `Budget`.
BudgetLike: TypeAlias = "float | int | str | Budget"


def parse_budget(budget: object, *, argument: str = "budget") -> Budget:
    """Parse a user's budget; raise ValueError naming the argument and what is allowed."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"{argument}={budget!r} is not a budget; pass {_ALLOWED}.")
    if isinstance(budget, numbers.Integral):
        if budget <= 0:
            raise ValueError(f"{argument}={budget!r} bytes must be positive; pass {_ALLOWED}.")
        if budget == 1:
            return Budget("fraction", 1.0)  # `budget=1` means "no remat", not one byte
        return Budget("bytes", float(budget))
    if isinstance(budget, numbers.Real):
        value = float(budget)
        if math.isnan(value) or not 0 < value <= 1:
            raise ValueError(
                f"{argument}={budget!r} is not in (0, 1]; a float is a fraction of no-remat activation "
                f"memory (1.0 = no remat). For bytes pass an int or a string like '12GiB'. Allowed: {_ALLOWED}."
            )
        return Budget("fraction", value)
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = math.nan
            if math.isnan(pct) or not 0 < pct <= 100:
                raise ValueError(f"{argument}={budget!r}: a percentage must be in (0%, 100%]; pass {_ALLOWED}.")
            return Budget("fraction", pct / 100)
        match = _BYTES_RE.match(text)
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise ValueError(
                f"{argument}={budget!r} is not a size; use a number with a unit from "
                f"{sorted(set(_UNITS) - {'k', 'm', 'g', 't'})} (e.g. '12GiB', '512MB'), or pass {_ALLOWED}."
            )
        num_bytes = float(match.group(1)) * _UNITS[unit]
        if not num_bytes >= 1:
            raise ValueError(f"{argument}={budget!r} is less than one byte; pass {_ALLOWED}.")
        return Budget("bytes", float(math.floor(num_bytes)))
    raise ValueError(f"{argument}={budget!r} has type {type(budget).__name__}; pass {_ALLOWED}.")


def smallest_budget_text(budget: object, *, fraction: float, num_bytes: int) -> str:
    """The smallest feasible budget in the unit `budget` was given in, rounded up so that passing
    it back is feasible: a fraction (`0.731`), a percentage (`'73.1%'`), an int of bytes, or a
    size string in the user's unit (`'33.32MiB'`), with the exact byte count beside a size."""
    parsed = parse_budget(budget)
    if parsed.kind == "fraction":
        if isinstance(budget, str):
            return f"'{math.ceil(fraction * 1000) / 10:g}%'"
        return f"{math.ceil(fraction * 1000) / 1000:g}"
    num_bytes = int(math.ceil(num_bytes))
    match = _BYTES_RE.match(budget.strip()) if isinstance(budget, str) else None
    if match is not None:  # a size string (a bytes budget that parsed), so keep the user's unit
        unit = match.group(2)
        amount = num_bytes / _UNITS[unit.lower()]
        digits = max(2, 3 - math.floor(math.log10(amount))) if amount > 0 else 2  # four significant digits
        return f"'{math.ceil(amount * 10**digits) / 10**digits:g}{unit}' ({num_bytes} bytes)"
    return f"{num_bytes} ({format_bytes(num_bytes)})"


def format_bytes(num_bytes: float) -> str:
    sign = "-" if num_bytes < 0 else ""
    num_bytes = abs(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{sign}{num_bytes:.0f}{unit}" if unit == "B" else f"{sign}{num_bytes:.2f}{unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def budget_meaning(per_call: bool) -> str:
    """What `budget` bounds for one plan, in words (both adapters' `explain` print it)."""
    if per_call:
        return (
            "per call: what one call of this layer keeps for its backward, as a fraction of what no remat keeps "
            "(a decorated layer class or a scan body, called many times by the model around it)"
        )
    return "the whole step: the activation memory of one forward+backward of this function or model"


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest activation memory any plan reaches.

    Built by `below`, the one constructor the library uses; every field has one meaning:

    * ``budget``: the budget as the user passed it (its unit is the unit of the message).
    * ``per_call``: the budget bounds what one call of a repeated layer keeps for its backward
      (a decorated layer class, a scan body), not one whole training step.
    * ``smallest_activation_bytes`` / ``baseline_activation_bytes``: activation bytes of the
      least-memory plan and of no remat: the step's activation peak, or, with `per_call`, what
      one call keeps.
    * ``smallest_fraction``: the first over the second: the smallest feasible fractional budget.
    * ``constant_bytes``: parameters, their gradients and the inputs beside the activations of
      the whole step (0 with `per_call`).
    * ``smallest_bytes``: the smallest feasible byte budget for the whole step (activations plus
      `constant_bytes`); None with `per_call`, where a byte budget bounds
      `smallest_activation_bytes` itself.
    """

    def __init__(
        self,
        message: str,
        *,
        budget: object,
        smallest_activation_bytes: int,
        baseline_activation_bytes: int,
        constant_bytes: int,
        per_call: bool,
        parts: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.budget = budget
        self.smallest_activation_bytes = int(smallest_activation_bytes)
        self.baseline_activation_bytes = int(baseline_activation_bytes)
        self.constant_bytes = 0 if per_call else int(constant_bytes)
        self.per_call = bool(per_call)
        self._parts = parts or {}

    @property
    def smallest_fraction(self) -> float:
        baseline = self.baseline_activation_bytes
        return self.smallest_activation_bytes / baseline if baseline else 1.0

    @property
    def smallest_bytes(self) -> int | None:
        return None if self.per_call else self.smallest_activation_bytes + self.constant_bytes

    @classmethod
    def below(
        cls,
        budget: object,
        *,
        smallest_activation_bytes: int,
        baseline_activation_bytes: int,
        constant_bytes: int = 0,
        per_call: bool = False,
        where: str = "",
        why: str,
        remedies: Sequence[str] = (),
        note: str = "",
    ) -> InfeasibleBudgetError:
        """The error for `budget` below the least plan's `smallest_activation_bytes`.

        The message reads ``budget=<as given> is below the smallest feasible budget <in the
        user's unit><where>: <why>; raise it[, or <remedy>]...<note>``. The smallest budget is
        rounded up so that passing it back is feasible (`smallest_budget_text`).
        """
        parts = dict(where=where, why=why, remedies=list(remedies), note=note)
        err = cls(
            "",
            budget=budget,
            smallest_activation_bytes=smallest_activation_bytes,
            baseline_activation_bytes=baseline_activation_bytes,
            constant_bytes=constant_bytes,
            per_call=per_call,
            parts=parts,
        )
        whole = err.smallest_activation_bytes if per_call else err.smallest_bytes
        need = smallest_budget_text(budget, fraction=err.smallest_fraction, num_bytes=int(whole or 0))
        advice = "raise it" + "".join(f", or {r}" for r in remedies)
        err.args = (f"budget={budget!r} is below the smallest feasible budget {need}{where}: {why}; {advice}.{note}",)
        return err

    def for_budget(self, budget: object) -> InfeasibleBudgetError:
        """The same verdict for `budget`, an equal budget written another way (``0.5``, ``'50%'``):
        the message echoes it and names the smallest budget in its unit."""
        return type(self).below(
            budget,
            smallest_activation_bytes=self.smallest_activation_bytes,
            baseline_activation_bytes=self.baseline_activation_bytes,
            constant_bytes=self.constant_bytes,
            per_call=self.per_call,
            **self._parts,
        )

    def to_json(self) -> dict[str, Any]:
        """The verdict as JSON data (the JAX plan cache stores it); `from_json` reads it back."""
        return dict(
            smallest_activation_bytes=self.smallest_activation_bytes,
            baseline_activation_bytes=self.baseline_activation_bytes,
            constant_bytes=self.constant_bytes,
            per_call=self.per_call,
            **self._parts,
        )

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only fields: pickle's default passes `args` alone
        return (_unpickle, (str(self), self.budget, self.to_json()))

    @classmethod
    def from_json(cls, data: dict[str, Any], budget: object) -> InfeasibleBudgetError:
        """The verdict `to_json` wrote, for `budget`. Raises KeyError, TypeError or ValueError on
        data of another shape."""
        if set(data) != set(_JSON_FIELDS):
            raise ValueError(f"an InfeasibleBudgetError's data has fields {sorted(data)}, not {sorted(_JSON_FIELDS)}")
        ints = {k: data[k] for k in ("smallest_activation_bytes", "baseline_activation_bytes", "constant_bytes")}
        texts = {k: data[k] for k in ("where", "why", "note")}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
            raise TypeError(f"byte counts must be ints: {ints!r}")
        if not all(isinstance(v, str) for v in [*texts.values(), *data["remedies"]]):
            raise TypeError(f"texts must be strings: {texts!r}, remedies={data['remedies']!r}")
        if not isinstance(data["per_call"], bool):
            raise TypeError(f"per_call={data['per_call']!r} must be a bool")
        return cls.below(budget, per_call=data["per_call"], remedies=list(data["remedies"]), **ints, **texts)


def _unpickle(message: str, budget: object, data: dict[str, Any]) -> InfeasibleBudgetError:
    parts: dict[str, Any] = {k: data.pop(k) for k in ("where", "why", "remedies", "note") if k in data}
    return InfeasibleBudgetError(message, budget=budget, parts=parts or None, **data)


_JSON_FIELDS = (
    "smallest_activation_bytes",
    "baseline_activation_bytes",
    "constant_bytes",
    "per_call",
    "where",
    "why",
    "remedies",
    "note",
)
