"""Targets launch, watch, kill and restart real processes.

Rules: every test runs real subprocesses (the contract server in
contract_server.py, or a fake `agentserver` package that runs it) bound to
127.0.0.1 port 0, stops them in a `with` block or `finally`, and has a
time-out. Ready limits are shortened to keep the suite quick; the behaviour
under test does not depend on their size.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from partywall.errors import HarnessError, TargetError
from partywall.target import (
    CommandTarget,
    EmbeddedTarget,
    Target,
    UrlTarget,
    make_target,
    parse_ws_url,
)

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cret-for-tests-only"


def _accepts_tcp(url: str) -> bool:
    host, port, _ = parse_ws_url(url)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_target_command_reads_ready_line_and_serves(server_cmd: str) -> None:
    target = CommandTarget(server_cmd, SECRET, ready_timeout_s=10)
    with target:
        assert target.url is not None and target.url.startswith("ws://127.0.0.1:")
        assert target.url.endswith("/ws")
        assert _accepts_tcp(target.url)
        assert target.can_crash and target.kind == "command"
        assert target.died() is None
        # The secret reaches the command through its environment.
        assert "secret of length" in target.output_tail()
        pid = target.server_pid()
        assert pid is not None
    assert _gone(pid)
    assert not _accepts_tcp(target.url)


def test_target_server_pid_is_the_listener_not_the_shell(server_cmd: str) -> None:
    # `; echo` keeps sh alive as the parent (a lone command would be exec'd
    # in place of the shell and the two pids would coincide).
    with CommandTarget(f"{server_cmd}; echo server ended", SECRET, ready_timeout_s=10) as target:
        assert isinstance(target, CommandTarget)
        shell = target.pid()
        listener = target.server_pid()
        assert shell is not None and listener is not None
        assert listener != shell
        assert psutil.Process(listener).ppid() == shell
        assert any("contract_server.py" in part for part in psutil.Process(listener).cmdline())
        assert psutil.Process(shell).name() in ("sh", "dash", "bash")


def test_target_embedded_runs_agentserver_with_fresh_db_and_secret(fake_agentserver: Path) -> None:
    target = EmbeddedTarget(ready_timeout_s=10)
    try:
        target.start()
        assert target.kind == "embedded" and target.can_crash
        assert len(target.secret) >= 40  # token_urlsafe(32)
        assert target.url is not None and _accepts_tcp(target.url)
        cmdline = psutil.Process(target.server_pid() or -1).cmdline()
        assert "--port" in cmdline and cmdline[cmdline.index("--port") + 1] == "0"
        assert cmdline[cmdline.index("--db") + 1] == str(target.db_path)
        assert f"secret of length {len(target.secret)}" in target.output_tail()
        secret = target.secret
        target.restart()
        assert target.secret == secret
        assert target.url is not None and _accepts_tcp(target.url)
        # Both starts wrote into the same database.
        assert len(target.db_path.read_text().splitlines()) == 2
    finally:
        target.__exit__(None, None, None)
    assert not target.db_dir.exists()


def test_target_embedded_secrets_differ_between_targets() -> None:
    assert EmbeddedTarget().secret != EmbeddedTarget().secret


def test_target_that_never_gets_ready_fails_within_its_limit(server_cmd: str) -> None:
    target = CommandTarget(f"{server_cmd} --never-ready", SECRET, ready_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(TargetError) as info:
        target.start()
    assert time.monotonic() - started >= 1.0  # it waited its limit out
    message = str(info.value)
    assert "within 1 s" in message
    assert "warming up forever" in message
    assert isinstance(info.value, HarnessError)
    pid = target.pid()
    assert pid is not None and _gone(pid)
    assert target.died() is None  # the suite ended it; it did not die by itself


def test_target_that_exits_early_reports_its_last_output(server_cmd: str) -> None:
    target = CommandTarget(f"{server_cmd} --exit-early 3", SECRET, ready_timeout_s=10)
    with pytest.raises(TargetError) as info:
        target.start()
    message = str(info.value)
    assert "exited with code 3" in message
    assert "[stderr] fatal: cannot open the database (planted)" in message


def test_target_command_that_does_not_exist_says_so() -> None:
    target = CommandTarget("/nonexistent/partywall-server --port 0", SECRET, ready_timeout_s=5)
    with pytest.raises(TargetError) as info:
        target.start()
    assert "exited with code 127" in str(info.value)
    assert "not found" in str(info.value)


def test_target_url_with_nothing_listening_fails_within_seconds() -> None:
    url = f"ws://127.0.0.1:{_free_port()}/ws"
    target = UrlTarget(url, SECRET)
    with pytest.raises(TargetError) as info:
        target.start()
    assert str(info.value) == (
        f"nothing is listening at {url} (connection refused); start the server or fix --server-url."
    )


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1:8765/ws", "scheme 'http'"),
        ("wss://127.0.0.1/ws", "has no port"),
        ("ws://127.0.0.1/ws", "has no port"),
        ("ws://127.0.0.1:8765", "has no path"),
        ("ws://:8765/ws", "has no host"),
        ("ws://127.0.0.1:notaport/ws", "not a valid URL"),
    ],
)
def test_target_url_rejects_malformed_urls(url: str, complaint: str) -> None:
    with pytest.raises(TargetError, match="expected ws://HOST:PORT/PATH") as info:
        UrlTarget(url, SECRET)
    assert complaint in str(info.value)


def test_target_url_accepts_a_running_server_and_finds_its_pid(server_cmd: str) -> None:
    with CommandTarget(server_cmd, SECRET, ready_timeout_s=10) as launched:
        assert launched.url is not None
        target = UrlTarget(launched.url, SECRET)
        with target:
            assert not target.can_crash and target.kind == "url"
            assert target.server_pid() == launched.server_pid()
            with pytest.raises(TargetError, match="cannot be killed"):
                target.kill()
            with pytest.raises(TargetError, match="cannot be restarted"):
                target.restart()
        told = UrlTarget(launched.url, SECRET, pid=os.getpid())
        assert told.server_pid() == os.getpid()


def test_target_kill_and_restart_reads_the_new_port(server_cmd: str) -> None:
    with CommandTarget(f"{server_cmd}; echo ended", SECRET, ready_timeout_s=10) as target:
        first_url, first_pid = target.url, target.server_pid()
        assert first_url is not None and first_pid is not None
        target.kill()
        assert _gone(first_pid)
        assert target.died() is None  # killed by the suite, not by itself
        assert not _accepts_tcp(first_url)
        target.restart()
        assert target.url is not None and _accepts_tcp(target.url)
        second_pid = target.server_pid()
        assert second_pid is not None and second_pid != first_pid
        assert "starting the server again" in target.output_tail()
        # restart() on a live server crashes it first.
        target.restart()
        assert _gone(second_pid)
        assert target.url is not None and _accepts_tcp(target.url)


def test_target_died_reports_a_server_that_exits_by_itself(server_cmd: str) -> None:
    with CommandTarget(f"{server_cmd}; sleep 30", SECRET, ready_timeout_s=10) as target:
        listener = target.server_pid()
        assert listener is not None and target.died() is None
        os.kill(listener, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while target.died() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        reason = target.died()
        assert reason is not None and f"pid {listener}" in reason
    with CommandTarget(server_cmd, SECRET, ready_timeout_s=10) as target:
        listener = target.server_pid()
        assert listener is not None
        os.kill(listener, signal.SIGKILL)
        # The shell notices its child's death and exits, which died() reports.
        deadline = time.monotonic() + 5
        while "exited with code 137" not in (target.died() or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "the server exited with code 137 by itself" in (target.died() or "")


def test_target_keeps_a_chatty_server_drained(server_cmd: str) -> None:
    # 4 MiB on stderr before the ready line: a reader that only watched
    # stdout would leave the server blocked on a full pipe (64 KiB) forever.
    with CommandTarget(f"{server_cmd} --stderr-mib 4", SECRET, ready_timeout_s=15) as target:
        assert target.url is not None and _accepts_tcp(target.url)
        tail = target.output_tail(5)
        assert tail.count("\n") == 4
        assert "[stderr] " in tail
        # The buffer is bounded: all it keeps is a few hundred short lines.
        assert len(target.output_tail(100_000)) < 2_000_000


def test_target_stop_escalates_to_sigkill_when_sigterm_is_ignored(server_cmd: str) -> None:
    target = CommandTarget(f"{server_cmd} --ignore-term", SECRET, ready_timeout_s=10)
    target.start()
    pid = target.server_pid()
    assert pid is not None
    started = time.monotonic()
    target.stop(timeout=0.5)
    assert time.monotonic() - started >= 0.5  # it gave SIGTERM its grace before SIGKILL
    assert _gone(pid)
    assert "ignored SIGTERM" in target.output_tail()


def test_target_wildcard_address_is_reached_over_loopback(server_cmd: str) -> None:
    with CommandTarget(f"{server_cmd} --announce-host 0.0.0.0", SECRET, ready_timeout_s=10) as target:
        assert target.url is not None and target.url.startswith("ws://127.0.0.1:")


def test_make_target_validates_the_option_combination(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARTYWALL_AUTH_SECRET", raising=False)
    with pytest.raises(TargetError, match="exclude each other"):
        make_target(server_url="ws://127.0.0.1:1/ws", server_cmd="x", auth_secret="s")
    with pytest.raises(TargetError, match="--server-url needs the server's token secret"):
        make_target(server_url="ws://127.0.0.1:1/ws")
    with pytest.raises(TargetError, match="--server-cmd needs the server's token secret"):
        make_target(server_cmd="run-server")
    with pytest.raises(TargetError, match="embedded server makes a random secret"):
        make_target(auth_secret="s")
    with pytest.raises(TargetError, match="expected ws://HOST:PORT/PATH"):
        make_target(server_url="127.0.0.1:8765", auth_secret="s")
    with pytest.raises(TargetError, match="embedded server only"):
        make_target(server_cmd="run-server", auth_secret="s", server_args=("--chunks", "2"))
    with pytest.raises(TargetError, match="--server-pid is for --server-url only"):
        make_target(server_pid=1)
    embedded = make_target(server_args=("--chunks", "2"))
    assert isinstance(embedded, EmbeddedTarget) and embedded.server_args == ("--chunks", "2")
    url = make_target(server_url="ws://127.0.0.1:1/ws", auth_secret="given")
    assert isinstance(url, UrlTarget) and url.secret == "given"
    cmd = make_target(server_cmd="run-server", auth_secret="from-settings")
    assert isinstance(cmd, CommandTarget) and cmd.secret == "from-settings"
    assert isinstance(cmd, Target) and cmd.describe() == {"kind": "command", "url": None, "cmd": "run-server"}


def test_target_embedded_starts_the_real_reference_server() -> None:
    with EmbeddedTarget(ready_timeout_s=30) as target:
        assert target.url is not None and _accepts_tcp(target.url)
        pid = target.server_pid()
        assert pid is not None and "agentserver" in " ".join(psutil.Process(pid).cmdline())
