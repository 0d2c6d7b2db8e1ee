"""`partywall merge`: shard reports of real runs, merged by the installed command.

Rules: the shard reports come from real ``partywall bench --shard K/N`` runs
(20 users, two shards) against one reference server started on 127.0.0.1
port 0 for the module (a clean one; a leaky one for the gate failure), each
run and each merge a subprocess bounded in time. Bad input is a real report
changed in exactly the one way under test, or a real report of another plan.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from partywall_props.plan import Plan

from partywall import __version__
from partywall.benchreport import BenchReport
from partywall.target import EmbeddedTarget

pytestmark = pytest.mark.timeout(240)


def partywall(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd has no pyproject.toml, so the packaged [tool.partywall] applies.
    return subprocess.run([sys.executable, "-m", "partywall.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def shard_runs(server: EmbeddedTarget, out: Path, *extra: str, name: str = "s") -> list[Path]:
    """Shards 1/2 and 2/2 of the 20-user plan against ``server``; their report paths."""
    paths = []
    for k in (1, 2):
        path = out / f"{name}{k}.json"
        proc = partywall("bench", "--users", "20", "--shard", f"{k}/2", "--server-url", str(server.url),
                         f"--auth-secret={server.secret}", "--server-pid", str(server.server_pid()),
                         "--report", str(path), *extra, cwd=out)
        assert path.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Path], Path]]:
    out = tmp_path_factory.mktemp("merge")
    with EmbeddedTarget(out / "db", ["--startup-ms", "0:5", "--chunk-delay-ms", "0:1"]) as server:
        paths = shard_runs(server, out)
        # The same server, the other half of a plan of another seed: another fingerprint.
        other = out / "other.json"
        proc = partywall("bench", "--users", "20", "--seed", "101", "--shard", "2/2", "--server-url",
                         str(server.url), f"--auth-secret={server.secret}", "--report", str(other), cwd=out)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    yield [*paths, other], out


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("bench:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_merge_of_real_shards_is_the_whole_run(shards: tuple[list[Path], Path]) -> None:
    (s1, s2, _), out = shards
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in (s1, s2)]
    assert [p["shard"] for p in parts] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    assert all(p["ok"] for p in parts), [(p["error"], p["violations"][:3]) for p in parts]
    merged_path = out / "merged.json"
    proc = partywall("merge", str(s1), str(s2), "--report", str(merged_path), "--junit", str(out / "m.xml"),
                     "--html", str(out / "m.html"), cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "partywall merge PASSED: 20 users, 2 shard reports merged" in proc.stdout
    merged = json.loads(merged_path.read_text(encoding="utf-8"))
    assert merged["ok"] is True and merged["error"] is None and merged["shards"] == 2
    assert merged["plan_fingerprint"] == Plan.generate(100, 20, 10, 3).fingerprint()
    assert merged["users"] == 20 and "shard" not in merged and "missing_shards" not in merged
    for name, per_user in (("connect", 1), ("agent_startup", 1), ("response", 3), ("history", 2)):
        assert merged["latency_ms"][name]["n"] == 20 * per_user
        assert merged["latency_ms"][name]["n"] == sum(p["latency_ms"][name]["n"] for p in parts)
        # The merged maximum is the larger shard maximum, not an average of anything.
        assert merged["latency_ms"][name]["max"] == max(p["latency_ms"][name]["max"] for p in parts)
    assert merged["thresholds"]["agent_startup_p95_ms"]["n"] == 20
    assert all(t["ok"] for t in merged["thresholds"].values())
    assert (out / "m.xml").read_text(encoding="utf-8").count("<testcase") >= 5
    assert "partywall bench report" in (out / "m.html").read_text(encoding="utf-8")


def test_merge_refuses_a_shard_of_another_plan_in_one_line(shards: tuple[list[Path], Path]) -> None:
    (s1, _, other), out = shards
    proc = partywall("merge", str(s1), str(other), "--report", str(out / "x.json"), cwd=out)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(other) in line and "another plan" in line, line
    assert json.loads((out / "x.json").read_text())["error"] == line.removeprefix("partywall merge: ")


def test_merge_with_a_missing_shard_is_2_and_its_report_names_the_shard(shards: tuple[list[Path], Path]) -> None:
    (s1, _, _), out = shards
    path = out / "partial.json"
    proc = partywall("merge", str(s1), "--report", str(path), cwd=out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "shard 2/2 is missing" in one_error_line(proc)
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["ok"] is False and "shard 2/2 is missing" in report["error"]
    assert report["missing_shards"] == [{"index": 1, "count": 2}] and report["users"] == 10


@pytest.mark.parametrize("damage, says", [
    ("duplicate", "shard 2/2 is given twice"),
    ("not json", "is not a bench report (not JSON"),
    ("run report", "is not a bench report: it is a run report"),
    ("version", "it was written by partywall 0.0.1"),
])
def test_merge_refuses_bad_input_in_one_line_naming_the_file(shards: tuple[list[Path], Path], tmp_path: Path,
                                                             damage: str, says: str) -> None:
    (s1, s2, _), _ = shards
    bad = tmp_path / "bad.json"
    data: Any = json.loads(s2.read_text(encoding="utf-8"))
    if damage == "not json":
        bad.write_text("{" + s2.read_text(encoding="utf-8")[:100])
    elif damage == "run report":
        bad.write_text(json.dumps({"ok": True, "error": None, "violations": [], "not_run": []}))
    elif damage == "version":
        bad.write_text(json.dumps({**data, "partywall_version": "0.0.1"}))
    else:
        bad.write_text(json.dumps(data))
    args = [str(s1), str(s2), str(bad)] if damage == "duplicate" else [str(s1), str(bad)]
    proc = partywall("merge", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert str(bad) in line and says in line, line
    # The control: the undamaged pair merges (the same files, nothing else changed).
    assert data["partywall_version"] == __version__


def test_merge_gate_failure_is_1(tmp_path: Path) -> None:
    # Shards against a server that hands one tenant's assistant to another: each shard sees the
    # leak, and the merged report fails its gate on it (exit 1, not 2: the run was whole).
    with EmbeddedTarget(tmp_path / "db", ["--fault", "assistant_by_name", "--startup-ms", "0:5"]) as server:
        s1, s2 = shard_runs(server, tmp_path, name="leak")
    proc = partywall("merge", str(s1), str(s2), "--report", str(tmp_path / "m.json"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = BenchReport.read(str(tmp_path / "m.json"))
    assert merged.error is None and merged.ok is False and merged.shards == 2
    assert any(v.invariant == "isolation" for v in merged.violations)
    assert merged.thresholds["violations"].ok is False
    assert "partywall merge: FAILED" in proc.stdout and "VIOLATION [isolation]" in proc.stdout


def test_report_model_json_round_trip_of_real_reports(shards: tuple[list[Path], Path]) -> None:
    (s1, s2, other), out = shards
    merged = out / "merged-rt.json"
    assert partywall("merge", str(s1), str(s2), "--report", str(merged), cwd=out).returncode == 0
    for path in (s1, s2, other, merged):
        data = json.loads(path.read_text(encoding="utf-8"))
        report = BenchReport.read(str(path))
        assert report.to_json() == data, path
        assert BenchReport.from_json(report.to_json()) == report
    # What the model keeps is what it reads: a changed figure comes back changed.
    data = json.loads(s1.read_text(encoding="utf-8"))
    data["latency_ms"]["connect"]["p95"] = 12345.5
    data["wall_s"] = 9.5  # a key the model does not know is kept as it is
    back = BenchReport.from_json(data)
    assert back.latency_ms["connect"].p95 == 12345.5 and back.to_json() == data
