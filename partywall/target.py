"""Targets: the server the suite talks to, started by the suite or already running.

The API is blocking on purpose: the state machine's thread, the CLI and the
pytest plugin all call it from plain threads, and starting or killing a
process has nothing to gain from an event loop.

The contract for a launched server (the reference one or ``--server-cmd``):
it prints ``listening on ws://HOST:PORT/PATH`` (or ``wss://`` when it serves
TLS) on stdout when it is ready.
The suite keeps its stdout and stderr drained all the time (a server blocked
on a full pipe would look like a server that stopped answering), remembers the
last lines of both for error messages, runs it in a process group of its own
so that SIGKILL reaches every process it forked, and reads resources from the
process that listens on the port, not from the shell that started it.

TLS: a ``wss://`` server's certificate is verified by default, against the
system's trust store (``ssl.create_default_context()``); ``--ca-file PATH``
trusts a private CA instead, ``--insecure`` turns verification off (and the
report says so). A certificate that does not verify stops the run with one
line (a `TargetError`), never a violation: the suite cannot tell a server it
may not trust from one that misbehaves.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

import psutil

from partywall.errors import TargetError

SECRET_ENV = "PARTYWALL_AUTH_SECRET"
DEFAULT_READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
# Lines longer than this are cut in the ring buffer (and a line with no
# newline at all is read in pieces of this size), so a server that writes
# megabytes without a newline costs bounded memory.
MAX_LINE_BYTES = 4096
OUTPUT_LINES_KEPT = 400

_READY_LINE = re.compile(r"listening on (wss?://(\[[^\]]+\]|[^\s/:\[\]]+):(\d+)(/\S*)?)")
_EXPECTED = "expected ws://HOST:PORT/PATH or wss://HOST:PORT/PATH"


def parse_ws_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of a ``ws://`` or ``wss://HOST:PORT/PATH`` URL, or TargetError saying what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"the server URL {url!r} is not a valid URL ({exc}); {_EXPECTED}.") from exc
    if parts.scheme not in ("ws", "wss"):
        raise TargetError(f"the server URL {url!r} has scheme {parts.scheme or 'none'!r}, {_EXPECTED}.")
    if not parts.hostname:
        raise TargetError(f"the server URL {url!r} has no host; {_EXPECTED}.")
    if port is None:
        raise TargetError(f"the server URL {url!r} has no port; {_EXPECTED}, e.g. {parts.scheme}://127.0.0.1:8765/ws.")
    if not parts.path or parts.path == "/":
        raise TargetError(f"the server URL {url!r} has no path; {_EXPECTED}, e.g. {parts.scheme}://127.0.0.1:{port}/ws.")
    return parts.hostname, port, parts.path


def is_tls_url(url: str | None) -> bool:
    """Whether the suite speaks TLS to this URL (``wss://``)."""
    return bool(url) and urlsplit(url or "").scheme == "wss"


class ClientTLS:
    """How the suite checks a ``wss://`` server's certificate: ``--ca-file`` and ``--insecure``."""

    def __init__(self, ca_file: str | None = None, insecure: bool = False) -> None:
        if ca_file and insecure:
            raise TargetError(
                "--ca-file and --insecure exclude each other; pass --ca-file PATH to verify the server "
                "against a private CA, or --insecure to skip verification."
            )
        self.ca_file = ca_file or None
        self.insecure = bool(insecure)
        self._context: ssl.SSLContext | None = None
        if self.ca_file:
            self.context()  # an unreadable --ca-file is reported at once, not at the first connection

    @property
    def verify(self) -> bool:
        return not self.insecure

    def context(self) -> ssl.SSLContext:
        """The client context: the system trust store, the private CA, or no verification at all."""
        if self._context is None:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except FileNotFoundError:
                raise TargetError(f"--ca-file {self.ca_file}: no such file.") from None
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
                raise TargetError(
                    f"--ca-file {self.ca_file} holds no usable PEM CA certificate ({reason})."
                ) from None
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context
        return self._context

    def describe(self) -> dict[str, Any]:
        """What the reports say: whether certificates were verified, and against what."""
        return {"verify": self.verify, "ca_file": self.ca_file}


def tls_problem(exc: BaseException, url: str) -> str | None:
    """The one line for a TLS handshake with ``url`` that failed with ``exc`` (or its cause), else None."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and not isinstance(cause, ssl.SSLError) and seen < 8:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = f"{cause.reason or 'CERTIFICATE_VERIFY_FAILED'}: {cause.verify_message or cause.strerror}"
        return (
            f"the server's TLS certificate at {url} did not verify ({detail}); "
            "pass --ca-file PATH for a private CA, or --insecure to skip verification."
        )
    if isinstance(cause, ssl.SSLError):
        return (
            f"the TLS handshake with {url} failed ({cause.reason or cause}); check that the server "
            "serves wss:// on that port."
        )
    return None


def _pids_listening_on(port: int, processes: Sequence[psutil.Process]) -> list[int]:
    found = []
    for proc in processes:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # it exited while we looked; it is not the listener
        except psutil.AccessDenied:
            continue  # not ours to inspect; a process we launched always is
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                found.append(proc.pid)
                break
    return found


class Target:
    """A server for the suite; see the subclasses.

    ``url`` is None until the target has started (a launched server reports
    its port). ``can_crash`` says whether the suite may SIGKILL and restart it,
    which checks of durability across crashes need. ``tls`` says how a
    ``wss://`` server's certificate is checked (`make_target` sets it).
    """

    kind: str = "abstract"
    can_crash: bool = False

    def __init__(self, secret: str | None) -> None:
        self.url: str | None = None
        self.secret = secret
        """The server's token secret; None when credentials come from --token-cmd or --identities."""
        self.tls = ClientTLS()

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise TargetError(f"the {self.kind} target cannot be killed; the suite did not start it.")

    def restart(self) -> None:
        raise TargetError(f"the {self.kind} target cannot be restarted; the suite did not start it.")

    def stop(self) -> None:
        """Release the target; a no-op for one the suite did not start."""

    def died(self) -> str | None:
        return None

    def server_pid(self) -> int | None:
        return None

    def output_tail(self, n: int = 40) -> str:
        return ""

    def describe(self) -> dict[str, Any]:
        """What the reports say about the target (never the secret); ``tls`` for a wss:// server,
        or whenever a TLS option was given, so a run without verification always says so."""
        described: dict[str, Any] = {"kind": self.kind, "url": self.url}
        if is_tls_url(self.url) or self.tls.ca_file or self.tls.insecure:
            described["tls"] = self.tls.describe()
        return described

    def __enter__(self) -> Target:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _OutputBuffer:
    """The last lines a server wrote on stdout and stderr, interleaved as they came."""

    def __init__(self, maxlen: int = OUTPUT_LINES_KEPT) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def tail(self, n: int) -> str:
        with self._lock:
            lines = list(self._lines)[-n:] if n > 0 else []
        return "\n".join(lines)


class LaunchedTarget(Target):
    """A server process the suite starts, watches, kills and restarts.

    Subclasses say what to run (``_command``) and with which environment.
    """

    can_crash = True

    def __init__(self, secret: str | None, ready_timeout_s: float | None = None) -> None:
        super().__init__(secret)
        self.ready_timeout_s = DEFAULT_READY_TIMEOUT_S if ready_timeout_s is None else float(ready_timeout_s)
        self._proc: subprocess.Popen[bytes] | None = None
        self._output = _OutputBuffer()
        self._drains: list[threading.Thread] = []
        self._ready = threading.Event()
        self._ready_url: str | None = None
        self._listener_pid: int | None = None
        # Set when the suite itself ended the process, so that its exit is not
        # reported as the server dying by itself.
        self._ended_by_us = False
        self._starts = 0

    # -- what to run ----------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.secret:
            env[SECRET_ENV] = self.secret
        # Python servers buffer stdout when it is a pipe; the ready line must
        # arrive when it is printed, not when 8 KiB have piled up.
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _cwd(self) -> str | None:
        return None

    def _command_text(self) -> str:
        return shlex.join(self._command())

    # -- life cycle -----------------------------------------------------------

    def _drain(self, stream: IO[bytes], name: str) -> None:
        prefix = "" if name == "stdout" else "[stderr] "
        try:
            while True:
                chunk = stream.readline(MAX_LINE_BYTES)
                if not chunk:
                    break
                line = chunk.decode("utf-8", errors="replace").rstrip("\r\n")
                self._output.add(prefix + line)
                if name == "stdout" and not self._ready.is_set():
                    match = _READY_LINE.fullmatch(line.strip())
                    if match:
                        self._ready_url = match.group(1)
                        self._ready.set()
        except (OSError, ValueError) as exc:
            # The pipe went away under us (the process was reaped and the
            # stream closed); record it, since a lost drain would block the server.
            self._output.add(f"[partywall] stopped reading the server's {name}: {exc}")
        finally:
            stream.close()

    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self._running():
            raise TargetError(
                f"the {self.kind} server is already running (pid {self._proc.pid if self._proc else '?'}); "
                "call stop() or kill() before start()."
            )
        self._ready.clear()
        self._ready_url = None
        self._listener_pid = None
        self._ended_by_us = False
        self.url = None
        self._starts += 1
        command = self._command()
        if self._starts > 1:
            self._output.add(f"[partywall] starting the server again (start {self._starts})")
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(),
                cwd=self._cwd(),
                # A session of its own is a process group of its own: kill()
                # reaches everything the command forked, and a Ctrl-C at the
                # terminal reaches the suite only, which then stops the server.
                start_new_session=True,
            )
        except OSError as exc:
            raise TargetError(
                f"the server command {self._command_text()!r} could not be started ({exc}); "
                "check that it exists and is executable."
            ) from exc
        proc = self._proc
        assert proc.stdout is not None and proc.stderr is not None
        self._drains = [
            threading.Thread(target=self._drain, args=(proc.stdout, "stdout"),
                             name=f"partywall-drain-stdout-{proc.pid}", daemon=True),
            threading.Thread(target=self._drain, args=(proc.stderr, "stderr"),
                             name=f"partywall-drain-stderr-{proc.pid}", daemon=True),
        ]
        for thread in self._drains:
            thread.start()
        try:
            self._wait_ready(proc)
        except BaseException:
            # Ctrl-C or a time-out while waiting: the server is in a session of
            # its own, so nothing else would ever stop it. Re-raised as it came.
            self._ended_by_us = True
            self._kill_group()
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(timeout=0.05):
            code = proc.poll()
            if code is not None:
                # Let the drains catch the last words before quoting them.
                self._join_drains(1.0)
                if self._ready.is_set():
                    break
                self._ended_by_us = True
                self._kill_group()
                raise TargetError(
                    f"the server command {self._command_text()!r} exited with code {code} before "
                    f"printing 'listening on ws://HOST:PORT/ws' (or wss://); its last output:\n"
                    f"{self.output_tail() or '(no output)'}"
                )
            if time.monotonic() >= deadline:
                self._ended_by_us = True
                self._kill_group()
                self._join_drains(1.0)
                raise TargetError(
                    f"the server command {self._command_text()!r} did not print "
                    f"'listening on ws://HOST:PORT/ws' (or wss://) within {self.ready_timeout_s:g} s, so it "
                    f"was killed; its last output:\n{self.output_tail() or '(no output)'}"
                )
        assert self._ready_url is not None
        host, port, path = parse_ws_url(self._ready_url)
        # A server bound to every interface reports the wildcard address; the
        # suite connects over loopback, which reaches it the same way.
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        shown = f"[{host}]" if ":" in host else host
        scheme = "wss" if is_tls_url(self._ready_url) else "ws"
        self.url = f"{scheme}://{shown}:{port}{path}"

    def _join_drains(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._drains:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _group_processes(self) -> list[psutil.Process]:
        """Every live process in the server's process group (the shell and what it forked)."""
        if self._proc is None:
            return []
        pgid = self._proc.pid  # start_new_session makes the leader's pid the group id
        members = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue  # exited between the listing and the question
        return members

    def _kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group has already exited
        if sig == signal.SIGKILL:
            self._proc.wait()
            # The leader is reaped; the server it forked may take a moment longer to be
            # gone (a loaded machine delivers the signal late). A crash is over only when
            # no process of the group runs, so a restart never meets the old server.
            deadline = time.monotonic() + STOP_GRACE_S
            while self._group_processes() and time.monotonic() < deadline:
                time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it, as a crash would end it."""
        if self._proc is None:
            return
        self._ended_by_us = True
        self._kill_group(signal.SIGKILL)
        self._join_drains(2.0)
        self._listener_pid = None

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, wait up to ``timeout`` seconds, then SIGKILL what is left."""
        if self._proc is None:
            return
        self._ended_by_us = True
        deadline = time.monotonic() + timeout
        self._kill_group(signal.SIGTERM)
        # Wait for the whole group, not only the leader: the shell may exit at
        # once while the server it forked still shuts down. poll() reaps the
        # leader, so it does not linger as a zombie member of the group.
        while True:
            self._proc.poll()
            left = self._group_processes()
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if left:
            pids = ", ".join(str(p.pid) for p in left)
            self._output.add(
                f"[partywall] the server's processes ({pids}) ignored SIGTERM for {timeout:g} s; "
                "sending SIGKILL"
            )
        self._kill_group(signal.SIGKILL)
        self._join_drains(2.0)
        self._listener_pid = None

    def restart(self) -> None:
        """Start the server again as after a crash (SIGKILL first if it still runs).

        The port may change, so the ready line is read again and ``url``
        updated. For a graceful restart call stop() then start().
        """
        if self._running():
            self.kill()
        self.start()

    def died(self) -> str | None:
        """Why the server is gone if it went by itself, else None."""
        if self._proc is None or self._ended_by_us:
            return None
        pid = self._listener_pid
        listener_alive = True
        if pid is not None:
            try:
                listener_alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                listener_alive = False
        # Polled after the listener check: when the shell exec'd the server
        # they are one process, and its exit status is the better account.
        code = self._proc.poll()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            return f"the server {how} by itself; its last output:\n{self.output_tail(20)}"
        if pid is not None:
            if not listener_alive and pid != self._proc.pid:
                return (
                    f"the process listening on the server's port (pid {pid}) exited by itself, "
                    f"though the command's shell still runs; its last output:\n{self.output_tail(20)}"
                )
        return None

    def server_pid(self) -> int | None:
        """Pid of the process listening on the URL's port, found in the server's process group."""
        if self.url is None or not self._running():
            return None
        if self._listener_pid is not None and psutil.pid_exists(self._listener_pid):
            return self._listener_pid
        _, port, _ = parse_ws_url(self.url)
        # The listening socket exists before the ready line is printed, but a
        # wrapper might print for the server; allow it a moment to show up.
        deadline = time.monotonic() + 2.0
        while True:
            pids = _pids_listening_on(port, self._group_processes())
            if pids or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not pids:
            return None
        # Forked workers may share the listening socket; the group's eldest
        # (the lowest pid, normally the parent) stands for the server.
        self._listener_pid = min(pids)
        return self._listener_pid

    def pid(self) -> int | None:
        """Pid of the launched command itself (the shell for ``sh -c``)."""
        return self._proc.pid if self._proc is not None else None

    def output_tail(self, n: int = 40) -> str:
        return self._output.tail(n)


class EmbeddedTarget(LaunchedTarget):
    """The reference server, ``python -m partywall_agentserver``, on a free port with a fresh database.

    The secret is random per target; restarts reuse the same database (so data
    persists across a crash) and the same secret (so tokens stay valid).
    """

    kind = "embedded"

    def __init__(
        self,
        db_dir: str | os.PathLike[str] | None = None,
        server_args: Sequence[str] = (),
        *,
        ready_timeout_s: float | None = None,
    ) -> None:
        super().__init__(secrets.token_urlsafe(32), ready_timeout_s)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if db_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="partywall-")
            self.db_dir = Path(self._tmp.name)
        else:
            self.db_dir = Path(db_dir)
            self.db_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.db_dir / "agentserver.db"
        self.server_args = tuple(server_args)

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "partywall_agentserver",
            "--host", "127.0.0.1", "--port", "0", "--db", str(self.db_path),
            *self.server_args,
        ]

    def _cwd(self) -> str:
        # Not the caller's directory: `-m` puts the working directory first on
        # sys.path, and a stray package folder there must not shadow the installed one.
        return str(self.db_dir)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # stop() alone keeps the database, so stop() + start() restarts
        # gracefully with the data; leaving the block is the end of it.
        try:
            self.stop()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Delete the temporary database directory (if the target made one)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class CommandTarget(LaunchedTarget):
    """``--server-cmd``: run CMD with ``sh -c`` in a process group of its own, adding no arguments.

    The command names its own storage, so data survives a restart; the secret
    is also put in its environment as PARTYWALL_AUTH_SECRET, which the
    reference server reads (a command may ignore it and take its own).
    """

    kind = "command"

    def __init__(self, cmd: str, secret: str | None, *, ready_timeout_s: float | None = None) -> None:
        if not cmd.strip():
            raise TargetError("the server command is empty; pass --server-cmd 'COMMAND THAT STARTS THE SERVER'.")
        super().__init__(secret, ready_timeout_s)
        self.cmd = cmd

    def _command(self) -> list[str]:
        return ["sh", "-c", self.cmd]

    def _command_text(self) -> str:
        return self.cmd

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cmd": self.cmd}


