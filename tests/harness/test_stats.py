"""Percentiles are nearest-rank, honest about small n, and merge exactly enough.

Nearest-rank behaviour, stated once: the p-th percentile of n values is the
value at rank ceil(p/100 * n). For n = 10, p95 is rank 10, the maximum; for
n = 20 it is rank 19. That is the definition, not a fallback, and summaries
always carry n beside it so a reader sees when a percentile is the maximum.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partywall.benchreport import BenchReport, merge_reports
from partywall.errors import HarnessError
from partywall.stats import (
    LatencyHistogram,
    min_samples_for,
    percentile,
    summarize,
)

from .bench_fixture import make_bench_report


def merge_bench_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' JSON through the model, merged, and back to JSON (as `partywall merge` does)."""
    return merge_reports([BenchReport.from_json(r) for r in reports]).to_json()


def test_stats_nearest_rank_small_and_round_counts() -> None:
    ten = [float(v) for v in range(1, 11)]
    assert percentile(ten, 50) == 5.0
    assert percentile(ten, 90) == 9.0
    assert percentile(ten, 95) == 10.0  # rank ceil(9.5) = 10: the maximum, by definition
    assert percentile(ten, 99) == 10.0
    twenty = [float(v) for v in range(1, 21)]
    assert percentile(twenty, 95) == 19.0  # not the maximum any more: 0.95 * 20 is exactly 19
    hundred = [float(v) for v in range(1, 101)]
    assert (percentile(hundred, 50), percentile(hundred, 95), percentile(hundred, 99)) == (50, 95, 99)
    assert percentile([float(v) for v in range(1, 102)], 99) == 100.0  # ceil(99.99)
    assert percentile([7.0], 50) == percentile([7.0], 99) == 7.0
    assert percentile(ten, 0) == 1.0 and percentile(ten, 100) == 10.0
    thousand = [float(v) for v in range(1, 1001)]
    assert percentile(thousand, 99.9) == 999.0  # 99.9 kept exact, not 99.90000000000001


def test_stats_min_samples_for_a_percentile_that_is_not_the_maximum() -> None:
    assert min_samples_for(50) == 2
    assert min_samples_for(95) == 20
    assert min_samples_for(99) == 100
    for p in (50, 90, 95, 99):
        n = min_samples_for(p)
        values = [float(v) for v in range(n)]
        assert percentile(values, p) < values[-1]
        assert percentile(values[:-1], p) == values[-2]


@given(
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=300),
    st.integers(min_value=1, max_value=100),
)
def test_stats_percentile_is_the_smallest_value_with_p_percent_at_or_below(
    values: list[int], p: int
) -> None:
    # The defining property of nearest-rank, checked without its formula.
    ordered = sorted(values)
    result = percentile(ordered, p)
    n = len(ordered)
    assert result in ordered
    assert sum(v <= result for v in ordered) * 100 >= p * n
    assert sum(v < result for v in ordered) * 100 < p * n


def test_stats_percentile_refuses_what_it_cannot_answer_honestly() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        percentile([], 95)
    with pytest.raises(ValueError, match="sorted ascending"):
        percentile([3.0, 1.0, 2.0], 50)
    with pytest.raises(ValueError, match="within 0..100"):
        percentile([1.0], 101)


def test_stats_summarize_counts_failures_and_has_no_figures_without_samples() -> None:
    summary = summarize([30.0, 10.0, 20.0], failures=2)
    assert summary == {"n": 3, "failures": 2, "p50": 20.0, "p95": 30.0, "p99": 30.0,
                       "max": 30.0, "mean": 20.0}
    empty = summarize([], failures=5)
    assert empty == {"n": 0, "failures": 5, "p50": None, "p95": None, "p99": None,
                     "max": None, "mean": None}
    with_hist = summarize([1.5, 2.5], histogram=True)
    assert LatencyHistogram.decode(with_hist["histogram"]).count == 2


def _close(a: float | None, b: float) -> bool:
    # 3 significant figures: within 0.1 % of the value, or 1 µs near zero.
    return a is not None and abs(a - b) <= b * 0.001 + 0.001


def test_stats_merged_histograms_match_the_percentiles_of_the_union() -> None:
    rng = random.Random(7)
    shards = [[rng.lognormvariate(math.log(300), 0.8) for _ in range(rng.randint(50, 700))]
              for _ in range(4)]
    shards.append([0.004, 2.0])  # tiny values next to large ones
    encoded = [LatencyHistogram.from_samples(s).encode() for s in shards]
    merged = LatencyHistogram.merged(LatencyHistogram.decode(e) for e in encoded)
    union = sorted(v for s in shards for v in s)
    assert merged.count == len(union)
    for p in (1, 50, 90, 95, 99, 99.9, 100):
        assert _close(merged.percentile(p), percentile(union, p)), p
    assert _close(merged.max(), union[-1])
    mean = merged.mean()
    assert mean is not None and abs(mean - sum(union) / len(union)) < 0.001 * mean
    assert LatencyHistogram().percentile(95) is None


def test_stats_histogram_rejects_impossible_latencies_and_garbage() -> None:
    hist = LatencyHistogram()
    with pytest.raises(ValueError, match="negative latency"):
        hist.record(-1.0)
    with pytest.raises(ValueError, match="within 0 ms .. 1 h"):
        hist.record(4_000_000.0)
    with pytest.raises(HarnessError, match="could not be decoded"):
        LatencyHistogram.decode("not a histogram")


