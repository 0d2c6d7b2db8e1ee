"""The `partywall` command as a user meets it: exit codes, one-line errors, reports.

Rules: every test runs the installed command in a subprocess with a time
bound; nothing here mocks the server (the passing run starts the embedded
reference server, the dead-server test points at a port nobody listens on).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def partywall(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partywall.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_dead_server_is_one_line_exit_2(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = partywall("run", "--server-url", f"ws://127.0.0.1:{free_port()}/ws", "--auth-secret", "s" * 32,
                     "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nothing is listening" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is False and "nothing is listening" in data["error"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["run", "--server-url", "http://x/ws", "--auth-secret", "s"], "ws://"),
        (["run", "--server-url", "ws://127.0.0.1:1/ws"], "--auth-secret"),
        (["run", "--set", "timing.nope=1"], "--set: unknown key 'timing.nope'"),
        (["run", "--set", "timing.response_ms=fast"], "--set: timing.response_ms must be a whole number (got 'fast')"),
        (["run", "--profile", "weekly"], "profile 'weekly' (from --profile) is not defined"),
        (["run", "--config", "missing.toml"], "--config missing.toml: no such file"),
        (["run", "--server-url", "ws://127.0.0.1:1/ws", "--server-cmd", "x", "--auth-secret", "s"], "exclude each other"),
    ],
)
def test_cli_bad_option_is_one_line_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    proc = partywall(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr


def test_cli_lists_every_invariant(tmp_path: Path) -> None:
    proc = partywall("run", "--list-invariants", cwd=tmp_path)
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines() if line and not line.startswith(("=", " "))]
    for name in ("isolation", "routing", "durability", "exactly-once", "ordering", "liveness", "timing", "protocol"):
        assert name in names, proc.stdout


def test_cli_token_verifies_with_the_secret(tmp_path: Path) -> None:
    import jwt

    proc = partywall("token", "--tenant", "acme", "--user", "alice", "--secret", "k" * 32, cwd=tmp_path)
    claims = jwt.decode(proc.stdout.strip(), "k" * 32, algorithms=["HS256"])
    assert (claims["tid"], claims["sub"]) == ("acme", "alice") and claims["exp"] > time.time()


def test_cli_serve_prints_the_ready_line_and_a_token_command(tmp_path: Path) -> None:
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "partywall.cli", "serve", "--port", "0", "--db", str(tmp_path / "s.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on ws://127.0.0.1:") and line.rstrip().endswith("/ws")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "generated secret" in err and "partywall token --secret" in err


@pytest.mark.slow
def test_cli_server_that_dies_by_itself_is_a_liveness_violation(tmp_path: Path) -> None:
    """A server that exits mid-run fails the run (exit 1), named as liveness, not as a harness error."""
    db = tmp_path / "s.db"
    # Every start of the server lives half a second, then is killed from inside its own command:
    # shorter than the time between two of the suite's own crash-and-restarts, so it dies by itself.
    cmd = (f"{sys.executable} -m partywall_agentserver --port 0 --db {db} & pid=$!; sleep 0.5; kill -9 $pid; wait $pid")
    report = tmp_path / "r.json"
    proc = partywall("run", "--profile", "ci", "--server-cmd", cmd, "--auth-secret", "d" * 32, "--report", str(report),
                     "--set", "shrink_seconds=5", cwd=tmp_path, timeout=200)
    data = json.loads(report.read_text())
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert any(v["invariant"] == "liveness" for v in data["violations"]), data["violations"]


def test_cli_adapter_seam_carries_every_frame(tmp_path: Path) -> None:
    """--adapter swaps the wire format without touching the state machines: here an
    adapter that speaks protocol v1 but counts what it encodes and decodes."""
    (tmp_path / "counting_adapter.py").write_text(
        "from partywall.adapter import Adapter\n"
        "class Counting(Adapter):\n"
        "    name = 'counting'\n"
        "    def encode(self, req_type, req_id, fields):\n"
        "        open('encoded.log', 'a').write(req_type + '\\n')\n"
        "        return super().encode(req_type, req_id, fields)\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "run", "--profile", "smoke", "--adapter",
                           "counting_adapter:Counting", "--set", "profiles.smoke.max_examples=3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sent = (tmp_path / "encoded.log").read_text().split()
    assert "start_agent" in sent and len(sent) > 5
    bad = subprocess.run([sys.executable, "-m", "partywall.cli", "run", "--adapter", "json:loads"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "not a subclass" in bad.stderr


def test_cli_settings_reach_a_launched_server(tmp_path: Path) -> None:
    """`--set server_ready_timeout_s` bounds the wait for a launched server's ready line."""
    proc = partywall("run", "--profile", "smoke", "--server-cmd", "sleep 30", "--auth-secret", "s" * 32,
                     "--set", "server_ready_timeout_s=1.5", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "within 1.5 s" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_project_file_and_environment_layer_over_the_defaults(tmp_path: Path) -> None:
    """What `partywall config` prints is what the layers make of a project file, a variable and an option."""
    import os

    (tmp_path / "pyproject.toml").write_text("[tool.partywall]\nprofile = 'nightly'\nshrink_seconds = 7\n")
    sub = tmp_path / "service" / "tests"
    sub.mkdir(parents=True)
    env = {**os.environ, "PARTYWALL_AUTH_SECRET": "hunter2", "PARTYWALL_SET": "timing.ack_ms=111"}
    env.pop("CI", None)
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "config", "--set", "shrink_seconds=9"],
                          capture_output=True, text=True, timeout=60, cwd=sub, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:] if line.strip()}
    project = str((tmp_path / "pyproject.toml").resolve())
    assert rows["profile"] == ['"nightly"', project]
    assert rows["shrink_seconds"] == ["9.0", "--set"]
    assert rows["timing.ack_ms"] == ["111", "PARTYWALL_SET"]
    assert rows["timing.history_ms"][1:] == ["partywall", "defaults"]
    assert rows["--auth-secret"] == ["********", "PARTYWALL_AUTH_SECRET"] and "hunter2" not in proc.stdout


