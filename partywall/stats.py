"""Latency statistics done honestly: nearest-rank percentiles with their sample
counts, failures beside them, and HDR histograms to merge shards.

Nearest-rank: the p-th percentile of n sorted values is the value at rank
``ceil(p/100 * n)`` (1-based). It is always one of the measured values, never
an interpolation. Below ``min_samples_for(p)`` values the rank is n, so the
percentile *is* the maximum; that is what nearest-rank means for small n, not
a silent fallback, and every summary carries ``n`` so a reader can see it
(the seed suite hid exactly this by printing "P95" without a count). For p95
that takes 20 values, for p99 100.

Raw samples stay the source of truth inside one process. Histograms exist only
so that shards running in other processes or machines can be merged without
averaging percentiles (an average of p95s is not a p95 of anything):
``LatencyHistogram`` keeps 3 significant figures over 1 µs .. 1 h, so a merged
percentile is within 0.1 % of the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from hdrh.histogram import HdrHistogram

from partywall.errors import HarnessError

PERCENTILES: tuple[int, ...] = (50, 95, 99)


def _rank(p: float, n: int) -> int:
    """1-based nearest rank ``ceil(p/100 * n)``, computed exactly.

    Floating point would turn 0.95 * 20 into 19.000000000000004 and the rank
    into 20; Fraction(str(p)) keeps 95 and 99.9 exact as a person wrote them.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"a percentile must be within 0..100 (got {p!r}).")
    exact = Fraction(str(p)) * n / 100
    return max(1, math.ceil(exact))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank p-th percentile of values already sorted ascending.

    For n = 10, p95 is the 10th value (rank ceil(9.5) = 10), the maximum: that
    is nearest-rank, so report ``n`` beside it. p = 0 gives the minimum.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError(
            "percentile() needs at least one value (got none); report n = 0 and no "
            "percentile instead."
        )
    # An unsorted input would give a plausible-looking wrong answer, which is
    # worse than an error; the check is O(n) next to the caller's O(n log n) sort.
    for i in range(1, n):
        if sorted_values[i - 1] > sorted_values[i]:
            raise ValueError(
                f"percentile() needs values sorted ascending, but value {i - 1} "
                f"({sorted_values[i - 1]!r}) is greater than value {i} "
                f"({sorted_values[i]!r}); pass sorted(values)."
            )
    return sorted_values[_rank(p, n) - 1]


def min_samples_for(p: float) -> int:
    """The fewest values for which the nearest-rank p-th percentile is not simply the maximum.

    p95 → 20, p99 → 100, p50 → 2; for p = 100 there is no such n.
    """
    if not 0 <= p < 100:
        raise ValueError(f"min_samples_for() needs 0 <= p < 100 (got {p!r}).")
    n = 1
    while _rank(p, n) >= n:
        n += 1
    return n


def summarize(
    samples_ms: Iterable[float], failures: int = 0, *, histogram: bool = False
) -> dict[str, Any]:
    """Summary of successful latencies, with failures counted beside them.

    Returns ``{"n", "failures", "p50", "p95", "p99", "max", "mean"}``; the
    figures are None when n == 0 (no successes is not a latency of 0). With
    ``histogram=True`` it also carries ``"histogram"``, the encoded
    `LatencyHistogram` of the samples, so that shards can be merged.
    """
    if failures < 0:
        raise ValueError(f"failures must be a count >= 0 (got {failures!r}).")
    values = sorted(float(v) for v in samples_ms)
    n = len(values)
    out: dict[str, Any] = {"n": n, "failures": int(failures)}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p) if n else None
    out["max"] = values[-1] if n else None
    out["mean"] = math.fsum(values) / n if n else None
    if histogram:
        out["histogram"] = LatencyHistogram.from_samples(values).encode()
    return out


