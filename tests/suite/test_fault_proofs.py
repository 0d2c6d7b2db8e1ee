"""Proofs that each invariant can fail: the generated suite finds each planted fault.

Rules: each proof starts the reference server with one planted fault
(`partywall_agentserver/faults.py`, selected with ``--fault`` at start), runs
``partywall run --profile ci`` against it exactly as a user would (the
generated state machine, not a scripted scenario), and requires exit 1, a
violation of the invariant that fault breaks, a shrunk program of a few
steps, and a replay file. Each proof is bounded in time; the `ci` profile's
seed is fixed, so a proof that passes here passes in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROOF_LIMIT_S = 60  # generation, shrinking (25 s budget) and three re-runs against a live server

#: Low but non-zero latency: each generated example costs less, so generation and
#: shrinking fit the bound, while replies still stream while later steps run.
FAST = "--startup-ms 0:5 --chunk-delay-ms 1:3"
#: Faults that need a turn to be streaming when the next message arrives.
STREAMING = "--startup-ms 0:5 --chunk-delay-ms 20:40"

#: fault -> (invariant that must be named, server options, partywall options)
FAULTS = {
    "foreign_thread_lookup": ("isolation", FAST, ()),
    "assistant_by_name": ("isolation", FAST, ()),
    "not_found_names_owner": ("isolation", FAST, ()),
    "sticky_subscription": ("routing", STREAMING, ()),
    "lazy_commit": ("durability", FAST, ()),
    "queued_turn_double_reply": ("exactly-once", STREAMING, ()),
    "history_by_id": ("ordering", FAST, ()),
    # A lost message is only known to be lost when its limit passes: a short one keeps the proof short.
    "lost_wakeup": ("liveness", STREAMING, ("--set", "reply_timeout_s=1")),
    # Start-ups of 0.4-0.5 s: two at the same instant take over 0.7 s only if they run one at a time.
    "serial_startup": ("timing", "--startup-ms 400:500 --chunk-delay-ms 1:3", ("--set", "timing.start_agent_ms=700")),
    "content_limit_code": ("protocol", FAST, ()),
}


def run_against_fault(tmp_path: Path, fault: str, server_opts: str, opts: tuple[str, ...]) -> tuple[int, dict, str, float]:
    db = tmp_path / "server.db"
    cmd = f"{sys.executable} -m partywall_agentserver --port 0 --db {db} --fault {fault} {server_opts}"
    report = tmp_path / "report.json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "partywall.cli", "run", "--profile", "ci", "--server-cmd", cmd,
         "--auth-secret", "proof-secret-" + "x" * 32, "--report", str(report), "--replay-dir", str(tmp_path),
         "--set", "shrink_seconds=25", *opts],
        capture_output=True, text=True, timeout=PROOF_LIMIT_S + 60, cwd=tmp_path,
    )
    return proc.returncode, json.loads(report.read_text()), proc.stdout + proc.stderr, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_found_by_the_generated_suite(tmp_path: Path, fault: str) -> None:
    invariant, server_opts, opts = FAULTS[fault]
    code, report, output, took = run_against_fault(tmp_path, fault, server_opts, opts)
    assert code == 1, f"expected exit 1 (a violation) against {fault}, got {code}:\n{output[-3000:]}"
    named = [v["invariant"] for v in report["violations"]]
    assert invariant in named, f"{fault} must be caught as {invariant}, got {named}:\n{output[-3000:]}"
    v = next(v for v in report["violations"] if v["invariant"] == invariant)
    replay = json.loads(Path(v["replay"]).read_text())
    assert len(replay["program"]) <= 8, f"shrunk program too long: {len(replay['program'])} steps"
    assert v["reproduced"].split("/")[1] == "3"
    assert took < PROOF_LIMIT_S, f"finding {fault} took {took:.0f} s"
