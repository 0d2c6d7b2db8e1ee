"""The exit-code contract of `run`, `bench` and `replay`, and `replay` on real failure files.

Rules: exit 1 always comes with at least one violation in the report; a
failure of partywall or of an adapter is exit 2 with its reason in the
report's ``error`` and no violation; a clean run is exit 0. Every command
runs as a user runs it (a subprocess of ``partywall``), against real
reference servers on 127.0.0.1: a clean embedded one, or one with a planted
fault. Nothing here bounds wall-clock time; ``timeout=`` only keeps a hung
child from hanging the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "exit-codes-" + "x" * 32
FAST = "--startup-ms 0:5 --chunk-delay-ms 1:3"
#: An adapter that speaks protocol v1 but raises while encoding one request type:
#: a bug of the adapter, which must never read as a finding about the server.
BROKEN_ADAPTER = """\
from partywall.adapter import Adapter


class Broken(Adapter):
    name = "broken"

    def encode(self, req_type, req_id, fields):
        if req_type == "get_history":
            raise RuntimeError("the adapter cannot encode get_history")
        return super().encode(req_type, req_id, fields)
"""


def partywall(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run([sys.executable, "-m", "partywall.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**base, **(env or {})})


def faulty_server(folder: Path, fault: str) -> str:
    return f"{sys.executable} -m partywall_agentserver --port 0 --db {folder / 'server.db'} --fault {fault} {FAST}"


@pytest.fixture
def broken_adapter(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "broken_adapter.py").write_text(BROKEN_ADAPTER)
    return {"PYTHONPATH": str(tmp_path)}


@pytest.fixture(scope="module")
def finding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real replay file, from a run that found a planted fault (its report goes to a folder
    that does not exist yet: the run makes it)."""
    folder = tmp_path_factory.mktemp("finding")
    report = folder / "reports" / "r.json"
    proc = partywall("run", "--profile", "ci", "--server-cmd", faulty_server(folder, "case_insensitive_user"),
                     "--auth-secret", SECRET, "--report", str(report), "--replay-dir", str(folder),
                     "--set", "shrink_seconds=10", cwd=folder)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return Path(json.loads(report.read_text())["violations"][0]["replay"])


def assert_harness_failure(proc: subprocess.CompletedProcess[str], report: Path, says: str) -> None:
    data = json.loads(report.read_text())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert data["ok"] is False and data["violations"] == [] and says in (data["error"] or ""), data
    assert says in proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_exit_code_run_with_an_adapter_that_raises_is_2(tmp_path: Path, broken_adapter: dict[str, str]) -> None:
    report = tmp_path / "r.json"
    proc = partywall("run", "--profile", "smoke", "--adapter", "broken_adapter:Broken", "--report", str(report),
                     cwd=tmp_path, env=broken_adapter)
    assert_harness_failure(proc, report, "the adapter cannot encode get_history")


def test_exit_code_bench_with_an_adapter_that_raises_is_2(tmp_path: Path, broken_adapter: dict[str, str]) -> None:
    report = tmp_path / "r.json"
    proc = partywall("bench", "--users", "5", "--adapter", "broken_adapter:Broken", "--report", str(report),
                     cwd=tmp_path, env=broken_adapter)
    assert_harness_failure(proc, report, "the adapter cannot encode get_history")


def test_exit_code_replay_with_an_adapter_that_raises_is_2(tmp_path: Path, broken_adapter: dict[str, str],
                                                          finding: Path) -> None:
    report = tmp_path / "r.json"
    proc = partywall("replay", str(finding), "--adapter", "broken_adapter:Broken", "--report", str(report),
                     cwd=tmp_path, env=broken_adapter)
    # The shrunk program of this finding reads no history, so the adapter never raises:
    # the clean embedded server then passes. What must never happen is exit 1.
    assert proc.returncode in (0, 2) and "VIOLATION" not in proc.stdout, proc.stdout + proc.stderr
    if proc.returncode == 2:
        assert_harness_failure(proc, report, "the adapter cannot encode get_history")


def test_replay_brings_the_finding_back_against_the_faulty_server(tmp_path: Path, finding: Path) -> None:
    report = tmp_path / "r.json"
    proc = partywall("replay", str(finding), "--server-cmd", faulty_server(tmp_path, "case_insensitive_user"),
                     "--auth-secret", SECRET, "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    recorded = json.loads(finding.read_text())["violation"]
    found = json.loads(report.read_text())["violations"]
    assert [(v["invariant"], v["check"]) for v in found] == [(recorded["invariant"], recorded["check"])]
    # Step by step: what each step did then, and what it does now.
    assert proc.stdout.count("   then: ") == proc.stdout.count("   now:  ") == len(json.loads(finding.read_text())["program"])


def test_replay_passes_against_a_clean_server(tmp_path: Path, finding: Path) -> None:
    report = tmp_path / "r.json"
    proc = partywall("replay", str(finding), "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(report.read_text())["violations"] == []
    assert "now: no violation" in proc.stdout


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda text: text[: len(text) // 2], "cannot read replay file"),
        (lambda text: json.dumps({**json.loads(text), "format": "something-else/9"}), "is not a partywall replay file"),
        (lambda text: json.dumps({**json.loads(text), "program": "world"}), "has no step program"),
        (lambda text: json.dumps({**json.loads(text), "before": ["world"]}), "'before' must be a list of step programs"),
        (lambda text: json.dumps({**json.loads(text), "program": [{"rule": "no_such_rule", "args": {}}]}),
         "no_such_rule"),
    ],
)
def test_replay_of_a_damaged_file_is_2(tmp_path: Path, finding: Path, damage, says: str) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.json"
    bad.write_text(damage(finding.read_text()))
    report = tmp_path / "r.json"
    proc = partywall("replay", str(bad), "--report", str(report), cwd=tmp_path)
    assert_harness_failure(proc, report, says)
