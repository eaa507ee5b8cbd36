"""Data freshness rules (issue 20): stale or missing inputs never pass as a low score.

A model config may state, per modality, how old its newest input may be at the index
time, and what to do when it is older or absent::

    freshness:
      vitals_hours: 24     # newest vital sign (Observation category vital-signs)
      labs_hours: 72       # newest laboratory result (category laboratory)
      action: withhold     # withhold: no score, "insufficient data: ..."; flag: scored
                           # with a "stale data: ..." warning

A config without ``freshness`` checks nothing (older artifacts). Whatever the rules,
:func:`check_freshness` reports the age of the newest input per modality, so the
prediction can show "last vitals X h ago".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from fhir_adapters.record import PatientRecord, ensure_utc

__all__ = ["FreshnessCheck", "FreshnessRules", "check_freshness"]

#: The modalities a rule may name: (config key prefix, Observation category, words).
_MODALITIES: tuple[tuple[str, str, str], ...] = (
    ("vitals", "vital-signs", "vital signs"),
    ("labs", "laboratory", "laboratory results"),
)


@dataclass(frozen=True)
class FreshnessRules:
    """A config's ``freshness``: the largest allowed age per modality, and the action."""

    max_hours: dict[str, float]
    action: Literal["withhold", "flag"] = "withhold"

    @classmethod
    def from_config(cls, freshness: Any) -> FreshnessRules:
        if freshness is None:
            return cls({})
        if not isinstance(freshness, dict):
            raise ValueError("model config 'freshness' must be a mapping")
        max_hours: dict[str, float] = {}
        for name, _, _ in _MODALITIES:
            value = freshness.get(f"{name}_hours")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"model config 'freshness.{name}_hours' must be a positive "
                                 "number of hours")
            max_hours[name] = float(value)
        action = freshness.get("action", "withhold")
        if action not in ("withhold", "flag"):
            raise ValueError("model config 'freshness.action' must be 'withhold' or 'flag'")
        return cls(max_hours, action)


@dataclass(frozen=True)
class FreshnessCheck:
    """The newest input's age per modality (None: none at all) and the problems found."""

    hours_since: dict[str, float | None]
    problems: list[str]
    action: Literal["withhold", "flag"]

    @property
    def refusal(self) -> str | None:
        """"insufficient data: ..." when the rules withhold the score, else None."""
        if self.problems and self.action == "withhold":
            return "insufficient data: " + "; ".join(self.problems)
        return None

    @property
    def warnings(self) -> list[str]:
        """"stale data: ..." notices when the rules flag rather than withhold."""
        if self.action == "flag":
            return [f"stale data: {p}" for p in self.problems]
        return []

    def to_json(self) -> dict[str, Any]:
        return {"hours_since": dict(self.hours_since), "problems": list(self.problems),
                "action": self.action}


def check_freshness(freshness: Any, record: PatientRecord, index_time: datetime
                    ) -> FreshnessCheck:
    """Check ``record`` at ``index_time`` against the config's ``freshness``."""
    rules = FreshnessRules.from_config(freshness)
    t = ensure_utc(index_time)
    hours_since: dict[str, float | None] = {}
    problems: list[str] = []
    for name, category, words in _MODALITIES:
        times = [ensure_utc(o.effective) for o in record.observations
                 if o.category == category and o.effective is not None
                 and ensure_utc(o.effective) <= t]
        age = (t - max(times)) / timedelta(hours=1) if times else None
        hours_since[name] = age
        limit = rules.max_hours.get(name)
        if limit is None:
            continue
        if age is None:
            problems.append(f"no {words} before the index time")
        elif age > limit:
            problems.append(f"newest {words} {age:.0f} h before the index time, older than "
                            f"{limit:g} h")
    return FreshnessCheck(hours_since, problems, rules.action)