class UrlTarget(Target):
    """A server that is already running at ``url``; the suite cannot crash or restart it.

    ``pid`` (``--server-pid``) names its process for resource sampling; without
    it, a server on this machine is looked up by its listening port where the
    operating system lets us see it.
    """

    kind = "url"
    can_crash = False

    def __init__(self, url: str, secret: str | None, *, pid: int | None = None,
                 connect_timeout_s: float = 3.0) -> None:
        super().__init__(secret)
        self.url = url
        self._pid = pid
        self.connect_timeout_s = connect_timeout_s
        parse_ws_url(url)  # a malformed URL is reported at once, not at start()

    def start(self) -> None:
        assert self.url is not None
        host, port, _ = parse_ws_url(self.url)
        deadline = time.monotonic() + self.connect_timeout_s
        last: OSError | None = None
        # Retry briefly: a server started just before the suite may not be
        # listening yet, and a refused connection is immediate.
        while True:
            try:
                with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())):
                    break
            except OSError as exc:
                last = exc
            if time.monotonic() + 0.1 >= deadline:
                reason = last.strerror if last is not None and last.strerror else str(last)
                if isinstance(last, socket.gaierror):
                    raise TargetError(
                        f"the host of {self.url} could not be resolved ({reason}); fix --server-url."
                    ) from last
                raise TargetError(
                    f"nothing is listening at {self.url} ({(reason or 'no answer').lower()}); "
                    "start the server or fix --server-url."
                ) from last
            time.sleep(0.1)
        if is_tls_url(self.url):
            self._check_tls(host, port)
        if self._pid is not None and not psutil.pid_exists(self._pid):
            raise TargetError(
                f"--server-pid {self._pid} names no running process; pass the pid of the process "
                f"that listens at {self.url}, or leave it out."
            )

    def _check_tls(self, host: str, port: int) -> None:
        """One TLS handshake, so that a certificate that does not verify is one line now."""
        assert self.url is not None
        timeout = max(self.connect_timeout_s, 1.0)
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                with self.tls.context().wrap_socket(sock, server_hostname=host):
                    pass
        except ssl.SSLError as exc:
            raise TargetError(tls_problem(exc, self.url) or str(exc)) from exc
        except TimeoutError as exc:
            raise TargetError(
                f"the TLS handshake with {self.url} did not finish within {timeout:g} s; check that "
                "the server serves wss:// on that port."
            ) from exc
        except OSError as exc:
            raise TargetError(
                f"the TLS handshake with {self.url} failed ({exc.strerror or exc}); check that the "
                "server serves wss:// on that port."
            ) from exc

    def server_pid(self) -> int | None:
        if self._pid is not None:
            return self._pid
        assert self.url is not None
        host, port, _ = parse_ws_url(self.url)
        try:
            local = {str(a[4][0]) for a in socket.getaddrinfo(host, port)}
        except OSError:
            return None
        if not any(addr.startswith("127.") or addr == "::1" for addr in local):
            return None  # another machine: its processes are not ours to see
        try:
            conns = psutil.net_connections(kind="inet")
        except psutil.AccessDenied:
            return None
        pids = {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr
                and c.laddr.port == port and c.pid is not None}
        # Only an unambiguous answer: sampling the wrong process is the very
        # mistake this module exists to avoid.
        return pids.pop() if len(pids) == 1 else None


