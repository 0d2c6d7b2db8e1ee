"""The bench report: one typed model that the bench, ``partywall merge`` and every reporter use.

`BenchReport` is what ``partywall bench`` writes as JSON (``to_json``) and
what anything that reads a report gets back (``from_json``, which refuses,
in one sentence, a file that is not a bench report). The JSON shape is the
one ARCHITECTURE.md documents: ``{"ok", "error", "users", "seed",
"plan_fingerprint", "latency_ms": {NAME: {"n", "p50", "p95", "p99", "max",
"failures", ...}}, "success_rate", "server", "client", "thresholds",
"violations", "timeline", "samples", ...}``. Keys the model does not know
(a later partywall's, or a script's own such as ``wall_s``) are kept as they
are and written back.

The report is judged in one place, `BenchReport.judge`: the thresholds
(`partywall.thresholds`) are measured on its figures, each breach becomes a
`timing` violation, and ``ok`` holds only with no error, no violation and
every threshold within its limit. The bench judges its own run with it, and
`merge_reports` judges the merged figures of several shards with it (a
shard's p95 is not the run's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from partywall import __version__
from partywall import thresholds as thresholdsmod
from partywall.errors import HarnessError, Violation
from partywall.thresholds import Threshold


class ReportError(HarnessError):
    """A JSON document is not a bench report (the message says what is wrong with it)."""


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


# ---------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------


@attrs.define
class LatencySummary:
    """One metric's latencies in ms: nearest-rank percentiles over ``n`` successes, failures beside them."""

    n: int = 0
    failures: int | None = 0
    """Failed attempts (None for a figure that has no failures, such as the measurement overhead)."""
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    mean: float | None = None
    histogram: str | None = None
    """The encoded `partywall.stats.LatencyHistogram` of the samples, which is what lets shards merge."""
    not_attempted: int | None = None
    """Steps a user never reached because an earlier step failed."""
    merged: str | None = None
    """How a merge arrived at the figures, when it could not do so exactly."""

    _OPTIONAL = ("histogram", "not_attempted", "merged")

    @classmethod
    def of(cls, samples_ms: Iterable[float], failures: int | None = 0, *, histogram: bool = True) -> LatencySummary:
        from partywall.stats import summarize

        got = summarize(samples_ms, failures or 0, histogram=histogram)
        got["failures"] = failures if failures is None else got["failures"]
        return cls.from_json(got, "latency")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        if self.failures is not None:
            out["failures"] = self.failures
        out.update(p50=self.p50, p95=self.p95, p99=self.p99, max=self.max, mean=self.mean)
        for key in self._OPTIONAL:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, data: Any, name: str) -> LatencySummary:
        if not isinstance(data, Mapping):
            raise ReportError(f"latency_ms.{name} is not an object")
        if not isinstance(data.get("n", 0), int):
            raise ReportError(f"latency_ms.{name}.n is not a count")
        failures = data.get("failures")
        return cls(n=_int(data.get("n")), failures=_int(failures) if failures is not None else None,
                   p50=_num(data.get("p50")), p95=_num(data.get("p95")), p99=_num(data.get("p99")),
                   max=_num(data.get("max")), mean=_num(data.get("mean")),
                   histogram=data.get("histogram") if isinstance(data.get("histogram"), str) else None,
                   not_attempted=data.get("not_attempted"), merged=data.get("merged"))

    @property
    def attempts(self) -> int:
        return self.n + (self.failures or 0)