def test_cli_output_is_partywalls_own(tmp_path: Path) -> None:
    """A run prints partywall's summary and verdict, none of pytest's or Hypothesis's machinery."""
    proc = partywall("run", "--profile", "smoke", "--set", "profiles.smoke.max_examples=2", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "partywall run: PASSED, every invariant held." in proc.stdout
    for word in ("PytestConfigWarning", "deselected", "docs.pytest.org", "passed in", "[100%]", "Traceback"):
        assert word not in out, word


def test_cli_pytest_runs_the_properties_by_import_name(tmp_path: Path) -> None:
    """`pytest --pyargs partywall_props` with the plugin's options, from a folder that is not the checkout."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "partywall_props", "-p", "no:cacheprovider",
                           "--partywall-profile", "smoke", "--partywall-set", "profiles.smoke.max_examples=2",
                           "--partywall-report", "r.json"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout and "profile smoke, seed 7" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True


def test_cli_bench_runs_through_its_entry_point_without_pytest(tmp_path: Path) -> None:
    """`partywall bench` calls the `partywall.bench` entry point: neither pytest nor Hypothesis is started."""
    code = ("import sys; from partywall.cli import main; status = main(['bench', '--users', '5', '--report', 'r.json']); "
            "print('IMPORTED', [m for m in ('pytest', '_pytest', 'hypothesis') if m in sys.modules]); sys.exit(status)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout and "partywall bench PASSED: 5 users" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True


def test_cli_merge_is_a_command_with_the_report_options(tmp_path: Path) -> None:
    proc = partywall("merge", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--report" in proc.stdout and "--junit" in proc.stdout and "--html" in proc.stdout
    proc = partywall("merge", str(tmp_path / "none.json"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"partywall merge: {tmp_path / 'none.json'}: cannot be read (No such file or directory)"
