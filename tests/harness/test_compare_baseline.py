"""ci/compare_baseline.py: exit 0 within tolerance, 1 on a regression, 2 when not comparable.

Rules: reports come from `bench_fixture`; the script runs as CI runs it, a
subprocess with the files' paths, and its exit code and table are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .bench_fixture import make_bench_report

SCRIPT = Path(__file__).resolve().parents[2] / "ci" / "compare_baseline.py"

pytestmark = pytest.mark.timeout(30)


def _run(tmp_path: Path, report: dict[str, Any], baseline: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    rp, bp = tmp_path / "report.json", tmp_path / "baseline.json"
    rp.write_text(json.dumps(report))
    bp.write_text(json.dumps(baseline))
    return subprocess.run([sys.executable, str(SCRIPT), str(rp), str(bp), *args],
                          capture_output=True, text=True, timeout=20)


def test_compare_baseline_same_commit_noise_passes(tmp_path: Path) -> None:
    baseline, _ = make_bench_report(rng_seed=1)
    report, _ = make_bench_report(rng_seed=2)  # another run of the same plan
    done = _run(tmp_path, report, baseline)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no regression against the baseline." in done.stdout
    for label in ("agent_startup p95 (ms)", "agent_startup p99 (ms)", "response p95 (ms)",
                  "connect success rate", "server peak RSS (MiB)"):
        assert label in done.stdout


def test_compare_baseline_slower_startups_fail(tmp_path: Path) -> None:
    baseline, _ = make_bench_report(rng_seed=1)
    report, _ = make_bench_report(rng_seed=1, startup_scale=2.5)
    done = _run(tmp_path, report, baseline)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "agent_startup p95 (ms): " in done.stdout and "REGRESSED" in done.stdout
    # A wider tolerance lets the same pair through.
    assert _run(tmp_path, report, baseline, "--tolerance", "2").returncode == 0


def test_compare_baseline_absolute_floor_keeps_small_latencies_from_flapping(tmp_path: Path) -> None:
    baseline, _ = make_bench_report(rng_seed=1)
    report = json.loads(json.dumps(baseline))
    report["latency_ms"]["response"]["p95"] = baseline["latency_ms"]["response"]["p95"] + 90  # +90 ms, about +13 %: inside both bounds
    baseline["latency_ms"]["agent_startup"]["p99"] = 20.0
    report["latency_ms"]["agent_startup"]["p99"] = 60.0  # +200 %, but only 40 ms
    done = _run(tmp_path, report, baseline)
    assert done.returncode == 0, done.stdout
    report["latency_ms"]["agent_startup"]["p99"] = 130.0  # past the 100 ms floor and the ratio
    assert _run(tmp_path, report, baseline).returncode == 1


def test_compare_baseline_success_rate_drop_and_memory_growth_fail(tmp_path: Path) -> None:
    baseline, _ = make_bench_report(rng_seed=1)
    dropped, _ = make_bench_report(rng_seed=1, connect_failures=1)
    done = _run(tmp_path, dropped, baseline)
    assert done.returncode == 1
    assert "connect success rate: 99.00% < allowed 100%" in done.stdout
    fat, _ = make_bench_report(rng_seed=1, server_rss_extra=200)
    done = _run(tmp_path, fat, baseline)
    assert done.returncode == 1 and "server peak RSS (MiB): " in done.stdout
    no_samples = json.loads(json.dumps(baseline))
    no_samples["latency_ms"]["agent_startup"].update(n=0, p95=None, p99=None)
    assert _run(tmp_path, no_samples, baseline).returncode == 1


def test_compare_baseline_refuses_other_plans_and_bad_files(tmp_path: Path) -> None:
    baseline, _ = make_bench_report(rng_seed=1)
    other, _ = make_bench_report(rng_seed=1, fingerprint="another-plan")
    done = _run(tmp_path, other, baseline)
    assert done.returncode == 2
    assert "plan fingerprints differ" in done.stderr and "Traceback" not in done.stderr
    failed_run = dict(baseline, error="nothing is listening at ws://127.0.0.1:9/ws (connection refused)")
    done = _run(tmp_path, failed_run, baseline)
    assert done.returncode == 2 and "could not be made" in done.stderr
    (tmp_path / "junk.json").write_text("{not json")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "junk.json"), str(tmp_path / "missing.json")],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "is not JSON" in done.stderr
    assert _run(tmp_path, baseline, baseline, "--tolerance", "-1").returncode == 2


@pytest.mark.parametrize("path", [("latency_ms", "agent_startup", "p99"), ("success_rate", "overall"),
                                  ("server", "rss_mib_peak")])
def test_compare_baseline_refuses_a_baseline_without_a_gated_figure(tmp_path: Path, path: tuple[str, ...]) -> None:
    baseline, _ = make_bench_report(rng_seed=1)
    report, _ = make_bench_report(rng_seed=2)
    node = baseline
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    done = _run(tmp_path, report, baseline)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the baseline lacks gated figures (" + ".".join(path) + ")" in done.stderr