@attrs.define
class Resources:
    """A process's resources over the run (`partywall.resources.ResourceSampler.summary`)."""

    pid: int | list[int] | None = None
    cpu_percent_peak: float | None = None
    cpu_percent_mean: float | None = None
    rss_mib_peak: float | None = None
    rss_mib_mean: float | None = None
    open_files_peak: int | None = None
    threads_peak: int | None = None
    samples: int = 0
    extra: dict[str, Any] = attrs.field(factory=dict)
    """The sampler's other figures (interval, exited, every pid read, shards merged), kept as they are."""

    _FIELDS = ("pid", "cpu_percent_peak", "cpu_percent_mean", "rss_mib_peak", "rss_mib_mean", "open_files_peak",
               "threads_peak", "samples")

    def to_json(self) -> dict[str, Any]:
        return {**{key: getattr(self, key) for key in self._FIELDS}, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Resources | None:
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise ReportError(f"{where} is not an object of resource figures")
        known = {key: data.get(key) for key in cls._FIELDS}
        known["samples"] = _int(known["samples"])
        for key in cls._FIELDS[1:-1]:
            known[key] = _num(known[key])
        return cls(**known, extra={k: v for k, v in data.items() if k not in cls._FIELDS})


@attrs.frozen
class ShardInfo:
    """Which share of the plan's users a report ran: shard ``index`` (from 0) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:  # as people count and as --shard takes it
        return f"{self.index + 1}/{self.count}"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "count": self.count}

    @classmethod
    def from_json(cls, data: Any, where: str = "shard") -> ShardInfo | None:
        if data is None:
            return None
        index, count = (data.get("index"), data.get("count")) if isinstance(data, Mapping) else (None, None)
        if not isinstance(index, int) or not isinstance(count, int) or not 0 <= index < count:
            raise ReportError(f"{where} is not {{\"index\": K, \"count\": N}} with 0 <= K < N (got {data!r})")
        return cls(index, count)


@attrs.define
class ViolationEntry:
    """A violation as the report lists it."""

    invariant: str
    title: str
    evidence: dict[str, Any] = attrs.field(factory=dict)
    check: str | None = None
    reproduced: str | None = None
    replay: str | None = None

    @classmethod
    def of(cls, v: Violation) -> ViolationEntry:
        return cls(v.invariant, v.title, dict(v.evidence), v.check)

    def violation(self) -> Violation:
        return Violation(self.invariant, self.title, self.evidence, self.check)

    @property
    def from_threshold(self) -> bool:
        return thresholdsmod.is_threshold_violation(self.invariant, self.evidence)

    def to_json(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "check": self.check, "title": self.title, "evidence": self.evidence,
                "reproduced": self.reproduced, "replay": self.replay}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ViolationEntry:
        if not isinstance(data, Mapping) or not isinstance(data.get("invariant"), str):
            raise ReportError(f"{where} is not a violation (an object with invariant and title)")
        evidence = data.get("evidence")
        return cls(data["invariant"], str(data.get("title", "")), dict(evidence) if isinstance(evidence, Mapping) else {},
                   data.get("check"), data.get("reproduced"), data.get("replay"))


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


@attrs.define
class BenchReport:
    """One bench report: of one run, one shard of a run, or shards merged."""

    ok: bool = False
    error: str | None = None
    """Why the run could not be made (exit 2); None when it was made."""
    users: int = 0
    """Users this report ran (of a shard: the shard's)."""
    seed: int | None = None
    plan_fingerprint: str | None = None
    """SHA-256 of the plan: two reports with one fingerprint ran the same plan."""
    plan_users: int | None = None
    plan: dict[str, Any] | None = None
    """The plan's shape: tenants, messages_per_user, version."""
    profile: str | None = "bench"
    partywall_version: str | None = __version__
    target: dict[str, Any] | None = None
    started_at: float | None = None
    """Epoch seconds (merging shards lines their timelines up by it)."""
    duration_s: float | None = None
    request_timeout_s: float | None = None
    latency_ms: dict[str, LatencySummary] = attrs.field(factory=dict)
    success_rate: dict[str, float | None] = attrs.field(factory=dict)
    measurement_overhead_ms: LatencySummary | None = None
    server: Resources | None = None
    client: Resources | None = None
    server_note: str | None = None
    thresholds: dict[str, Threshold] = attrs.field(factory=dict)
    violations: list[ViolationEntry] = attrs.field(factory=list)
    failures: list[dict[str, Any]] = attrs.field(factory=list)
    """The first failures, each with its user and reason."""
    timeline: dict[str, list[list[Any]]] = attrs.field(factory=dict)
    samples: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    counts: dict[str, Any] | None = None
    shard: ShardInfo | None = None
    """The shard this report ran; None for a whole run or a merge."""
    shards: int | None = None
    """Of a merge: how many shard reports went into it."""
    missing_shards: list[ShardInfo] = attrs.field(factory=list)
    """Of a merge: the shards of which no report was given (the merge then has an error)."""
    warnings: list[str] = attrs.field(factory=list)
    """Why the figures may not be trusted as they stand (a saturated load generator); the gate ignores them."""
    extra: dict[str, Any] = attrs.field(factory=dict)
    """Top-level keys this model does not know, written back as they are."""

    @property
    def is_merge(self) -> bool:
        return self.shards is not None

    def note_saturation(self, limit_percent: float) -> None:
        """Warn when the load generator's own CPU made its latencies unreliable.

        A client whose CPU averaged ``limit_percent`` of one core or more over
        the run was busy with its own work, so frames waited in its queue
        before they were timestamped: the latencies then include its queueing,
        not only the server's.
        """
        c = self.client
        if c is None or not c.samples or c.cpu_percent_mean is None or c.cpu_percent_mean < limit_percent:
            return
        where = f"shard {self.shard}: " if self.shard is not None else ""
        self.warnings.append(
            f"{where}the load generator's CPU averaged {c.cpu_percent_mean:.0f} % of one core (limit "
            f"{limit_percent:g} %): it was saturated, so these latencies include its own queueing; run fewer "
            "users per process (--workers N, --dask) before trusting them")

    # -- judging -----------------------------------------------------------------

    def judge(self, limits: Mapping[str, float]) -> list[Violation]:
        """Measure the thresholds on the figures, list each breach as a `timing` violation, set ``ok``.

        Violations an earlier judgement added are replaced; returns the new ones.
        """
        self.thresholds = thresholdsmod.evaluate(limits, self)
        self.violations = [v for v in self.violations if not v.from_threshold]
        timing = thresholdsmod.violations(self.thresholds)
        self.violations += [ViolationEntry.of(v) for v in timing]
        self.ok = self.error is None and not self.violations and all(t.ok for t in self.thresholds.values())
        return timing

    def limits(self) -> dict[str, float]:
        return {name: t.limit for name, t in self.thresholds.items()}

    @property
    def gate_failed(self) -> bool:
        """The run was made and its gate failed (a violation or a threshold breach): exit 1."""
        return self.error is None and not self.ok

    # -- JSON ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "error": self.error,
            "users": self.users,
            "plan_users": self.plan_users,
            "seed": self.seed,
            "plan_fingerprint": self.plan_fingerprint,
            "plan": self.plan,
            "profile": self.profile,
            "partywall_version": self.partywall_version,
            "target": self.target,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "request_timeout_s": self.request_timeout_s,
            "latency_ms": {name: e.to_json() for name, e in self.latency_ms.items()},
            "success_rate": dict(self.success_rate),
            "measurement_overhead_ms": (self.measurement_overhead_ms.to_json()
                                        if self.measurement_overhead_ms is not None else None),
            "server": self.server.to_json() if self.server is not None else None,
            "client": self.client.to_json() if self.client is not None else None,
            "thresholds": {name: t.to_json() for name, t in self.thresholds.items()},
            "violations": [v.to_json() for v in self.violations],
            "failures": list(self.failures),
            "timeline": self.timeline,
            "samples": self.samples,
            "counts": self.counts,
        }
        if self.server_note is not None:
            out["server_note"] = self.server_note
        if self.shard is not None:
            out["shard"] = self.shard.to_json()
        if self.shards is not None:
            out["shards"] = self.shards
        if self.missing_shards:
            out["missing_shards"] = [s.to_json() for s in self.missing_shards]
        out["warnings"] = list(self.warnings)
        out.update(self.extra)
        return out

    _KEYS = frozenset(("ok", "error", "users", "plan_users", "seed", "plan_fingerprint", "plan", "profile",
                       "partywall_version", "target", "started_at", "duration_s", "request_timeout_s", "latency_ms",
                       "success_rate", "measurement_overhead_ms", "server", "client", "server_note", "thresholds",
                       "violations", "failures", "timeline", "samples", "counts", "shard", "shards",
                       "missing_shards", "warnings"))

    @classmethod
    def from_json(cls, data: Any) -> BenchReport:
        """The report a JSON document holds; ReportError saying what is wrong when it is not one."""
        if not isinstance(data, Mapping):
            raise ReportError(f"it is a JSON {type(data).__name__}, not a bench report (an object)")
        if "plan_fingerprint" not in data:
            what = "a run report of `partywall run`" if "not_run" in data else "no bench report"
            raise ReportError(f"it is {what}: it has no plan_fingerprint")
        if not isinstance(data.get("ok"), bool):
            raise ReportError("its 'ok' is not true or false")
        for key in ("latency_ms", "success_rate", "thresholds", "timeline", "samples"):
            if not isinstance(data.get(key) or {}, Mapping):
                raise ReportError(f"its {key!r} is not an object")
        if not isinstance(data.get("violations") or [], list):
            raise ReportError("its 'violations' is not a list")
        try:
            thresholds = {str(k): Threshold.from_json(v, str(k)) for k, v in (data.get("thresholds") or {}).items()}
            thresholdsmod.check_limits({name: t.limit for name, t in thresholds.items()})
        except HarnessError as exc:
            raise ReportError(str(exc)) from None
        users = data.get("users")
        return cls(
            ok=data["ok"],
            error=None if data.get("error") is None else str(data["error"]),
            users=_int(users),
            seed=data.get("seed"),
            plan_fingerprint=data.get("plan_fingerprint"),
            plan_users=data.get("plan_users"),
            plan=data.get("plan"),
            profile=data.get("profile"),
            partywall_version=data.get("partywall_version"),
            target=data.get("target"),
            started_at=_num(data.get("started_at")),
            duration_s=_num(data.get("duration_s")),
            request_timeout_s=_num(data.get("request_timeout_s")),
            latency_ms={str(k): LatencySummary.from_json(v, str(k)) for k, v in (data.get("latency_ms") or {}).items()},
            success_rate={str(k): _num(v) for k, v in (data.get("success_rate") or {}).items()},
            measurement_overhead_ms=(LatencySummary.from_json(data["measurement_overhead_ms"], "overhead")
                                     if data.get("measurement_overhead_ms") else None),
            server=Resources.from_json(data.get("server"), "server"),
            client=Resources.from_json(data.get("client"), "client"),
            server_note=data.get("server_note"),
            thresholds=thresholds,
            violations=[ViolationEntry.from_json(v, f"violations[{i}]")
                        for i, v in enumerate(data.get("violations") or [])],
            failures=list(data.get("failures") or []),
            timeline=dict(data.get("timeline") or {}),
            samples=dict(data.get("samples") or {}),
            counts=data.get("counts"),
            shard=ShardInfo.from_json(data.get("shard")),
            shards=data.get("shards"),
            missing_shards=[s for s in (ShardInfo.from_json(m, "missing_shards") for m in
                                        data.get("missing_shards") or []) if s is not None],
            warnings=[str(w) for w in data.get("warnings") or []],
            extra={k: v for k, v in data.items() if k not in cls._KEYS},
        )

    def write(self, path: str) -> None:
        """Write the JSON report (its folder made when missing)."""
        import json
        from pathlib import Path

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False, default=str) + "\n",
                       encoding="utf-8")

    @classmethod
    def read(cls, path: str) -> BenchReport:
        """The report in a file; ReportError naming the file when it cannot be one."""
        import json
        from pathlib import Path

        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ReportError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ReportError(f"{path}: is not a bench report (not UTF-8 text)") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ReportError(f"{path}: is not a bench report (not JSON: {exc})") from None
        try:
            return cls.from_json(data)
        except ReportError as exc:
            raise ReportError(f"{path}: is not a bench report: {exc}") from None

    @classmethod
    def of_error(cls, message: str, *, seed: int | None = None, plan_fingerprint: str | None = None,
                 shard: ShardInfo | None = None) -> BenchReport:
        """The report of a bench that could not be made: ``ok`` false, ``error`` says why."""
        return cls(ok=False, error=message, seed=seed, plan_fingerprint=plan_fingerprint, shard=shard)


