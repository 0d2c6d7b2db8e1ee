"""wss:// end to end: the reference server serving TLS, and the harness verifying it.

Rules: everything runs over real TLS on 127.0.0.1, with a private CA and a
server certificate (for ``127.0.0.1`` and ``localhost``) that `trustme`
makes for this module; nothing is mocked. The `partywall` command runs as a
subprocess (``python -m partywall.cli``), as a user runs it, with ``CI``
taken out of its environment (``CI`` would select the ``ci`` profile).
Verification is on by default, so the system trust store, which does not
know the private CA, must refuse the certificate: exit 2 with one line on
stderr, never a traceback and never a violation. No test bounds wall-clock
time from above; ``pytest.mark.timeout`` and subprocess time-outs only stop
a hang.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from partywall.errors import TargetError
from partywall.target import CommandTarget, UrlTarget, make_target, parse_ws_url

trustme = pytest.importorskip("trustme")

SECRET = "t" * 40


class Pki:
    """The private CA's certificate and the server's certificate chain and key, as PEM files."""

    def __init__(self, folder: Path) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca = folder / "ca.pem"
        self.cert = folder / "server-chain.pem"
        self.key = folder / "server-key.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.cert.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key))

    def server_cmd(self, db: Path) -> str:
        """The reference server serving wss:// on a free port (a CommandTarget's command)."""
        return shlex.join([sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db", str(db),
                           "--tls-cert", str(self.cert), "--tls-key", str(self.key)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PARTYWALL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def partywall(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partywall.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=child_env())


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture
def tls_server(pki: Pki, tmp_path: Path) -> Iterator[str]:
    """The reference server serving wss:// (started here, not by the suite); yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db", str(tmp_path / "url.db"),
         "--secret", SECRET, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=child_env())
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on wss://127.0.0.1:"), line
        yield line.split()[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


# -- the reference server -------------------------------------------------------


@pytest.mark.timeout(60)
def test_tls_server_prints_the_wss_ready_line_and_speaks_tls(pki: Pki, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db", str(tmp_path / "s.db"),
         "--secret", SECRET, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=child_env())
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on wss://127.0.0.1:") and line.rstrip().endswith("/ws"), line
        host, port, path = parse_ws_url(line.split()[-1])
        assert (host, path) == ("127.0.0.1", "/ws")
        # A client that trusts the private CA completes the handshake, hostname checked.
        context = ssl.create_default_context(cafile=str(pki.ca))
        with socket.create_connection((host, port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                assert tls.version() is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "", "exactly one line on stdout"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["--tls-cert", "--tls-key"])
def test_tls_server_needs_both_cert_and_key(pki: Pki, tmp_path: Path, which: str) -> None:
    path = pki.cert if which == "--tls-cert" else pki.key
    proc = subprocess.run([sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db",
                           str(tmp_path / "s.db"), "--secret", SECRET, which, str(path)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=child_env())
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--tls-cert" in lines[0] and "--tls-key" in lines[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.timeout(60)
def test_tls_server_refuses_a_key_that_does_not_load(pki: Pki, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db",
                           str(tmp_path / "s.db"), "--secret", SECRET, "--tls-cert", str(pki.cert),
                           "--tls-key", str(pki.ca)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=child_env())
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot load --tls-cert" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# -- the harness's pieces ---------------------------------------------------------


def test_tls_urls_parse_and_options_are_checked_at_once(pki: Pki, tmp_path: Path) -> None:
    assert parse_ws_url("wss://127.0.0.1:8443/ws") == ("127.0.0.1", 8443, "/ws")
    assert make_target(server_url="wss://127.0.0.1:1/ws", auth_secret=SECRET).describe()["tls"] == {
        "verify": True, "ca_file": None}
    insecure = make_target(server_url="wss://127.0.0.1:1/ws", auth_secret=SECRET, insecure=True)
    assert insecure.describe()["tls"]["verify"] is False
    assert insecure.tls.context().verify_mode == ssl.CERT_NONE
    assert "tls" not in make_target(server_url="ws://127.0.0.1:1/ws", auth_secret=SECRET).describe()
    with pytest.raises(TargetError, match="exclude each other"):
        make_target(server_url="wss://127.0.0.1:1/ws", auth_secret=SECRET, ca_file=str(pki.ca), insecure=True)
    with pytest.raises(TargetError, match="no such file"):
        make_target(server_url="wss://127.0.0.1:1/ws", auth_secret=SECRET, ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(TargetError, match="no usable PEM CA certificate"):
        make_target(server_url="wss://127.0.0.1:1/ws", auth_secret=SECRET, ca_file=str(pki.key))


@pytest.mark.timeout(120)
def test_tls_launched_target_reads_the_wss_ready_line(pki: Pki, tmp_path: Path) -> None:
    with CommandTarget(pki.server_cmd(tmp_path / "c.db"), SECRET, ready_timeout_s=60) as target:
        assert target.url is not None and target.url.startswith("wss://127.0.0.1:")
        assert target.describe()["tls"] == {"verify": True, "ca_file": None}


@pytest.mark.timeout(120)
def test_tls_url_target_check_names_the_certificate_problem(pki: Pki, tls_server: str) -> None:
    with pytest.raises(TargetError) as info:
        UrlTarget(tls_server, SECRET).start()
    message = str(info.value)
    assert "\n" not in message
    assert "did not verify (CERTIFICATE_VERIFY_FAILED" in message and "--ca-file" in message, message
    make_target(server_url=tls_server, auth_secret=SECRET, ca_file=str(pki.ca)).start()  # verifies
    make_target(server_url=tls_server, auth_secret=SECRET, insecure=True).start()  # does not check


# -- the command, end to end ------------------------------------------------------


@pytest.mark.timeout(300)
def test_tls_run_verifies_with_the_private_ca(pki: Pki, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = partywall("run", "--profile", "smoke", "--server-cmd", pki.server_cmd(tmp_path / "s.db"),
                     "--auth-secret", SECRET, "--ca-file", str(pki.ca), "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["target"]["url"].startswith("wss://127.0.0.1:")
    assert data["target"]["tls"] == {"verify": True, "ca_file": str(pki.ca)}


@pytest.mark.timeout(300)
def test_tls_run_without_the_ca_is_one_line_exit_2(pki: Pki, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = partywall("run", "--profile", "smoke", "--server-cmd", pki.server_cmd(tmp_path / "s.db"),
                     "--auth-secret", SECRET, "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "TLS certificate" in lines[0] and "did not verify (CERTIFICATE_VERIFY_FAILED" in lines[0], lines[0]
    assert "--ca-file PATH" in lines[0] and "--insecure" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["violations"] == [] and "did not verify" in data["error"]


@pytest.mark.timeout(300)
def test_tls_url_run_without_the_ca_is_one_line_exit_2(tls_server: str, tmp_path: Path) -> None:
    proc = partywall("run", "--profile", "smoke", "--server-url", tls_server, "--auth-secret", SECRET,
                     cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "did not verify (CERTIFICATE_VERIFY_FAILED" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_tls_run_insecure_passes_and_the_report_says_so(pki: Pki, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = partywall("run", "--profile", "smoke", "--server-cmd", pki.server_cmd(tmp_path / "s.db"),
                     "--auth-secret", SECRET, "--insecure", "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["target"]["tls"]["verify"] is False


@pytest.mark.timeout(300)
def test_tls_bench_over_wss_with_the_private_ca(pki: Pki, tmp_path: Path) -> None:
    report = tmp_path / "b.json"
    proc = partywall("bench", "--users", "5", "--server-cmd", pki.server_cmd(tmp_path / "s.db"),
                     "--auth-secret", SECRET, "--ca-file", str(pki.ca), "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["users"] == 5
    assert data["target"]["url"].startswith("wss://") and data["target"]["tls"]["verify"] is True
