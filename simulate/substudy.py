"""What the sub-studies of a validation study share (``simulate.pessimism``, ``simulate.double_robustness``): a
scenario of their own, parsing from a mapping with unknown keys named, and cells keyed by ``(n, unit)``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .scenario import SpecError

__all__ = ["SubStudySpec"]


def _integer(v: Any, low: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= low


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


class SubStudySpec:
    """Base of the sub-study specs (frozen dataclasses with the fields ``scenario``, ``n``, ``reps`` and ``prompts``);
    ``FIELD`` is its ``StudySpec`` field, which error messages name."""

    FIELD: ClassVar[str]

    def _check_common(self, min_n: int) -> None:
        """Validate and normalise ``scenario`` (a registered name, or a spec whose name is safe as a file name),
        ``n`` (integers >= ``min_n``, sorted, distinct), ``reps`` and ``prompts`` (integers >= 2)."""
        from .registry import SCENARIOS
        from .scenario import Scenario
        from .study import _safe_name

        if isinstance(self.scenario, str):
            if self.scenario not in SCENARIOS:
                raise SpecError(f"study field '{self.FIELD}.scenario': unknown scenario {self.scenario!r}")
        else:
            object.__setattr__(self, "scenario", Scenario.from_spec(self.scenario).spec)
        _safe_name(f"{self.FIELD}.scenario.name", self.scenario_name)
        ns = (self.n,) if isinstance(self.n, int) else tuple(self.n)
        if not ns or not all(_integer(v, min_n) for v in ns):
            raise SpecError(f"study field '{self.FIELD}.n' = {self.n!r} must list integers >= {min_n}")
        object.__setattr__(self, "n", tuple(sorted(set(ns))))
        for name in ("reps", "prompts"):
            if not _integer(getattr(self, name), 2):
                raise SpecError(f"study field '{self.FIELD}.{name}' = {getattr(self, name)!r} must be an integer >= 2")

    def _check_numbers(self, checks: tuple) -> None:
        """``checks``: (field, predicate on a finite number, what is allowed) each."""
        for name, ok, allowed in checks:
            value = getattr(self, name)
            if not (_number(value) and ok(value)):
                raise SpecError(f"study field '{self.FIELD}.{name}' = {value!r} must be {allowed}")

    @classmethod
    def parse(cls, value: Any) -> Any:
        """The spec from a mapping (unknown keys named), itself, or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise SpecError(f"study field '{cls.FIELD}' must be a mapping, got {value!r}")
        for key in value:
            if key not in cls.__dataclass_fields__:
                raise SpecError(f"unknown study field '{cls.FIELD}.{key}'; allowed: "
                                f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**value)

    @property
    def scenario_name(self) -> str:
        return self.scenario if isinstance(self.scenario, str) else self.scenario["name"]

    def build_scenario(self):
        from .registry import get_scenario
        from .scenario import Scenario

        return get_scenario(self.scenario) if isinstance(self.scenario, str) else Scenario.from_spec(self.scenario)

    def units(self) -> tuple:
        """What each ``n`` is crossed with (estimators, cases)."""
        raise NotImplementedError

    def cells(self) -> list[tuple[int, Any]]:
        """Every ``(n, unit)``."""
        return [(n, u) for n in self.n for u in self.units()]

    def key(self, n: int, unit: Any) -> str:
        return f"{self.scenario_name}__n{n}__{getattr(unit, 'name', unit)}"