def as_json(report: BenchReport | Mapping[str, Any]) -> Mapping[str, Any]:
    """A report as the reporters read it: a bench report through the model, any other (a run's) as it is."""
    if isinstance(report, BenchReport):
        return report.to_json()
    if isinstance(report, Mapping) and "plan_fingerprint" in report:
        return BenchReport.from_json(report).to_json()
    return report


# ---------------------------------------------------------------------------
# Merging shard reports
# ---------------------------------------------------------------------------


def _weighted_mean(pairs: Iterable[tuple[float | None, int]]) -> float | None:
    num = 0.0
    den = 0
    for value, weight in pairs:
        if value is None or weight <= 0:
            continue
        num += value * weight
        den += weight
    return num / den if den else None


def _max_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def merge_latency(name: str, parts: Sequence[LatencySummary]) -> LatencySummary:
    """One metric over shards: percentiles from the merged histograms (never averaged), exact max, weighted mean."""
    from partywall.stats import PERCENTILES, LatencyHistogram

    n = sum(p.n for p in parts)
    has_failures = any(p.failures is not None for p in parts)
    failures = sum(p.failures or 0 for p in parts) if has_failures else None
    if n == 0:
        return LatencySummary(n=0, failures=failures, histogram=LatencyHistogram().encode())
    missing = [i for i, part in enumerate(parts) if part.n and not part.histogram]
    if missing:
        raise HarnessError(
            f"latency {name!r} of shard report(s) {missing} has samples but no histogram, so its percentiles "
            "cannot be merged honestly; produce shard reports with summarize(..., histogram=True).")
    merged = LatencyHistogram.merged(LatencyHistogram.decode(p.histogram) for p in parts if p.n and p.histogram)
    if merged.count != n:
        raise HarnessError(f"latency {name!r}: the shards' histograms hold {merged.count} samples but their counts "
                           f"say n = {n}; the shard reports are inconsistent.")
    out = LatencySummary(n=n, failures=failures, histogram=merged.encode(),
                         # Exact figures beat histogram readings where exact ones are available.
                         max=_max_or_none(p.max for p in parts),
                         mean=_weighted_mean((p.mean, p.n) for p in parts))
    for p in PERCENTILES:
        setattr(out, f"p{p}", merged.percentile(p))
    not_attempted = [p.not_attempted for p in parts if p.not_attempted is not None]
    if not_attempted:
        out.not_attempted = sum(not_attempted)
    return out