def test_stats_merge_bench_reports_uses_histograms_and_counts() -> None:
    a, raw_a = make_bench_report(users=60, rng_seed=1, shard=(0, 2), started_at=1000.0,
                                 connect_failures=2, startup_failures=1)
    b, raw_b = make_bench_report(users=40, rng_seed=2, shard=(1, 2), started_at=1000.5,
                                 user_offset=60, server_rss_extra=30)
    merged = merge_bench_reports([a, b])
    assert merged["users"] == 100 and merged["shards"] == 2
    assert merged["plan_fingerprint"] == a["plan_fingerprint"]
    for name in raw_a:
        union = sorted(raw_a[name] + raw_b[name])
        entry = merged["latency_ms"][name]
        assert entry["n"] == len(union)
        assert entry["failures"] == a["latency_ms"][name]["failures"] + b["latency_ms"][name]["failures"]
        for p in (50, 95, 99):
            assert _close(entry[f"p{p}"], percentile(union, p)), (name, p)
        assert entry["max"] == union[-1]
        assert abs(entry["mean"] - sum(union) / len(union)) < 1e-6
    assert merged["success_rate"]["connect"] == 98 / 100
    assert merged["success_rate"]["agent_startup"] == 97 / 98
    assert merged["success_rate"]["overall"] == pytest.approx(97 / 100)
    assert merged["server"]["rss_mib_peak"] == max(a["server"]["rss_mib_peak"], b["server"]["rss_mib_peak"])
    assert merged["server"]["samples"] == a["server"]["samples"] + b["server"]["samples"]
    assert merged["thresholds"]["connect_success_rate"] == {"limit": 1.0, "actual": 0.98, "ok": False}
    assert merged["thresholds"]["agent_startup_p95_ms"]["ok"] is True
    assert [v["invariant"] for v in merged["violations"]] == ["timing"]
    assert merged["ok"] is False
    # Timelines are shifted onto one clock by the shards' start times.
    b_rows = [row for row in merged["timeline"]["connect"] if row[0] >= 60]
    assert min(row[1] for row in b_rows) >= 0.5
    assert {s["shard"] for s in merged["samples"]["client"]} == {0, 1}


def test_stats_merge_recomputes_percentile_thresholds_on_the_whole_run() -> None:
    # A shard of 10 slow users fails p95 on its own, but those 10 are exactly
    # the slowest 5 % of the 200-user run: the run's p95 (rank 190) is a fast
    # user, its p99 (rank 198) a slow one. The verdicts are the run's.
    fast, _ = make_bench_report(users=190, rng_seed=3, shard=(0, 2))
    slow, _ = make_bench_report(users=10, rng_seed=4, shard=(1, 2), startup_scale=20.0, user_offset=190)
    assert slow["thresholds"]["agent_startup_p95_ms"]["ok"] is False
    merged = merge_bench_reports([fast, slow])
    assert merged["thresholds"]["agent_startup_p95_ms"]["ok"] is True
    assert merged["thresholds"]["agent_startup_p99_ms"]["ok"] is False
    titles = [v["title"] for v in merged["violations"]]
    assert len(titles) == 1 and titles[0].startswith("agent_startup_p99_ms: actual ")


def test_stats_merge_refuses_reports_of_different_plans_or_missing_shards() -> None:
    a, _ = make_bench_report(users=10, fingerprint="aaaa", shard=(0, 2))
    b, _ = make_bench_report(users=10, fingerprint="bbbb", shard=(1, 2))
    with pytest.raises(HarnessError, match="report 2: it ran another plan"):
        merge_bench_reports([a, b])
    with pytest.raises(HarnessError, match="report 2: shard 1/2 is given twice"):
        merge_bench_reports([a, a])
    c, _ = make_bench_report(users=10, fingerprint="aaaa", shard=(0, 3))
    d, _ = make_bench_report(users=10, fingerprint="aaaa", shard=(2, 3))
    # A missing shard is not refused: the merge says which one, and has an error.
    partial = merge_bench_reports([c, d])
    assert partial["missing_shards"] == [{"index": 1, "count": 3}] and partial["ok"] is False
    assert "shard 2/3 is missing" in partial["error"]
    with pytest.raises(HarnessError, match="report 2: it is shard 1/3 but report 1 is shard 1/2"):
        merge_bench_reports([a, c])
    with pytest.raises(HarnessError, match="nothing to merge"):
        merge_bench_reports([])
    e, _ = make_bench_report(users=10, fingerprint="aaaa")
    del e["latency_ms"]["connect"]["histogram"]
    with pytest.raises(HarnessError, match="has samples but no histogram"):
        merge_bench_reports([e])
    f, _ = make_bench_report(users=10, fingerprint="aaaa", shard=(1, 2))
    f["thresholds"]["agent_startup_p95_ms"]["limit"] = 6000
    with pytest.raises(HarnessError, match="report 2: its threshold agent_startup_p95_ms has the limit 6000"):
        merge_bench_reports([make_bench_report(users=10, fingerprint="aaaa", shard=(0, 2))[0], f])