def make_target(
    server_url: str | None = None,
    server_cmd: str | None = None,
    auth_secret: str | None = None,
    server_args: Sequence[str] = (),
    *,
    server_pid: int | None = None,
    ready_timeout_s: float | None = None,
    credentials_from: str | None = None,
    ca_file: str | None = None,
    insecure: bool = False,
) -> Target:
    """The target the command-line options ask for, or TargetError saying which option to fix.

    No URL and no command: the embedded reference server. ``--server-url`` and
    ``--server-cmd`` exclude each other and need ``--auth-secret`` (which
    `partywall.config` also reads from PARTYWALL_AUTH_SECRET), the secret the
    server signs tokens with, unless ``credentials_from`` names the option
    that gives credentials without it (``--token-cmd``, ``--identities``):
    then the secret is optional. Those are for a server of the team's own,
    never the embedded one, whose secret is random.

    ``ca_file`` and ``insecure`` (``--ca-file``, ``--insecure``) say how a
    ``wss://`` server's certificate is checked: the system's trust store by
    default; they exclude each other, and an unreadable CA file is refused here.
    """
    tls = ClientTLS(ca_file, insecure)
    if server_url and server_cmd:
        raise TargetError(
            "--server-url and --server-cmd exclude each other; pass --server-url for a server that "
            "is already running, or --server-cmd for one the suite should start."
        )
    secret = auth_secret or None
    if server_args and (server_url or server_cmd):
        raise TargetError(
            "server arguments apply to the embedded server only; put them in --server-cmd instead."
        )
    if server_pid is not None and not server_url:
        raise TargetError(
            "--server-pid is for --server-url only; for a server the suite starts it finds the pid itself."
        )
    if server_url or server_cmd:
        option = "--server-url" if server_url else "--server-cmd"
        if not secret and not credentials_from:
            raise TargetError(
                f"{option} needs the server's token secret: pass --auth-secret SECRET or set "
                f"{SECRET_ENV}; without the secret, --token-cmd CMD or --identities FILE give credentials."
            )
        if server_url:
            return _with_tls(UrlTarget(server_url, secret, pid=server_pid), tls)
        assert server_cmd is not None
        return _with_tls(CommandTarget(server_cmd, secret, ready_timeout_s=ready_timeout_s), tls)
    if auth_secret:
        raise TargetError(
            "--auth-secret applies to --server-url or --server-cmd; the embedded server makes a "
            "random secret of its own."
        )
    if credentials_from:
        raise TargetError(
            f"{credentials_from} applies to --server-url or --server-cmd; the embedded server makes a "
            "random secret of its own, which no token command knows."
        )
    return _with_tls(EmbeddedTarget(None, server_args, ready_timeout_s=ready_timeout_s), tls)


def _with_tls(target: Target, tls: ClientTLS) -> Target:
    target.tls = tls
    return target