def _merge_overhead(parts: Sequence[LatencySummary | None]) -> LatencySummary | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if all(p.histogram or not p.n for p in present):
        return merge_latency("measurement_overhead_ms", present)
    # Without histograms the exact percentiles are lost; the largest shard
    # figure is an upper bound, and the report says so instead of averaging.
    return LatencySummary(n=sum(p.n for p in present), failures=None, p50=_max_or_none(p.p50 for p in present),
                          p95=_max_or_none(p.p95 for p in present), p99=_max_or_none(p.p99 for p in present),
                          max=_max_or_none(p.max for p in present),
                          merged="upper bound: the largest figure of any shard")


def _merge_resources(parts: Sequence[Resources | None]) -> Resources | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    pids = sorted({p.pid for p in present if isinstance(p.pid, int)})
    return Resources(
        pid=pids[0] if len(pids) == 1 else pids,
        cpu_percent_peak=_max_or_none(p.cpu_percent_peak for p in present),
        cpu_percent_mean=_weighted_mean((p.cpu_percent_mean, p.samples) for p in present),
        rss_mib_peak=_max_or_none(p.rss_mib_peak for p in present),
        rss_mib_mean=_weighted_mean((p.rss_mib_mean, p.samples) for p in present),
        open_files_peak=_max_or_none(p.open_files_peak for p in present),  # type: ignore[arg-type]
        threads_peak=_max_or_none(p.threads_peak for p in present),  # type: ignore[arg-type]
        samples=sum(p.samples for p in present),
        extra={"shards": len(present)},
    )


