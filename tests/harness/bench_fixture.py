"""Realistic bench reports for the statistics, report and baseline tests.

`make_bench_report` builds what `partywall bench` writes, from seeded random
latencies shaped like a run against the reference server (connects of a few
ms, agent start-ups of hundreds of ms with a tail, resources sampled every
quarter second), through the real `summarize` so histograms are genuine.
It also returns the raw samples so tests can compare a merge with the truth.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

from partywall.stats import summarize

METRICS = ("connect", "agent_startup", "first_chunk", "response", "history")

THRESHOLD_LIMITS = {
    "agent_startup_p95_ms": 5000,
    "agent_startup_p99_ms": 8000,
    "connect_success_rate": 1.0,
    "server_peak_rss_mib": 4096,
    "violations": 0,
}


def _resource_series(rng: random.Random, duration: float, base_rss: float, cpu_peak: float) -> list[dict[str, Any]]:
    out = []
    steps = max(2, int(duration / 0.25))
    for i in range(1, steps + 1):
        t = i * 0.25
        load = math.exp(-((t - duration * 0.35) ** 2) / (2 * (duration * 0.2) ** 2))
        out.append({
            "t": round(t, 3),
            "pid": 4242,
            "cpu_percent": round(max(0.0, cpu_peak * load + rng.uniform(-3, 3)), 1),
            "rss_mib": round(base_rss + 60 * min(1.0, t / (duration * 0.4)) + rng.uniform(0, 2), 2),
            "open_files": 12 + int(100 * load),
            "threads": 4,
        })
    return out


def _resources_summary(series: list[dict[str, Any]], pid: int) -> dict[str, Any]:
    return {
        "pid": pid,
        "cpu_percent_peak": max(s["cpu_percent"] for s in series),
        "cpu_percent_mean": round(sum(s["cpu_percent"] for s in series) / len(series), 1),
        "rss_mib_peak": max(s["rss_mib"] for s in series),
        "rss_mib_mean": round(sum(s["rss_mib"] for s in series) / len(series), 2),
        "open_files_peak": max(s["open_files"] for s in series),
        "threads_peak": max(s["threads"] for s in series),
        "samples": len(series),
    }


def make_bench_report(
    *,
    users: int = 100,
    seed: int = 100,
    rng_seed: int = 1,
    startup_scale: float = 1.0,
    connect_failures: int = 0,
    startup_failures: int = 0,
    user_offset: int = 0,
    shard: tuple[int, int] | None = None,
    started_at: float | None = None,
    fingerprint: str | None = None,
    violations: list[dict[str, Any]] | None = None,
    server_rss_extra: float = 0.0,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """(report, raw samples per metric) of a plausible bench run."""
    rng = random.Random(rng_seed)
    raw: dict[str, list[float]] = {m: [] for m in METRICS}
    overhead: list[float] = []
    timeline: dict[str, list[list[Any]]] = {"connect": [], "agent_startup": []}
    connected = users - connect_failures
    for i in range(users):
        user = user_offset + i
        t0 = rng.uniform(0.0, 0.03)
        connect_ms = rng.lognormvariate(math.log(6), 0.5)
        ok_connect = i >= connect_failures
        timeline["connect"].append([user, round(t0, 4), round(t0 + connect_ms / 1000, 4), ok_connect])
        if not ok_connect:
            continue
        raw["connect"].append(connect_ms)
        s0 = t0 + connect_ms / 1000 + rng.uniform(0.001, 0.005)
        server_ms = rng.uniform(200, 800) * startup_scale
        client_ms = server_ms + rng.lognormvariate(math.log(4), 0.6) + (
            rng.expovariate(1 / 300) if rng.random() < 0.08 else 0.0
        )
        ok_start = i >= connect_failures + startup_failures
        timeline["agent_startup"].append([user, round(s0, 4), round(s0 + client_ms / 1000, 4), ok_start])
        if not ok_start:
            continue
        raw["agent_startup"].append(client_ms)
        overhead.append(client_ms - server_ms)
        raw["first_chunk"].append(rng.lognormvariate(math.log(60), 0.4))
        raw["response"].append(rng.lognormvariate(math.log(450), 0.3))
        raw["history"].append(rng.lognormvariate(math.log(5), 0.5))
    failures = {
        "connect": connect_failures,
        "agent_startup": startup_failures,
        "first_chunk": 0,
        "response": 0,
        "history": 0,
    }
    latency = {m: summarize(raw[m], failures[m], histogram=True) for m in METRICS}
    ends = [row[2] for rows in timeline.values() for row in rows]
    duration = round(max(ends) + 1.5, 3)
    server_series = _resource_series(rng, duration, 48.0 + server_rss_extra, 140.0)
    client_series = _resource_series(rng, duration, 70.0, 60.0)
    for s in client_series:
        s["pid"] = 777
    over = summarize(overhead, 0)
    over.pop("failures")
    over.pop("mean")
    success = {
        "connect": connected / users if users else 0.0,
        "agent_startup": (connected - startup_failures) / connected if connected else 0.0,
        "overall": (users - connect_failures - startup_failures) / users if users else 0.0,
    }
    report: dict[str, Any] = {
        "ok": True,
        "error": None,
        "users": users,
        "seed": seed,
        "plan_fingerprint": fingerprint or hashlib.sha256(f"plan:{seed}".encode()).hexdigest()[:16],
        "target": {"kind": "embedded", "url": "ws://127.0.0.1:40123/ws"},
        "duration_s": duration,
        "latency_ms": latency,
        "success_rate": success,
        "server": _resources_summary(server_series, 4242),
        "client": _resources_summary(client_series, 777),
        "measurement_overhead_ms": over,
        "thresholds": {},
        "violations": list(violations or []),
        "timeline": timeline,
        "samples": {"server": server_series, "client": client_series},
    }
    if shard is not None:
        report["shard"] = {"index": shard[0], "count": shard[1]}
    if started_at is not None:
        report["started_at"] = started_at
    actual = {
        "agent_startup_p95_ms": latency["agent_startup"]["p95"],
        "agent_startup_p99_ms": latency["agent_startup"]["p99"],
        "connect_success_rate": success["connect"],
        "server_peak_rss_mib": report["server"]["rss_mib_peak"],
        "violations": len(report["violations"]),
    }
    for name, limit in THRESHOLD_LIMITS.items():
        value = actual[name]
        ok = value is not None and (value >= limit if name.endswith("rate") else value <= limit)
        report["thresholds"][name] = {"limit": limit, "actual": value, "ok": ok}
        if not ok and name != "violations":
            report["violations"].append({
                "invariant": "timing",
                "title": f"{name}: actual {value} {'is below' if name.endswith('rate') else 'exceeds'} limit {limit}",
                "evidence": {"threshold": name, "actual": value, "limit": limit},
            })
    report["ok"] = not report["violations"] and all(t["ok"] for t in report["thresholds"].values())
    return report, raw