class LatencyHistogram:
    """An HDR histogram of latencies in milliseconds, for merging across shards.

    Values are stored as whole microseconds with 3 significant figures over
    1 µs .. 1 h, so any percentile read back is within 0.1 % (or 1 µs) of the
    recorded value. Percentiles are nearest-rank, the same definition as
    `percentile`, not hdrh's own rounding of the rank.
    """

    LOWEST_US = 1
    HIGHEST_US = 3_600_000_000
    SIGNIFICANT_FIGURES = 3

    def __init__(self, _hdr: HdrHistogram | None = None) -> None:
        self._hdr = _hdr or HdrHistogram(self.LOWEST_US, self.HIGHEST_US, self.SIGNIFICANT_FIGURES)

    @classmethod
    def from_samples(cls, samples_ms: Iterable[float]) -> LatencyHistogram:
        hist = cls()
        for value in samples_ms:
            hist.record(value)
        return hist

    def record(self, ms: float) -> None:
        us = round(ms * 1000)
        if us < 0 or us > self.HIGHEST_US:
            raise ValueError(
                f"a latency must be within 0 ms .. 1 h to go into a histogram (got {ms!r} ms); "
                "a negative latency means the clock was read out of order."
            )
        if not self._hdr.record_value(us):
            raise ValueError(f"the histogram refused the latency {ms!r} ms; this is a bug.")

    @property
    def count(self) -> int:
        return int(self._hdr.get_total_count())

    def encode(self) -> str:
        raw = self._hdr.encode()
        return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        try:
            hdr = HdrHistogram.decode(encoded.encode("ascii"))
        except Exception as exc:  # hdrh raises TypeError, zlib.error and its own cookie errors
            raise HarnessError(
                f"a latency histogram could not be decoded ({type(exc).__name__}: {exc}); "
                "expected the string LatencyHistogram.encode() produced."
            ) from exc
        # A decoded hdrh histogram carries its own geometry; re-add it into one
        # of ours so that every instance has the same bucket layout.
        hist = cls()
        hist._hdr.add(hdr)
        return hist

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Add ``other``'s counts into this histogram; returns self."""
        self._hdr.add(other._hdr)
        return self

    @classmethod
    def merged(cls, histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
        out = cls()
        for hist in histograms:
            out.merge(hist)
        return out

    def _recorded(self) -> list[tuple[int, int]]:
        """(value in µs, count) for every non-empty bucket, ascending."""
        pairs = []
        for index in range(self._hdr.counts_len):
            c = self._hdr.get_count_at_index(index)
            if c:
                pairs.append((self._hdr.get_value_from_index(index), c))
        return pairs

    def _equivalent_ms(self, us: int) -> float:
        # The highest value that lands in the same bucket: the conservative
        # reading (a percentile never looks better than it was).
        return float(self._hdr.get_highest_equivalent_value(us)) / 1000.0

    def percentile(self, p: float) -> float | None:
        n = self.count
        if n == 0:
            return None
        rank = _rank(p, n)
        seen = 0
        for us, c in self._recorded():
            seen += c
            if seen >= rank:
                return self._equivalent_ms(us)
        raise AssertionError("the histogram's counts do not add up to its total; this is a bug.")

    def max(self) -> float | None:
        recorded = self._recorded()
        return self._equivalent_ms(recorded[-1][0]) if recorded else None

    def mean(self) -> float | None:
        n = self.count
        if n == 0:
            return None
        total = math.fsum(self._hdr.get_lowest_equivalent_value(us) * c for us, c in self._recorded())
        return total / n / 1000.0

    def buckets_ms(self) -> list[tuple[float, int]]:
        """(upper edge in ms, count) of every non-empty bucket, ascending: enough for a CDF."""
        return [(self._equivalent_ms(us), c) for us, c in self._recorded()]


# ---------------------------------------------------------------------------
# Merging sharded bench reports
# ---------------------------------------------------------------------------

_LATENCY_THRESHOLD_SUFFIXES = {f"_p{p}_ms": f"p{p}" for p in PERCENTILES} | {"_max_ms": "max"}


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


def _merge_latency(name: str, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = sum(int(part.get("n") or 0) for part in parts)
    failures = sum(int(part.get("failures") or 0) for part in parts)
    out: dict[str, Any] = {"n": n, "failures": failures}
    if n == 0:
        out.update({f"p{p}": None for p in PERCENTILES})
        out.update({"max": None, "mean": None, "histogram": LatencyHistogram().encode()})
        return out
    missing = [i for i, part in enumerate(parts) if part.get("n") and not part.get("histogram")]
    if missing:
        raise HarnessError(
            f"latency {name!r} of shard report(s) {missing} has samples but no histogram, so its "
            "percentiles cannot be merged honestly; produce shard reports with "
            "summarize(..., histogram=True)."
        )
    merged = LatencyHistogram.merged(
        LatencyHistogram.decode(part["histogram"]) for part in parts if part.get("n")
    )
    if merged.count != n:
        raise HarnessError(
            f"latency {name!r}: the shards' histograms hold {merged.count} samples but their "
            f"counts say n = {n}; the shard reports are inconsistent."
        )
    for p in PERCENTILES:
        out[f"p{p}"] = merged.percentile(p)
    # Exact figures beat histogram readings where exact ones are available.
    out["max"] = _max_or_none(part.get("max") for part in parts)
    out["mean"] = _weighted_mean((part.get("mean"), int(part.get("n") or 0)) for part in parts)
    out["histogram"] = merged.encode()
    return out


def _merge_resources(parts: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    present = [p for p in parts if p]
    if not present:
        return None
    out: dict[str, Any] = {}
    pids = sorted({p["pid"] for p in present if isinstance(p.get("pid"), int)})
    out["pid"] = pids[0] if len(pids) == 1 else pids
    for key in ("cpu_percent_peak", "rss_mib_peak", "open_files_peak", "threads_peak"):
        out[key] = _max_or_none(p.get(key) for p in present)
    for key in ("cpu_percent_mean", "rss_mib_mean"):
        out[key] = _weighted_mean((p.get(key), int(p.get("samples") or 0)) for p in present)
    out["samples"] = sum(int(p.get("samples") or 0) for p in present)
    out["shards"] = len(present)
    return out


def _merge_overhead(parts: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    present = [p for p in parts if p]
    if not present:
        return None
    if all(p.get("histogram") or not p.get("n") for p in present):
        merged = _merge_latency("measurement_overhead_ms", present)
        merged.pop("failures", None)
        return merged
    # Without histograms the exact percentiles are lost; the largest shard
    # figure is an upper bound, and the report says so instead of averaging.
    out: dict[str, Any] = {"n": sum(int(p.get("n") or 0) for p in present)}
    for key in ("p50", "p95", "p99", "max"):
        out[key] = _max_or_none(p.get(key) for p in present)
    out["merged"] = "upper bound: the largest figure of any shard"
    return out


def _threshold_actual(name: str, report: Mapping[str, Any]) -> tuple[Any, str] | None:
    """(actual value, direction) for a threshold name the merge knows how to recompute."""
    if name == "violations":
        return len([v for v in report["violations"] if v.get("invariant") != "timing"]), "max"
    if name == "server_peak_rss_mib":
        server = report.get("server") or {}
        return server.get("rss_mib_peak"), "max"
    if name.endswith("_success_rate"):
        metric = name[: -len("_success_rate")]
        return report["success_rate"].get(metric), "min"
    for suffix, key in _LATENCY_THRESHOLD_SUFFIXES.items():
        if name.endswith(suffix):
            metric = name[: -len(suffix)]
            entry = report["latency_ms"].get(metric)
            return (entry or {}).get(key), "max"
    return None


def _check_shards(reports: Sequence[Mapping[str, Any]]) -> None:
    shards = [r.get("shard") for r in reports]
    if not any(shards):
        return
    if not all(shards):
        raise HarnessError(
            "some shard reports say which shard they are and some do not; merge reports of one "
            "sharded run only."
        )
    counts = {int(s["count"]) for s in shards if s is not None}
    indices = sorted(int(s["index"]) for s in shards if s is not None)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        raise HarnessError(
            f"the shard reports are shards {indices} of {sorted(counts)}; expected each shard "
            "0..n-1 of one run exactly once. Re-run the missing shards or merge a complete set."
        )


def merge_bench_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the reports of a sharded bench run into one report.

    Rules: every report must have the same ``plan_fingerprint`` (else
    HarnessError); counts are summed and success rates recomputed from them;
    latency percentiles come from the merged histograms (never averaged), max
    is the largest and mean the count-weighted mean; resource peaks are the
    largest of any shard, means sample-weighted. ``overall`` success is
    weighted by each shard's users (it is a per-user figure). Thresholds the
    merge understands (``<metric>_p95_ms``, ``<metric>_success_rate``,
    ``server_peak_rss_mib``, ``violations``) are re-evaluated on the merged
    figures, and shard ``timing`` violations are replaced by the ones the
    merged thresholds give (a shard's p95 is not the run's). Timelines are
    concatenated, shifted by ``started_at`` (epoch seconds) when shards carry it.
    """
    if not reports:
        raise HarnessError("merge_bench_reports() got no reports; pass at least one shard report.")
    fingerprints = [r.get("plan_fingerprint") for r in reports]
    if len(set(fingerprints)) != 1:
        raise HarnessError(
            f"the shard reports come from different plans (fingerprints {sorted(set(map(str, fingerprints)))}); "
            "only shards of one plan (same seed, users and options) can be merged."
        )
    _check_shards(reports)
    first = reports[0]

    names: list[str] = []
    for r in reports:
        for name in r.get("latency_ms") or {}:
            if name not in names:
                names.append(name)
    latency = {
        name: _merge_latency(name, [(r.get("latency_ms") or {}).get(name) or {} for r in reports])
        for name in names
    }

    users = sum(int(r.get("users") or 0) for r in reports)
    success: dict[str, Any] = {}
    rate_names: list[str] = []
    for r in reports:
        for name in r.get("success_rate") or {}:
            if name not in rate_names:
                rate_names.append(name)
    for name in rate_names:
        entry = latency.get(name)
        attempts = entry["n"] + entry["failures"] if entry else 0
        if attempts:
            success[name] = entry["n"] / attempts if entry else None
        else:
            success[name] = _weighted_mean(
                ((r.get("success_rate") or {}).get(name), int(r.get("users") or 0)) for r in reports
            )

    starts = [r.get("started_at") for r in reports]
    base = min(s for s in starts if s is not None) if all(s is not None for s in starts) else None
    timeline: dict[str, list[list[Any]]] = {}
    for r, start in zip(reports, starts, strict=True):
        shift = (start - base) if base is not None and start is not None else 0.0
        for kind, rows in (r.get("timeline") or {}).items():
            bucket = timeline.setdefault(kind, [])
            for row in rows:
                user, t0, t1, ok = row[0], row[1], row[2], row[3]
                bucket.append(
                    [user, t0 + shift, None if t1 is None else t1 + shift, ok, *row[4:]]
                )
    for rows in timeline.values():
        rows.sort(key=lambda row: (row[1], row[0]))

    # Every shard samples the same server; the longest series shows it best.
    server_series = max(
        ((r.get("samples") or {}).get("server") or [] for r in reports), key=len, default=[]
    )
    client_series = []
    for index, r in enumerate(reports):
        shard_index = (r.get("shard") or {}).get("index", index)
        start = starts[index]
        shift = (start - base) if base is not None and start is not None else 0.0
        for sample in (r.get("samples") or {}).get("client") or []:
            client_series.append({**sample, "t": sample["t"] + shift, "shard": shard_index})

    errors = [str(r["error"]) for r in reports if r.get("error")]
    violations = [
        v for r in reports for v in (r.get("violations") or []) if v.get("invariant") != "timing"
    ]
    merged: dict[str, Any] = {
        "ok": True,
        "error": " ".join(errors) if errors else None,
        "users": users,
        "seed": first.get("seed"),
        "plan_fingerprint": first.get("plan_fingerprint"),
        "target": first.get("target"),
        "duration_s": _max_or_none(r.get("duration_s") for r in reports),
        "latency_ms": latency,
        "success_rate": success,
        "server": _merge_resources([r.get("server") for r in reports]),
        "client": _merge_resources([r.get("client") for r in reports]),
        "measurement_overhead_ms": _merge_overhead(
            [r.get("measurement_overhead_ms") for r in reports]
        ),
        "thresholds": {},
        "violations": violations,
        "timeline": timeline,
        "samples": {"server": server_series, "client": client_series},
        "shards": len(reports),
    }

    thresholds: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for r in reports:
        for name, entry in (r.get("thresholds") or {}).items():
            limits.setdefault(name, entry)
    for name, entry in limits.items():
        limit = entry.get("limit")
        known = _threshold_actual(name, merged)
        if known is None:
            ok = all(((r.get("thresholds") or {}).get(name) or {}).get("ok", True) for r in reports)
            thresholds[name] = {"limit": limit, "actual": None, "ok": ok,
                                "note": "not recomputable from shards; ok only if every shard was"}
            continue
        actual, direction = known
        if actual is None:
            ok = False
        elif direction == "max":
            ok = actual <= limit
        else:
            ok = actual >= limit
        thresholds[name] = {"limit": limit, "actual": actual, "ok": ok}
        if not ok:
            violations.append({
                "invariant": "timing" if name != "violations" else "violations",
                "title": f"{name}: actual {actual} {'exceeds' if direction == 'max' else 'is below'} limit {limit}",
                "evidence": {"threshold": name, "actual": actual, "limit": limit},
            })
    # The `violations` threshold is about the other invariants; a breach of it
    # is already listed as those violations, so it adds no entry of its own.
    merged["violations"] = [v for v in violations if v["invariant"] != "violations"]
    merged["thresholds"] = thresholds
    # The merged figures decide, not the shards' own verdicts: a shard's p95
    # over the limit may be within it for the whole run, and the other way round.
    merged["ok"] = (
        merged["error"] is None
        and not merged["violations"]
        and all(t["ok"] for t in thresholds.values())
    )
    return merged
