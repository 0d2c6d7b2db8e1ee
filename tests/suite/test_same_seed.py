"""Same seed, same program: what the state machine draws never depends on the server.

Rules: two runs of one profile and seed against two fresh reference servers
whose timing differs tenfold (agents start in 0-5 ms, then in 30-60 ms;
chunks every 0-1 ms, then every 5-10 ms) must generate the same programs: the same examples, the same steps, the same fingerprint in the
report. A precondition or a Hypothesis ``target`` that reads a server's answer
or its timing makes the second run draw differently, and this fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "same-seed-" + "z" * 32


def run(folder: Path, server_delays: str) -> dict:
    folder.mkdir()
    server = f"{sys.executable} -m partywall_agentserver --port 0 --db {folder / 's.db'} {server_delays}"
    report = folder / "report.json"
    # 60 short examples against two servers of different speeds: a draw that read the
    # server's timing (as an earlier version's target did) would make the two runs diverge.
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "run", "--profile", "smoke", "--server-cmd", server,
                           "--auth-secret", SECRET, "--report", str(report),
                           "--set", "profiles.smoke.max_examples=60", "--set", "profiles.smoke.stateful_step_count=10"],
                          capture_output=True, text=True, timeout=300, cwd=folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(report.read_text())


@pytest.mark.slow
def test_same_seed_generates_the_same_programs_whatever_the_server_timing(tmp_path: Path) -> None:
    fast = run(tmp_path / "fast", "--startup-ms 0:5 --chunk-delay-ms 0:1")
    slow = run(tmp_path / "slow", "--startup-ms 30:60 --chunk-delay-ms 5:10")
    assert fast["seed"] == slow["seed"]
    keys = ("examples", "steps", "rules", "program_fingerprint")
    assert {k: fast["stats"][k] for k in keys} == {k: slow["stats"][k] for k in keys}
    assert len(fast["stats"]["program_fingerprint"]) == 16
