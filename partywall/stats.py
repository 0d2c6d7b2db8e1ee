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
averaging percentiles (an average of p95s is not a p95 of anything; the merge
itself is `partywall.benchreport.merge_reports`):
``LatencyHistogram`` keeps 3 significant figures over 1 µs .. 1 h, so a merged
percentile is within 0.1 % of the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from partywall.errors import HarnessError

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram

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
        # Imported where histograms are made: reading a report's figures needs none.
        from hdrh.histogram import HdrHistogram

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
        from hdrh.histogram import HdrHistogram

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
