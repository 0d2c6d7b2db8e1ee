"""The bench's thresholds: their names, how each is measured on a report, and what a breach says.

One place for every rule, used by the bench when it judges its own run and
by ``partywall merge`` when it judges the merged figures of several shards.
A threshold's name says what it limits (``[tool.partywall.bench.thresholds]``):

- ``<metric>_p50_ms`` / ``_p95_ms`` / ``_p99_ms`` / ``_max_ms``: that figure of
  the metric's latency, at most the limit;
- ``<metric>_success_rate``: the metric's success rate (``overall`` too), at
  least the limit;
- ``server_peak_rss_mib``: the server's peak resident memory, at most the limit;
- ``violations``: violations of invariants other than ``timing``, at most the limit.

A figure that was not measured fails its threshold: no data is not a pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from partywall.errors import HarnessError, Violation

if TYPE_CHECKING:
    from partywall.benchreport import BenchReport

_LATENCY_SUFFIXES = {"_p50_ms": "p50", "_p95_ms": "p95", "_p99_ms": "p99", "_max_ms": "max"}

KNOWN_FORMS = ("<metric>_p50_ms / _p95_ms / _p99_ms / _max_ms, <metric>_success_rate, server_peak_rss_mib, "
               "violations")


@attrs.frozen
class ThresholdKind:
    """What a threshold name limits."""

    source: str
    """``latency``, ``success_rate``, ``server`` or ``violations``."""
    metric: str = ""
    """The latency or success-rate metric, or the server figure."""
    stat: str = ""
    """For a latency: ``p50``, ``p95``, ``p99`` or ``max``."""
    direction: str = "max"
    """``max``: the actual figure may not exceed the limit; ``min``: it may not fall below it."""


def kind_of(name: str) -> ThresholdKind:
    """The kind of a threshold name; HarnessError for a name of no known form."""
    if name == "violations":
        return ThresholdKind("violations")
    if name == "server_peak_rss_mib":
        return ThresholdKind("server", "rss_mib_peak")
    if name.endswith("_success_rate") and len(name) > len("_success_rate"):
        return ThresholdKind("success_rate", name[: -len("_success_rate")], direction="min")
    for suffix, stat in _LATENCY_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return ThresholdKind("latency", name[: -len(suffix)], stat)
    raise HarnessError(f"unknown bench threshold {name!r} in [tool.partywall.bench.thresholds]; known forms: "
                       f"{KNOWN_FORMS}.")


def check_limits(limits: Mapping[str, Any]) -> dict[str, float]:
    """The limits, each name of a known form and each limit a number; HarnessError otherwise."""
    out: dict[str, float] = {}
    for name, limit in limits.items():
        kind_of(str(name))
        if isinstance(limit, bool) or not isinstance(limit, int | float):
            raise HarnessError(f"bench threshold {name!r} needs a number as its limit (got {limit!r}).")
        out[str(name)] = limit
    return out


@attrs.define
class Threshold:
    """One threshold of a report: its limit, the actual figure, and whether it held."""

    limit: float
    actual: float | None
    ok: bool
    n: int | None = None
    """For a latency: how many samples the figure is of."""
    note: str | None = None
    """Why the figure is missing, when it is."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"limit": self.limit, "actual": self.actual, "ok": self.ok}
        if self.n is not None:
            out["n"] = self.n
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, data: Any, name: str) -> Threshold:
        if not isinstance(data, Mapping) or "limit" not in data or not isinstance(data.get("ok"), bool):
            raise HarnessError(f"threshold {name!r} is not an object with limit, actual and ok")
        n = data.get("n")
        return cls(limit=data["limit"], actual=data.get("actual"), ok=data["ok"],
                   n=int(n) if isinstance(n, int) else None, note=data.get("note"))


def counted_violations(report: BenchReport) -> int:
    """What the ``violations`` threshold counts: violations of every invariant but ``timing``."""
    return sum(1 for v in report.violations if v.invariant != "timing")


def measure(name: str, report: BenchReport) -> Threshold:
    """The threshold ``name`` (limit left 0) measured on the report, without judging it."""
    kind = kind_of(name)
    n: int | None = None
    note: str | None = None
    actual: Any
    if kind.source == "violations":
        actual = counted_violations(report)
    elif kind.source == "server":
        actual = getattr(report.server, kind.metric, None) if report.server is not None else None
        if actual is None:
            note = ("the server's process was not sampled; pass --server-pid for a server the suite did not "
                    "start")
    elif kind.source == "success_rate":
        actual = report.success_rate.get(kind.metric)
    else:
        figures = report.latency_ms.get(kind.metric)
        actual = getattr(figures, kind.stat) if figures is not None else None
        n = figures.n if figures is not None else 0
    return Threshold(limit=0, actual=actual, ok=False, n=n, note=note)


def holds(name: str, actual: float | None, limit: float) -> bool:
    """Whether an actual figure keeps within the limit; an unmeasured one never does."""
    if actual is None:
        return False
    return actual >= limit if kind_of(name).direction == "min" else actual <= limit


def evaluate(limits: Mapping[str, float], report: BenchReport) -> dict[str, Threshold]:
    """Every threshold of ``limits`` measured on the report and judged."""
    out: dict[str, Threshold] = {}
    for name, limit in limits.items():
        t = measure(name, report)
        out[name] = attrs.evolve(t, limit=limit, ok=holds(name, t.actual, limit))
    return out


def shown(name: str, value: Any) -> Any:
    """A figure as people read it: ms and MiB to 0.1, a rate exactly (0.995 must not read as 1.0)."""
    if isinstance(value, float) and kind_of(name).source != "success_rate":
        return round(value, 1)
    return value


def breach(name: str, t: Threshold) -> str:
    """The one sentence a failed threshold is reported with (violation title, JUnit, summary)."""
    if t.actual is None:
        return f"{name}: not measured, so it cannot be shown within the limit {t.limit}"
    relation = "is below" if kind_of(name).direction == "min" else "exceeds"
    return f"{name}: actual {shown(name, t.actual)} {relation} limit {t.limit}"


def is_threshold_violation(invariant: str, evidence: Mapping[str, Any] | None) -> bool:
    """A `timing` violation that a threshold produced (re-judging a report replaces these)."""
    return invariant == "timing" and isinstance(evidence, Mapping) and "threshold" in evidence


def violations(thresholds: Mapping[str, Threshold]) -> list[Violation]:
    """A `timing` violation, with actual and limit, for every threshold that failed.

    A breach of ``violations`` adds none: it is the violations themselves, listed already.
    """
    out = []
    for name, t in thresholds.items():
        if t.ok or name == "violations":
            continue
        evidence: dict[str, Any] = {"threshold": name, "actual": t.actual, "limit": t.limit}
        if t.n is not None:
            evidence["n"] = t.n
        if t.note is not None:
            evidence["note"] = t.note
        out.append(Violation("timing", breach(name, t), evidence, check=f"threshold_{name}"))
    return out