def _check_shards(reports: Sequence[BenchReport], names: Sequence[str]) -> list[ShardInfo]:
    """The shards missing from a complete set; MergeError for a set that cannot be one run's."""
    shards = [r.shard for r in reports]
    if not any(shards):
        if len(reports) > 1:
            raise HarnessError(f"{names[1]}: neither it nor {names[0]} says which shard it ran; only shard "
                               "reports (--shard K/N) of one run can be merged.")
        return []
    for name, s in zip(names, shards, strict=True):
        if s is None:
            raise HarnessError(f"{name}: it is a whole run, not a shard (it has no 'shard'); merge the shard "
                               "reports of one run only.")
    first = shards[0]
    assert first is not None
    seen: dict[int, str] = {}
    for name, s in zip(names, shards, strict=True):
        assert s is not None
        if s.count != first.count:
            raise HarnessError(f"{name}: it is shard {s} but {names[0]} is shard {first}; every shard report must "
                               "come from one run split the same way.")
        if s.index in seen:
            raise HarnessError(f"{name}: shard {s} is given twice (also {seen[s.index]}); give each shard once.")
        seen[s.index] = name
    return [ShardInfo(k, first.count) for k in range(first.count) if k not in seen]


def merge_reports(reports: Sequence[BenchReport], names: Sequence[str] | None = None) -> BenchReport:
    """Merge the shard reports of one run into one report, judged on the merged figures.

    HarnessError (naming the report, by ``names`` when given) when they cannot
    be one run's: another plan (fingerprint), another partywall version,
    another split, a shard twice, latencies without histograms, thresholds
    with other limits. A shard of which no report was given is not refused:
    the merged report says which (``missing_shards``) and has an ``error``.

    Counts are summed and success rates recomputed from them; percentiles come
    from the merged histograms (never averaged), max is the largest and mean
    the count-weighted one; resource peaks are the largest of any shard, means
    sample-weighted; ``overall`` success is weighted by users. The shards'
    `timing` violations are dropped and the thresholds re-judged on the merged
    figures. Timelines are concatenated on one clock (each shard's
    ``started_at``).
    """
    if not reports:
        raise HarnessError("there is nothing to merge; pass at least one shard report.")
    names = list(names) if names is not None else [f"report {i + 1}" for i in range(len(reports))]
    first = reports[0]
    for name, r in zip(names, reports, strict=True):
        if r.plan_fingerprint != first.plan_fingerprint:
            raise HarnessError(
                f"{name}: it ran another plan (fingerprint {str(r.plan_fingerprint)[:12]}, not "
                f"{str(first.plan_fingerprint)[:12]} of {names[0]}); only shards of one plan (same seed, users "
                "and options) can be merged.")
        if r.partywall_version != first.partywall_version:
            raise HarnessError(f"{name}: it was written by partywall {r.partywall_version}, {names[0]} by "
                               f"{first.partywall_version}; merge reports of one version.")
    missing = _check_shards(reports, names)
    limits: dict[str, float] = {}
    for name, r in zip(names, reports, strict=True):
        for key, t in r.thresholds.items():
            if key in limits and limits[key] != t.limit:
                raise HarnessError(f"{name}: its threshold {key} has the limit {t.limit}, another shard's "
                                   f"{limits[key]}; the shards were run with other settings.")
            limits.setdefault(key, t.limit)
    try:
        thresholdsmod.check_limits(limits)
    except HarnessError as exc:
        raise HarnessError(f"{names[0]}: {exc}") from None

    metric_names = list(dict.fromkeys(name for r in reports for name in r.latency_ms))
    latency = {name: merge_latency(name, [r.latency_ms.get(name) or LatencySummary() for r in reports])
               for name in metric_names}
    success: dict[str, float | None] = {}
    for name in dict.fromkeys(name for r in reports for name in r.success_rate):
        entry = latency.get(name)
        if entry is not None and entry.attempts:
            success[name] = entry.n / entry.attempts
        else:
            success[name] = _weighted_mean((r.success_rate.get(name), r.users) for r in reports)

    starts = [r.started_at for r in reports]
    base = min(s for s in starts if s is not None) if all(s is not None for s in starts) else None

    def shift_of(start: float | None) -> float:
        return (start - base) if base is not None and start is not None else 0.0

    timeline: dict[str, list[list[Any]]] = {}
    for r in reports:
        shift = shift_of(r.started_at)
        for kind, rows in r.timeline.items():
            bucket = timeline.setdefault(kind, [])
            for row in rows:
                user, t0, t1, ok = row[0], row[1], row[2], row[3]
                bucket.append([user, t0 + shift, None if t1 is None else t1 + shift, ok, *row[4:]])
    for rows in timeline.values():
        rows.sort(key=lambda row: (row[1], row[0]))
    # Every shard samples the same server; the longest series shows it best.
    server_series = max((r.samples.get("server") or [] for r in reports), key=len, default=[])
    client_series = []
    for index, r in enumerate(reports):
        shift = shift_of(r.started_at)
        for sample in r.samples.get("client") or []:
            client_series.append({**sample, "t": sample["t"] + shift,
                                  "shard": r.shard.index if r.shard is not None else index})

    errors = [f"{name}: {r.error}" for name, r in zip(names, reports, strict=True) if r.error]
    if missing:
        which = ", ".join(str(s) for s in missing)
        errors.insert(0, f"shard{'s' * (len(missing) > 1)} {which} {'are' if len(missing) > 1 else 'is'} missing "
                         "(no report of it was given), so the merge covers only part of the plan")
    counts: dict[str, Any] = {}
    for r in reports:
        for key, value in (r.counts or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                counts[key] = counts.get(key, 0) + value
    merged = BenchReport(
        ok=False,
        error="; ".join(errors) if errors else None,
        users=sum(r.users for r in reports),
        plan_users=first.plan_users,
        seed=first.seed,
        plan_fingerprint=first.plan_fingerprint,
        plan=first.plan,
        profile=first.profile,
        partywall_version=first.partywall_version,
        target=first.target,
        started_at=base,
        duration_s=_max_or_none(r.duration_s for r in reports),
        request_timeout_s=first.request_timeout_s,
        latency_ms=latency,
        success_rate=success,
        measurement_overhead_ms=_merge_overhead([r.measurement_overhead_ms for r in reports]),
        server=_merge_resources([r.server for r in reports]),
        client=_merge_resources([r.client for r in reports]),
        server_note=next((r.server_note for r in reports if r.server_note), None),
        violations=[v for r in reports for v in r.violations if not v.from_threshold],
        failures=[f for r in reports for f in r.failures],
        timeline=timeline,
        samples={"server": server_series, "client": client_series},
        counts=counts or None,
        shards=len(reports),
        missing_shards=missing,
        warnings=[w for r in reports for w in r.warnings],
    )
    merged.judge(limits)
    return merged


# ---------------------------------------------------------------------------
# The terminal summary
# ---------------------------------------------------------------------------


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _rate(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _min_samples_for(p: float) -> int:
    # partywall.stats.min_samples_for, without importing the histogram library for a summary.
    from fractions import Fraction

    n = 1
    while max(1, math.ceil(Fraction(str(p)) * n / 100)) >= n:
        n += 1
    return n


def format_summary(report: BenchReport, command: str = "bench") -> str:
    """A short table of the report for the terminal."""
    if report.error and not report.is_merge:
        return f"partywall {command} could not run: {report.error}"
    target = report.target or {}
    verdict = "PASSED" if report.ok else ("INCOMPLETE" if report.error else "FAILED")
    if report.shard is not None:
        part = f", shard {report.shard}"
    elif report.is_merge:
        part = f", {report.shards} shard report{'s' * (report.shards != 1)} merged"
    else:
        part = ""
    duration = f"{report.duration_s:.2f} s" if report.duration_s is not None else "- s"
    lines = [
        f"partywall {command} {verdict}: {report.users} users{part}, seed {report.seed}, "
        f"plan {str(report.plan_fingerprint)[:12]}, {target.get('kind')} {target.get('url')}, {duration}",
        f"{'metric':<15}{'n':>6}{'fail':>6}{'success':>9}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}  (ms)",
    ]
    p95_min, p99_min = _min_samples_for(95), _min_samples_for(99)
    for name, e in report.latency_ms.items():
        note = ""
        if 0 < e.n < p99_min:
            note = "  p95=max" if e.n < p95_min else "  p99=max"
        lines.append(f"{name:<15}{e.n:>6}{e.failures or 0:>6}{_rate(report.success_rate.get(name)):>9}"
                     f"{_ms(e.p50):>10}{_ms(e.p95):>10}{_ms(e.p99):>10}{_ms(e.max):>10}{note}")
    over = report.measurement_overhead_ms
    if over is not None and over.n:
        lines.append(f"measurement overhead (client start-up - server startup_ms): p50 {_ms(over.p50)}, "
                     f"p95 {_ms(over.p95)}, max {_ms(over.max)} ms over n = {over.n}")
    lines.append(f"users who completed every step: {_rate(report.success_rate.get('overall'))}")
    for who, res in (("server", report.server), ("client", report.client)):
        if res is not None and res.samples:
            lines.append(f"{who} pid {res.pid}: CPU peak {_ms(res.cpu_percent_peak)} % / mean "
                         f"{_ms(res.cpu_percent_mean)} % of one core, RSS peak {_ms(res.rss_mib_peak)} MiB, "
                         f"open files peak {res.open_files_peak}, threads {res.threads_peak} "
                         f"({res.samples} samples)")
        else:
            lines.append(f"{who}: not sampled")
    for name, t in report.thresholds.items():
        shown = _ms(t.actual) if isinstance(t.actual, float) and thresholdsmod.kind_of(name).source != "success_rate" \
            else t.actual
        lines.append(f"threshold {name}: actual {shown}, limit {t.limit}: {'ok' if t.ok else 'FAILED'}")
    for v in report.violations[:10]:
        lines.append(f"VIOLATION [{v.invariant}] {v.title}")
    if len(report.violations) > 10:
        lines.append(f"... and {len(report.violations) - 10} more violations; every one is in the JSON report")
    for w in report.warnings:
        lines.append(f"WARNING {w}")
    if report.error:
        lines.append(f"ERROR {report.error}")
    return "\n".join(lines)


def verdict(report: BenchReport, command: str = "bench") -> tuple[int, str]:
    """The exit code and the closing line: 2 when the run (or the merge) was not whole, 1 when its gate
    failed (a violation or a threshold breach), else 0."""
    if report.error is not None:
        made = "the merge is incomplete" if report.is_merge else "the run could not be made"
        return 2, f"partywall {command}: {made}: {report.error}"
    if report.ok:
        return 0, f"partywall {command}: PASSED, every threshold and invariant held."
    names = sorted({v.invariant for v in report.violations})
    word = "violation" if len(report.violations) == 1 else "violations"
    return 1, f"partywall {command}: FAILED, {len(report.violations)} {word} found ({', '.join(names)})"
