"""The bench plan: a pure function of its seed, with a fingerprint that says so.

Rules: no network and no server here; every test runs in milliseconds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from partywall_props.plan import Plan, parse_shard

from partywall import thresholds
from partywall.benchreport import BenchReport
from partywall.errors import HarnessError


def test_bench_plan_same_seed_same_fingerprint() -> None:
    a = Plan.generate(100, 100, 10, 3)
    b = Plan.generate(100, 100, 10, 3)
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0


def test_bench_plan_other_seed_or_shape_other_fingerprint() -> None:
    base = Plan.generate(100, 100, 10, 3).fingerprint()
    assert Plan.generate(101, 100, 10, 3).fingerprint() != base
    assert Plan.generate(100, 99, 10, 3).fingerprint() != base
    assert Plan.generate(100, 100, 9, 3).fingerprint() != base
    assert Plan.generate(100, 100, 10, 2).fingerprint() != base


def test_bench_plan_fingerprint_is_the_same_in_another_process() -> None:
    # The seed suite used salted hash(); a fresh interpreter (another
    # PYTHONHASHSEED) must draw the very same plan.
    code = "from partywall_props.plan import Plan; print(Plan.generate(7, 30, 4, 2).fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.stdout.strip() == Plan.generate(7, 30, 4, 2).fingerprint()


def test_bench_plan_spreads_users_over_tenants_with_shared_user_ids() -> None:
    plan = Plan.generate(100, 100, 10, 3)
    by_tenant: dict[str, list[str]] = {}
    for m in plan.members:
        by_tenant.setdefault(m.tenant, []).append(m.user)
    assert len(by_tenant) == 10 and all(len(users) == 10 for users in by_tenant.values())
    # Every tenant has an alice (user ids coincide across tenants) and no tenant has two.
    assert all("alice" in users and len(set(users)) == len(users) for users in by_tenant.values())
    assert all(len(m.messages) == 3 for m in plan.members)
    assert all(any(ord(ch) > 127 for ch in msg) for m in plan.members for msg in m.messages)
    assert {m.via for m in plan.members} == {"header", "query"}
    assert len({m.assistant for m in plan.members}) > 1


def test_bench_plan_shards_partition_the_users() -> None:
    plan = Plan.generate(100, 1000, 10, 3)
    shards = [plan.shard(k, 4) for k in range(4)]
    indices = sorted(m.index for s in shards for m in s)
    assert indices == list(range(1000))
    assert all(m.index % 4 == k for k, s in enumerate(shards) for m in s)
    assert parse_shard("2/4") == (1, 4)
    for bad in ("0/4", "5/4", "x/4", "3", "1/0"):
        with pytest.raises(HarnessError, match="K/N"):
            parse_shard(bad)


def test_bench_thresholds_name_actual_and_limit() -> None:
    report = BenchReport.from_json({
        "ok": False, "plan_fingerprint": "f",
        "latency_ms": {"agent_startup": {"n": 60, "p95": 7265.0, "p99": 7600.0}},
        "success_rate": {"connect": 0.98},
        "server": {"rss_mib_peak": 40.0},
        "violations": [],
    })
    limits = {"agent_startup_p95_ms": 5000, "agent_startup_p99_ms": 8000, "connect_success_rate": 1.0,
              "server_peak_rss_mib": 4096, "violations": 0}
    got = thresholds.evaluate(limits, report)
    assert [name for name, t in got.items() if not t.ok] == ["agent_startup_p95_ms", "connect_success_rate"]
    titles = [v.title for v in thresholds.violations(got)]
    assert titles == ["agent_startup_p95_ms: actual 7265.0 exceeds limit 5000",
                      "connect_success_rate: actual 0.98 is below limit 1.0"]
    # Judging the report adds them as `timing` violations and fails it; judging again replaces them.
    report.judge(limits)
    assert report.ok is False and [v.title for v in report.violations] == titles
    report.judge({"agent_startup_p95_ms": 8000})
    assert report.ok is True and report.violations == []
    # No measurement is not a pass.
    report.server = None
    assert thresholds.evaluate({"server_peak_rss_mib": 4096}, report)["server_peak_rss_mib"].ok is False
    with pytest.raises(HarnessError, match="unknown bench threshold"):
        thresholds.evaluate({"startup_fast": 1}, report)
    with pytest.raises(HarnessError, match="needs a number"):
        thresholds.check_limits({"connect_success_rate": "all"})
