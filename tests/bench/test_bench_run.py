"""`partywall bench` end to end: the real command against real servers.

Rules: every run is the installed command in a subprocess (``python -m
partywall.cli``), against a reference server the suite starts on 127.0.0.1
port 0 with a fresh database, bounded by a subprocess time-out and a pytest
time-out. The 20-user run against the embedded server is made once per
module and shared by the schema, JUnit and browser tests. The serialised
start-up run uses 60 users at 100-150 ms each, so start-ups queue for about
7.5 s and the p95 lands near 7 s: clearly over the default 5 s limit (no
threshold is lowered), in about ten seconds. The leak run shows that an
invariant fails the benchmark even when every figure is within its limit.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.test_reports import chromium  # noqa: F401 - the shared headless-Chromium fixture
from partywall_props.plan import Plan

from partywall.benchreport import BenchReport, merge_reports

METRICS = ("connect", "agent_startup", "first_chunk", "response", "history")


def _bench(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # cwd has no pyproject.toml, so the packaged [tool.partywall] applies.
    return subprocess.run([sys.executable, "-m", "partywall.cli", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench20(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.CompletedProcess[str], Path]]:
    out = tmp_path_factory.mktemp("bench20")
    proc = _bench("--users", "20", "--report", str(out / "report.json"), "--junit", str(out / "junit.xml"),
                  "--html", str(out / "report.html"), cwd=out)
    yield proc, out


@pytest.mark.timeout(150)
def test_bench_20_users_against_the_embedded_server_passes_with_a_complete_report(
        bench20: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = bench20
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for key in ("ok", "users", "seed", "plan_fingerprint", "latency_ms", "success_rate", "server", "client",
                "thresholds", "violations", "timeline", "samples", "measurement_overhead_ms"):
        assert key in report, key
    assert report["ok"] is True and report["error"] is None and report["violations"] == []
    assert report["users"] == 20 and report["seed"] == 100
    assert report["plan_fingerprint"] == Plan.generate(100, 20, 10, 3).fingerprint()
    expected_n = {"connect": 20, "agent_startup": 20, "first_chunk": 60, "response": 60, "history": 40}
    for name in METRICS:
        entry = report["latency_ms"][name]
        assert {"n", "p50", "p95", "p99", "max", "failures"} <= set(entry), name
        assert entry["n"] == expected_n[name] and entry["failures"] == 0, (name, entry)
        assert 0 < entry["p50"] <= entry["p95"] <= entry["p99"] <= entry["max"], (name, entry)
        assert report["success_rate"][name] == 1.0
    assert report["success_rate"]["overall"] == 1.0
    # The gate reads the client's start-up; the server's own figure is below it, the gap is the overhead.
    assert report["latency_ms"]["server_startup"]["n"] == 20
    assert report["measurement_overhead_ms"]["n"] == 20 and report["measurement_overhead_ms"]["p50"] >= 0
    # Server and client resources are two processes, read by pid.
    server, client = report["server"], report["client"]
    assert server["pid"] != client["pid"]
    for res in (server, client):
        assert res["samples"] >= 1 and res["rss_mib_peak"] > 0 and res["cpu_percent_peak"] is not None
    assert {"agent_startup_p95_ms", "agent_startup_p99_ms", "connect_success_rate", "server_peak_rss_mib",
            "violations"} <= set(report["thresholds"])
    assert all(t["ok"] for t in report["thresholds"].values())
    assert len(report["timeline"]["connect"]) == 20 and len(report["timeline"]["agent_startup"]) == 20
    assert "partywall bench PASSED: 20 users" in proc.stdout
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and suite.get("errors") == "0"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bench_fails_the_p95_gate_when_agent_startups_serialise(tmp_path: Path) -> None:
    secret = "s" + secrets.token_urlsafe(32)  # never "-...": argparse would take it for an option
    cmd = (f"{shlex.quote(sys.executable)} -m partywall_agentserver --port 0 --db {shlex.quote(str(tmp_path / 'serial.db'))} "
           "--fault serial_startup --startup-ms 100:150")
    report_path = tmp_path / "report.json"
    proc = _bench("--users", "60", "--server-cmd", cmd, "--auth-secret", secret, "--report", str(report_path),
                  cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["ok"] is False and report["error"] is None
    p95 = report["thresholds"]["agent_startup_p95_ms"]
    assert p95["ok"] is False and p95["limit"] == 5000 and p95["actual"] > 5000 and p95["n"] == 60
    timing = [v for v in report["violations"] if v["invariant"] == "timing"]
    assert len(timing) >= 1
    v = timing[0]
    assert v["evidence"]["threshold"] == "agent_startup_p95_ms"
    assert v["evidence"]["actual"] == p95["actual"] and v["evidence"]["limit"] == 5000
    assert f"actual {round(p95['actual'], 1)} exceeds limit 5000" in v["title"]
    # Only the time is wrong: every connection and every reply still arrived, and no other invariant broke.
    assert report["success_rate"]["connect"] == 1.0 and report["success_rate"]["overall"] == 1.0
    assert [x for x in report["violations"] if x["invariant"] != "timing"] == []
    assert "VIOLATION [timing] agent_startup_p95_ms" in proc.stdout


@pytest.mark.timeout(120)
def test_bench_fails_on_a_leak_even_when_it_is_fast(tmp_path: Path) -> None:
    # The plan gives users of different tenants the same assistant names; a server that looks
    # assistants up by name alone hands one tenant's assistant to another.
    secret = "s" + secrets.token_urlsafe(32)  # never "-...": argparse would take it for an option
    cmd = (f"{shlex.quote(sys.executable)} -m partywall_agentserver --port 0 --db {shlex.quote(str(tmp_path / 'leak.db'))} "
           "--fault assistant_by_name")
    report_path = tmp_path / "report.json"
    proc = _bench("--users", "20", "--server-cmd", cmd, "--auth-secret", secret, "--report", str(report_path),
                  cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["ok"] is False
    assert report["thresholds"]["agent_startup_p95_ms"]["ok"] is True
    assert report["thresholds"]["violations"]["ok"] is False
    leaks = [v for v in report["violations"] if v["invariant"] == "isolation"]
    assert leaks and "assistant_id reached a connection of tenant" in leaks[0]["title"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bench_under_xdist_runs_one_shard_per_worker_and_the_shards_merge(tmp_path: Path) -> None:
    # Each worker starts its own embedded server here (no --server-url); ci/bench_1000.py shows one shared one.
    report = tmp_path / "REPORT.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "partywall_props", "-p", "no:cacheprovider", "-q", "-n", "2",
         "--hypothesis-profile=bench", "--partywall-users", "20", "--partywall-report", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "CI": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shards = [json.loads((tmp_path / f"REPORT.gw{k}.json").read_text(encoding="utf-8")) for k in (0, 1)]
    assert [s["shard"] for s in shards] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    assert [s["users"] for s in shards] == [10, 10]
    merged = merge_reports([BenchReport.from_json(s) for s in shards])
    assert merged.ok is True and merged.users == 20
    assert merged.latency_ms["agent_startup"].n == 20 and merged.latency_ms["response"].n == 60
    assert merged.plan_fingerprint == Plan.generate(100, 20, 10, 3).fingerprint()


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_bench_html_of_a_real_run_renders_in_chromium(
        bench20: tuple[subprocess.CompletedProcess[str], Path], chromium: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    proc, out = bench20
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chromium.get((out / "report.html").resolve().as_uri())
    assert chromium.title == "partywall bench report"
    assert chromium.find_element(By.CSS_SELECTOR, "h1 .badge").text == "passed"
    charts = chromium.find_elements(By.CSS_SELECTOR, "svg.chart")
    # One distribution per latency (six client-side and the server's start-up), two timelines, CPU, memory.
    assert len(charts) == 11
    for chart in charts:
        drawn = chromium.execute_script("const b = arguments[0].getBBox(); return [b.width, b.height];", chart)
        assert drawn[0] > 100 and drawn[1] > 100, (chart.get_attribute("id"), drawn)
    captions = [c.text for c in chromium.find_elements(By.CSS_SELECTOR, "figcaption")]
    assert "Agent start-up, as the client sees it: n = 20, failures = 0" in captions
    assert len(chromium.find_elements(By.CSS_SELECTOR, "#chart-gantt rect")) >= 40
    assert len(chromium.find_elements(By.CSS_SELECTOR, "#chart-cpu polyline")) == 2
    assert [e for e in chromium.get_log("browser") if e.get("level") == "SEVERE"] == []


@pytest.mark.timeout(150)
def test_bench_warns_when_the_load_generator_was_saturated(tmp_path: Path) -> None:
    """The warning follows the client's measured CPU: a limit it cannot reach stays silent, one it passes warns."""
    for limit, warned in (("100000", False), ("0.01", True)):
        out = tmp_path / limit
        out.mkdir()
        proc = _bench("--users", "10", "--report", str(out / "r.json"),
                      "--set", f"bench.client_cpu_saturated_percent={limit}", cwd=out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # a warning never fails the gate
        report = json.loads((out / "r.json").read_text(encoding="utf-8"))
        mean = report["client"]["cpu_percent_mean"]
        assert mean is not None and mean > 0.01
        assert bool(report["warnings"]) is warned, report["warnings"]
        assert ("WARNING the load generator's CPU averaged" in proc.stdout) is warned
        if warned:
            assert f"averaged {mean:.0f} %" in report["warnings"][0]
