"""The bench beyond one process: shards in N processes here, or as tasks of a Dask cluster.

``partywall bench --workers N`` runs shard K of N (``--shard K/N``, the users
with index % N == K-1) in N child processes of this machine;
``partywall bench --dask ADDRESS`` runs each shard as a task of a Dask
distributed cluster, and the task runs the same child command on its
worker. Either way the launcher writes one report, merged with
`partywall.benchreport.merge_reports`: percentiles are read from the merged
HDR histograms of every shard (nearest rank over the union of all samples,
3 significant figures), never averaged.

One start for all. Each child prepares everything first (settings, session,
credentials, the plan), then, at the instant its clock would start
(`partywall_props.bench.BenchRun.run`), prints one line ``partywall-gate
ready {...}`` (its shard, partywall's version, its pid) and waits, bounded,
for a line ``go`` on its standard input (``--start-gate stdio``). The
launcher waits, bounded, for every child's ready line, checks each version,
then writes ``go`` to all of them at once. Under Dask the barrier runs
through the cluster: a task whose child is ready puts a note on a cluster
`Queue`; once all are ready the client sets a `Variable` to ``go`` and an
`Event` that every task waits on. No wall clock decides when to start.

One server. With no target option the launcher starts one embedded server
(or the ``--server-cmd`` one) itself and gives every child ``--server-url``,
``--server-pid`` (where the child runs on this machine, so the server's
resources are sampled where it runs) and the secret in its environment.
The children share one tenant prefix (``PARTYWALL_BENCH_RUN``), so a tenant
of the plan holds users driven by several processes.

A shard that could not take part (it died, never said ready, runs another
partywall version, or its Dask worker failed or left) is one line naming the
shard and why, exit 2, and the merged report of the shards that did run,
saying which shard is missing.

Every wait is bounded by the settings' ``[bench]`` table: a shard's ready
line by ``shard_ready_timeout_s``, reaching a Dask scheduler and finding a
worker there by ``dask_connect_timeout_s``, a shard's run after ``go`` by the
bench's own budget for one user plus ``shard_finish_slack_s``. A shard waits
for ``go`` `GO_MARGIN_S` longer than its launcher waits for ready lines
(`go_timeout_s`), so a live launcher always decides first; the launcher tells
each shard that wait in its environment (`GO_TIMEOUT_ENV`), as it tells a
Dask task in the task's spec.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from partywall import __version__
from partywall import config as configmod
from partywall.benchreport import BenchReport, ReportError, ShardInfo, format_summary, merge_reports
from partywall.errors import HarnessError
from partywall.target import SECRET_ENV, Target, make_target

GATE_PREFIX = "partywall-gate"
"""The first word of a child's ready line."""
GATE_MODES = ("stdio",)
#: A child waits for ``go`` this much longer after its ready line than the launcher
#: waits for the slowest ready line (``bench.shard_ready_timeout_s``), so a live
#: launcher always decides first (`go_timeout_s`).
GO_MARGIN_S = 30.0
#: The child's wait for ``go``, in seconds, as its launcher tells it (`go_timeout_s` of the launcher's settings).
GO_TIMEOUT_ENV = "PARTYWALL_BENCH_GO_TIMEOUT_S"
STOP_GRACE_S = 5.0
OUTPUT_LINES_KEPT = 200
RUN_ENV = "PARTYWALL_BENCH_RUN"

#: The options (without a file key) a shard is given as they are; the target's
#: are its own (--server-url, --server-pid, the secret in its environment), and
#: the outputs (--report, --junit, --html, metrics) are the merged run's.
_FOR_SHARDS = ("seed", "token_cmd", "identities", "ca_file", "insecure")


# ---------------------------------------------------------------------------
# The limits, from the settings
# ---------------------------------------------------------------------------


def go_timeout_s(config: configmod.Settings | Mapping[str, Any]) -> float:
    """How long a shard waits for ``go`` after its ready line: the launcher's wait for ready lines, and a margin.

    ``config`` is the settings (`partywall.config.Settings`, or its table).
    """
    return float(config["bench"]["shard_ready_timeout_s"]) + GO_MARGIN_S


def gate_timeout_s(environ: Mapping[str, str]) -> float:
    """The child's wait for ``go``: what its launcher put in `GO_TIMEOUT_ENV`, else that of the packaged defaults."""
    text = environ.get(GO_TIMEOUT_ENV)
    if text is None:
        return go_timeout_s(configmod.defaults())
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise HarnessError(f"{GO_TIMEOUT_ENV} must be a finite number of seconds greater than 0 (got {text!r}); "
                           "`partywall bench --workers N` or `--dask ADDRESS` sets it for the shards they start.")
    return value


# ---------------------------------------------------------------------------
# The child's side: the gate
# ---------------------------------------------------------------------------


def start_gate(mode: str, shard: tuple[int, int] | None) -> Callable[[], None]:
    """The gate of ``--start-gate MODE``, checked now; call it at the instant the clock would start."""
    if mode not in GATE_MODES:
        raise HarnessError(f"--start-gate accepts {', '.join(GATE_MODES)} (got {mode!r}); it is set by "
                           "`partywall bench --workers N` or `--dask ADDRESS` for the shards they start.")
    label = f"{shard[0] + 1}/{shard[1]}" if shard is not None else None
    timeout_s = gate_timeout_s(os.environ)

    def wait() -> None:
        wait_at_gate(label, timeout_s=timeout_s)

    return wait


def wait_at_gate(label: str | None, *, timeout_s: float, stdin_fd: int = 0,
                 out: IO[str] | None = None) -> None:
    """Say ready on stdout, then wait up to ``timeout_s`` for a line ``go`` on ``stdin_fd``."""
    out = out if out is not None else sys.stdout
    info = {"shard": label, "version": __version__, "pid": os.getpid()}
    out.write(f"{GATE_PREFIX} ready {json.dumps(info, sort_keys=True)}\n")
    out.flush()
    deadline = time.monotonic() + timeout_s
    got = b""
    while b"\n" not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HarnessError(f"the start gate got no 'go' within {timeout_s:g} s of this shard's ready line; "
                               "the launcher that started it is gone or stuck.")
        try:
            readable, _, _ = select.select([stdin_fd], [], [], min(left, 1.0))
            chunk = os.read(stdin_fd, 64) if readable else None
        except OSError as exc:
            raise HarnessError(f"the start gate cannot read its standard input ({exc.strerror or exc}); "
                               "--start-gate stdio is for shards that `partywall bench --workers` starts.") from None
        if chunk == b"":
            raise HarnessError("the start gate's standard input closed before 'go': the launcher stopped the run "
                               "(another shard failed) or went away.")
        got += chunk or b""
    line = got.split(b"\n", 1)[0].strip()
    if line != b"go":
        raise HarnessError(f"the start gate expected 'go' and read {line[:60]!r}; the run was called off.")


def parse_ready(line: str) -> dict[str, Any] | None:
    """The fields of a ready line, or None when the line is something else the child printed."""
    text = line.strip()
    if not text.startswith(f"{GATE_PREFIX} ready "):
        return None
    try:
        info = json.loads(text[len(GATE_PREFIX) + len(" ready "):])
    except ValueError:
        return {"damaged": text[:200]}
    return info if isinstance(info, dict) else {"damaged": text[:200]}


def ready_problem(info: Mapping[str, Any], label: str, version: str = __version__) -> str | None:
    """Why a shard's ready line is not good enough to start it, or None."""
    if "damaged" in info:
        return f"its ready line is damaged ({info['damaged']!r})"
    if info.get("version") != version:
        return (f"it runs partywall {info.get('version')!r} and the launcher {version!r}; install one version "
                "everywhere the shards run")
    if info.get("shard") != label:
        return f"it says it is shard {info.get('shard')!r}"
    return None


# ---------------------------------------------------------------------------
# One child process (used here for --workers, and on a Dask worker by its task)
# ---------------------------------------------------------------------------


class ShardProblem(Exception):
    """A shard could not take part; the message says why (without the shard's name)."""


class Child:
    """``partywall bench --shard K/N --start-gate stdio ...`` as a process: its output drained and kept."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, label: str) -> None:
        self.label = label
        self.argv = list(argv)
        self._lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.ready_info: dict[str, Any] | None = None
        self.ready_at: float | None = None
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=dict(env), cwd=cwd)
        except OSError as exc:
            raise ShardProblem(f"its command could not be started ({exc})") from None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._drains = [threading.Thread(target=self._drain, args=(s, name), daemon=True,
                                         name=f"partywall-shard-{label}-{name}")
                        for s, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr"))]
        for t in self._drains:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain(self, stream: IO[bytes], name: str) -> None:
        try:
            for raw in iter(lambda: stream.readline(4096), b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                info = parse_ready(line) if name == "stdout" and not self._ready.is_set() else None
                if info is not None:
                    self.ready_info, self.ready_at = info, time.monotonic()
                    self._ready.set()
                    continue
                with self._lock:
                    self._lines.append(line if name == "stdout" else f"[stderr] {line}")
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    def tail(self, n: int = 20) -> list[str]:
        with self._lock:
            return list(self._lines)[-n:]

    def last_words(self) -> str:
        """The last line the child wrote on stderr that says something (its own one-line reason)."""
        for line in reversed(self.tail(40)):
            text = line.removeprefix("[stderr] ").strip()
            if line.startswith("[stderr]") and text and not text.startswith("bench:"):
                return text.removeprefix("partywall: ")
        return ""

    def exit_text(self, code: int | None) -> str:
        if code is None:
            return "it is still running"
        if code < 0:
            return f"it was killed by signal {-code}"
        said = self.last_words()
        return f"it exited with code {code}" + (f" ({said})" if said else "")

    def wait_ready(self, deadline: float, bound_s: float) -> dict[str, Any]:
        """The ready line's fields; ShardProblem when the child exits or the deadline passes first.

        ``bound_s`` is the wait the deadline stands for, as the problem names it.
        """
        while not self._ready.wait(timeout=0.05):
            code = self.proc.poll()
            if code is not None:
                for t in self._drains:
                    t.join(1.0)
                if self._ready.is_set():
                    break
                raise ShardProblem(f"{self.exit_text(code)} before it was ready")
            if time.monotonic() >= deadline:
                raise ShardProblem(f"it did not say ready within {bound_s:g} s")
        assert self.ready_info is not None
        return self.ready_info

    def go(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died at the gate: its exit code tells
        self.close_stdin()

    def close_stdin(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, deadline: float) -> int | None:
        try:
            code = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None
        for t in self._drains:
            t.join(2.0)
        return code

    def stop(self) -> None:
        """Call it off: close the gate (the child exits 2 by itself), then SIGKILL if it lingers."""
        self.close_stdin()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# What every shard is told, and what came back
# ---------------------------------------------------------------------------


@attrs.define
class ShardRun:
    """One shard of the launch, what became of it, and its report."""

    index: int
    count: int
    where: str = ""
    """The process or Dask worker that ran it."""
    pid: int | None = None
    exit_code: int | None = None
    problem: str | None = None
    """Why it is missing from the merged report (None when it ran)."""
    report: BenchReport | None = None
    ready_s: float | None = None
    """Seconds from the launch to its ready line."""

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.count}"

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {"shard": self.label, "index": self.index, "where": self.where, "pid": self.pid,
                "exit_code": self.exit_code, "ready_s": self.ready_s, "ran": r is not None, "problem": self.problem,
                "users": r.users if r else None, "ok": r.ok if r else None,
                "started_at": r.started_at if r else None}


def shard_words(found: configmod.Settings) -> list[str]:
    """The command-line words that give a shard the launcher's settings, wherever it runs.

    Every [tool.partywall] key not at its default becomes ``--set KEY=VALUE``,
    and the options of `_FOR_SHARDS` that are set are passed as themselves;
    a shard reads no project file of its own (an empty ``--config``) and no
    PARTYWALL_* variable (`child_env`), so it resolves what the launcher did.
    """
    words: list[str] = []
    for dotted, source in sorted(found.sources.items()):
        if source.startswith(configmod.DEFAULTS_SOURCE) or dotted.startswith("profiles."):
            continue
        if dotted in ("server_url", "server_cmd"):
            continue  # the launcher gives each shard the one server
        value: Any = found.table
        for part in dotted.split("."):
            value = value[part]
        words += ["--set", f"{dotted}={json.dumps(value, ensure_ascii=False)}"]
    for name in _FOR_SHARDS:
        opt, value = configmod.OPTION[name], found.get(name)
        if value in (None, False, []):
            continue
        words += [opt.flag] if opt.kind == "flag" else [opt.flag, str(value)]
    return words


def child_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: this one without PARTYWALL_* (the settings travel as options), plus ``extra``."""
    env = {k: v for k, v in base.items() if not k.startswith("PARTYWALL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def child_command(words: Sequence[str], *, config: str, report: str, label: str, url: str,
                  server_pid: int | None) -> list[str]:
    argv = [sys.executable, "-m", "partywall.cli", "bench", *words, "--config", config, "--shard", label,
            "--report", report, "--start-gate", "stdio", "--server-url", url]
    if server_pid is not None:
        argv += ["--server-pid", str(server_pid)]
    return argv


def empty_config(folder: str) -> str:
    path = Path(folder) / "partywall-shard.toml"
    path.write_text("# every setting comes as --set from the launcher\n[tool.partywall]\n", encoding="utf-8")
    return str(path)


def read_report(path: str) -> tuple[BenchReport | None, str]:
    """(the shard's report, "") or (None, why it cannot go into the merge)."""
    if not Path(path).is_file():
        return None, "it wrote no report"
    try:
        report = BenchReport.read(path)
    except ReportError as exc:
        return None, f"its report is unreadable ({exc})"
    if report.error:
        return None, f"it could not run: {report.error}"
    return report, ""


def finish_budget_s(found: configmod.Settings) -> float:
    """How long a shard may run after 'go': the bench's own budget for one user, and slack.

    The slack (``bench.shard_finish_slack_s``) is for the shard's report and its driver's close.
    """
    bench = found["bench"]
    per_user = (2 * float(found["connect_timeout_s"])
                + float(bench["request_timeout_s"]) * (3 + int(bench["messages_per_user"])) + 15.0)
    return per_user + float(bench["shard_finish_slack_s"])


# ---------------------------------------------------------------------------
# The launch
# ---------------------------------------------------------------------------


class Launch:
    """What both kinds share: the one server, the settings for the shards, the merge, the verdict."""

    mode = "processes"

    def __init__(self, found: configmod.Settings, count: int, *, verbose: bool = False) -> None:
        self.found = found
        self.verbose = verbose
        if found.get("shard"):
            raise HarnessError("--shard runs one shard by itself; --workers and --dask run every shard: "
                               "give one or the other.")
        if found.get("start_gate"):
            raise HarnessError("--start-gate is for the shards a launcher starts; leave it out with "
                               "--workers or --dask.")
        self.set_count(count)
        # The limits of the launch ([bench] of the settings): from starting a shard to its ready
        # line; a shard's wait for 'go' after it; reaching a Dask scheduler and finding a worker there.
        bench = found["bench"]
        self.ready_timeout_s = float(bench["shard_ready_timeout_s"])
        self.go_timeout_s = go_timeout_s(found)
        self.dask_connect_timeout_s = float(bench["dask_connect_timeout_s"])
        self.run_token = secrets.token_hex(8)
        self.words = shard_words(found)
        self.target: Target | None = None
        self.url: str | None = None
        self.server_pid: int | None = found.get("server_pid")
        self.secret: str | None = found.get("auth_secret")
        self.t0 = time.monotonic()
        self.ready_spread_s: float | None = None
        self.written = False
        self.merged: BenchReport | None = None

    def set_count(self, count: int) -> None:
        users = int(self.found["bench"]["users"])
        if count > users:
            raise HarnessError(f"{count} shards for {users} users would leave a shard without users; "
                               f"use at most {users} shards.")
        self.count = count
        self.shards = [ShardRun(k, count) for k in range(count)]

    # -- the one server ----------------------------------------------------------

    def start_server(self) -> None:
        found = self.found
        if found.get("server_url"):
            self.url = str(found.get("server_url"))
            return
        # The embedded server (or --server-cmd's), started once for every shard.
        from partywall.credentials import secretless_option

        self.target = make_target(None, found.get("server_cmd"), found.get("auth_secret"),
                                  ready_timeout_s=float(found["server_ready_timeout_s"]),
                                  credentials_from=secretless_option(found.get),
                                  ca_file=found.get("ca_file"), insecure=bool(found.get("insecure")))
        self.target.start()
        self.url = self.target.url
        self.server_pid = self.target.server_pid()
        self.secret = self.target.secret

    def stop_server(self) -> None:
        if self.target is not None:
            self.target.stop()
            cleanup = getattr(self.target, "cleanup", None)
            if cleanup is not None:
                cleanup()

    def shard_env(self) -> dict[str, str]:
        extra = {RUN_ENV: self.run_token, GO_TIMEOUT_ENV: repr(self.go_timeout_s)}
        if self.secret:
            extra[SECRET_ENV] = self.secret
        return extra

    def say(self, text: str) -> None:
        print(f"partywall bench: {text}", flush=True)

    # -- the report ----------------------------------------------------------------

    def problem_line(self) -> str | None:
        bad = [s for s in self.shards if s.problem]
        if not bad:
            return None
        named = "; ".join(f"shard {s.label} ({s.where}): {s.problem}" for s in bad)
        ran = [s.label for s in self.shards if s.report is not None]
        kept = f"the merged report holds shard{'s' * (len(ran) > 1)} {', '.join(ran)} only" if ran else "no shard ran"
        return f"{named}; {kept}"

    def merged_report(self) -> BenchReport:
        ran = [s for s in self.shards if s.report is not None]
        if ran:
            merged = merge_reports([s.report for s in ran if s.report is not None],
                                   names=[f"shard {s.label}" for s in ran])
        else:
            merged = BenchReport.of_error("no shard ran", seed=int(self.found["bench"]["seed"]))
            merged.shards = 0
            merged.missing_shards = [ShardInfo(s.index, s.count) for s in self.shards]
        if self.target is not None:
            merged.target = self.target.describe()
        problem = self.problem_line()
        if problem:
            merged.error = problem
            merged.ok = False
        from partywall.stats import LatencyHistogram

        starts = [s.report.started_at for s in ran if s.report is not None and s.report.started_at is not None]
        merged.extra["percentiles"] = {
            "method": "nearest rank over the union of every shard's samples, read from the shards' merged HDR "
                      "histograms; never an average of the shards' percentiles",
            "significant_figures": LatencyHistogram.SIGNIFICANT_FIGURES,
            "relative_error": 10.0 ** -LatencyHistogram.SIGNIFICANT_FIGURES,
            "range_ms": [LatencyHistogram.LOWEST_US / 1000.0, LatencyHistogram.HIGHEST_US / 1000.0],
            "exact": "max and mean are exact: the largest of the shards', and the count-weighted mean",
        }
        merged.extra["sharding"] = {
            "mode": self.mode,
            "count": self.count,
            "ran": [s.label for s in ran],
            "missing": [{"shard": s.label, "why": s.problem} for s in self.shards if s.report is None],
            "run": self.run_token,
            "ready_spread_s": self.ready_spread_s,
            "start_spread_ms": round((max(starts) - min(starts)) * 1000.0, 1) if len(starts) > 1 else None,
            "shards": [s.to_json() for s in self.shards],
        }
        return merged

    def finish(self) -> int:
        """Merge, write, print; the exit code (a missing shard: HarnessError, one line, exit 2)."""
        self.merged = merged = self.merged_report()
        written = self.write(merged)
        print(format_summary(merged))
        sharding = merged.extra["sharding"]
        if sharding["start_spread_ms"] is not None:
            print(f"shards: {len(sharding['ran'])} of {self.count} ran, their clocks started within "
                  f"{max(1.0, sharding['start_spread_ms']):.0f} ms of each other (start times are kept to 1 ms); "
                  "percentiles from their merged histograms (3 significant figures)")
        for path in written:
            print(f"wrote {path}")
        problem = self.problem_line()
        if problem:
            raise HarnessError(problem)
        if merged.error:
            raise HarnessError(merged.error)
        status = 0 if merged.ok else 1
        print(f"partywall bench: {'PASSED' if status == 0 else 'FAILED'} over {self.count} shards")
        return status

    def write(self, merged: BenchReport) -> list[str]:
        self.written = True
        found, written = self.found, []
        path = found.get("report")
        if path:
            merged.write(path)
            written.append(path)
        if found.get("junit") or found.get("html"):
            from partywall.reports import write_html, write_junit

            if found.get("junit"):
                write_junit(merged, found.get("junit"))
                written.append(found.get("junit"))
            if found.get("html"):
                write_html(merged, found.get("html"))
                written.append(found.get("html"))
        metrics, gateway = found.get("openmetrics"), found.get("pushgateway")
        if metrics or gateway:
            from partywall import openmetrics

            if metrics:
                openmetrics.write(merged.to_json(), metrics)
                written.append(metrics)
            if gateway:
                bench = found["bench"]
                written.append(openmetrics.push(merged.to_json(), str(gateway), float(bench["pushgateway_timeout_s"]),
                                                job=str(bench["pushgateway_job"])))
        return written


class ProcessLaunch(Launch):
    """``--workers N``: N child processes on this machine."""

    mode = "processes"

    def run(self) -> int:
        children: dict[int, Child] = {}
        with tempfile.TemporaryDirectory(prefix="partywall-shards-") as tmp:
            try:
                self.start_server()
                assert self.url is not None
                config = empty_config(tmp)
                env = child_env(os.environ, self.shard_env())
                self.say(f"{self.count} worker processes, {self.found['bench']['users']} users, against {self.url}")
                for s in self.shards:
                    argv = child_command(self.words, config=config, report=str(Path(tmp) / f"shard-{s.index + 1}.json"),
                                         label=s.label, url=self.url, server_pid=self.server_pid)
                    try:
                        children[s.index] = child = Child(argv, env, None, s.label)
                    except ShardProblem as exc:
                        s.problem = str(exc)
                        continue
                    s.pid, s.where = child.pid, f"pid {child.pid}"
                if self._gate(children):
                    self._await(children, tmp)
            finally:
                for child in children.values():
                    child.stop()
                self.stop_server()
            if self.verbose:
                for s in self.shards:
                    for line in children[s.index].tail(40) if s.index in children else []:
                        print(f"[shard {s.label}] {line}")
            return self.finish()

    def _gate(self, children: Mapping[int, Child]) -> bool:
        """Wait for every ready line; True when all are ready and 'go' went out to all."""
        deadline = time.monotonic() + self.ready_timeout_s
        for s in self.shards:
            child = children.get(s.index)
            if child is None:
                continue
            try:
                info = child.wait_ready(deadline, self.ready_timeout_s)
            except ShardProblem as exc:
                s.exit_code = child.proc.poll()
                s.problem = str(exc)
                continue
            s.ready_s = round((child.ready_at or time.monotonic()) - self.t0, 3)
            s.problem = ready_problem(info, s.label)
        if any(s.problem for s in self.shards):
            return False
        readies = [c.ready_at for c in children.values() if c.ready_at is not None]
        self.ready_spread_s = round(max(readies) - min(readies), 3) if readies else None
        for child in children.values():  # one instant for all: nothing else happens in this loop
            child.go()
        self.say(f"all {self.count} shards ready; go")
        return True

    def _await(self, children: Mapping[int, Child], tmp: str) -> None:
        budget = finish_budget_s(self.found)
        deadline = time.monotonic() + budget
        for s in self.shards:
            child = children[s.index]
            s.exit_code = code = child.wait(deadline)
            if code is None:
                child.proc.kill()
                child.proc.wait()
                s.problem = f"it did not finish within {budget:g} s of 'go', so it was killed"
            elif code not in (0, 1):
                s.problem = f"{child.exit_text(code)} mid-run"
            else:
                s.report, why = read_report(str(Path(tmp) / f"shard-{s.index + 1}.json"))
                s.problem = why or None


# ---------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------


def worker_version() -> dict[str, Any]:
    """What a Dask worker has: partywall's version and its host."""
    return {"version": __version__, "host": socket.gethostname()}


def run_shard_task(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A Dask task: one shard's child on this worker, started through the cluster's barrier.

    Returns ``{"shard", "where", "pid", "exit_code", "problem", "report"}``
    (the report as JSON); the shard's own trouble is a ``problem``, never an
    exception, so the client can name it.
    """
    from distributed import Event, Queue, Variable, secede

    # Off the worker's thread pool: every shard's task waits at the barrier at
    # once, however few threads its worker has.
    secede()
    label = f"{spec['index'] + 1}/{spec['count']}"
    ready_q = Queue(spec["ready_queue"])
    out: dict[str, Any] = {"shard": label, "where": f"{socket.gethostname()} pid {os.getpid()}", "pid": None,
                           "exit_code": None, "problem": None, "report": None}

    def refuse(problem: str) -> dict[str, Any]:
        out["problem"] = problem
        ready_q.put({"index": spec["index"], "problem": problem})
        return out

    if __version__ != spec["version"]:
        return refuse(f"its worker runs partywall {__version__!r} and the client {spec['version']!r}; install one "
                      "version everywhere the shards run")
    with tempfile.TemporaryDirectory(prefix="partywall-shard-") as tmp:
        local = socket.gethostname() == spec["host"]
        report = str(Path(tmp) / "shard.json")
        argv = child_command(spec["words"], config=empty_config(tmp), report=report, label=label,
                             url=spec["url"], server_pid=spec["server_pid"] if local else None)
        try:
            child = Child(argv, child_env(os.environ, spec["env"]), tmp, label)
        except ShardProblem as exc:
            return refuse(str(exc))
        out["pid"] = child.pid
        try:
            try:
                info = child.wait_ready(time.monotonic() + spec["ready_timeout_s"], spec["ready_timeout_s"])
            except ShardProblem as exc:
                out["exit_code"] = child.proc.poll()
                return refuse(str(exc))
            problem = ready_problem(info, label, spec["version"])
            if problem:
                return refuse(problem)
            ready_q.put({"index": spec["index"], "problem": None, "info": info})
            if not Event(spec["go_event"]).wait(timeout=spec["go_timeout_s"]):
                out["problem"] = f"the client gave no 'go' within {spec['go_timeout_s']:g} s"
                return out
            if Variable(spec["verdict"]).get(timeout=10) != "go":
                out["problem"] = "the client called the run off (another shard failed before the start)"
                return out
            child.go()
            out["exit_code"] = code = child.wait(time.monotonic() + spec["finish_s"])
            if code is None:
                out["problem"] = f"it did not finish within {spec['finish_s']:g} s of 'go', so it was killed"
            elif code not in (0, 1):
                out["problem"] = f"{child.exit_text(code)} mid-run"
            else:
                got, why = read_report(report)
                out["report"], out["problem"] = (got.to_json() if got else None), (why or None)
            return out
        finally:
            child.stop()


class DaskLaunch(Launch):
    """``--dask ADDRESS``: each shard a task of a Dask distributed cluster, one per worker where it can."""

    mode = "dask"

    def __init__(self, found: configmod.Settings, address: str, *, verbose: bool = False) -> None:
        self.address = address
        self._absent: dict[str, float] = {}
        super().__init__(found, 0, verbose=verbose)

    def connect(self) -> Any:
        try:
            import distributed
        except ImportError:
            raise HarnessError("--dask needs the Dask distributed package: pip install 'partywall[dask]'.") from None
        # distributed logs each retry and close on stderr; partywall says what went wrong in one line.
        for name in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            client = distributed.Client(self.address, timeout=self.dask_connect_timeout_s, set_as_default=False)
        except Exception as exc:  # OSError and TimeoutError mostly; an address it cannot parse is a ValueError
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise HarnessError(f"cannot reach the Dask scheduler at {self.address} within "
                               f"{self.dask_connect_timeout_s:g} s ({reason}); check --dask (tcp://HOST:PORT) and that "
                               "the scheduler runs.") from None
        return client

    def run(self) -> int:
        client = self.connect()
        try:
            try:
                client.wait_for_workers(1, timeout=self.dask_connect_timeout_s)
            except Exception:
                raise HarnessError(f"the Dask scheduler at {self.address} has no worker (waited "
                                   f"{self.dask_connect_timeout_s:g} s); start `dask worker {self.address}`.") from None
            versions = client.run(worker_version, on_error="return")
            workers = sorted(versions)
            for addr in workers:
                got = versions[addr]
                if isinstance(got, BaseException):
                    raise HarnessError(f"the Dask worker {addr} cannot run partywall ({type(got).__name__}: "
                                       f"{got}); install partywall {__version__} there.")
                if got["version"] != __version__:
                    raise HarnessError(f"the Dask worker {addr} runs partywall {got['version']!r} and this client "
                                       f"{__version__!r}; install one version on every worker.")
            # One shard per worker, unless --workers says how many shards.
            self.set_count(int(self.found.get("workers") or len(workers)))
            return self._launch(client, workers)
        finally:
            try:
                client.close(timeout=STOP_GRACE_S)
            except Exception:
                pass

    def _launch(self, client: Any, workers: list[str]) -> int:
        from distributed import Event, Queue, Variable

        names = {k: f"partywall-bench-{self.run_token}-{k}" for k in ("ready", "go", "verdict")}
        ready_q = Queue(names["ready"], client=client)
        go = Event(names["go"], client=client)
        verdict = Variable(names["verdict"], client=client)
        futures: dict[int, Any] = {}
        try:
            self.start_server()
            assert self.url is not None
            self.say(f"{self.count} shards on {len(workers)} Dask worker(s) of {self.address}, "
                     f"{self.found['bench']['users']} users, against {self.url}")
            finish_s = finish_budget_s(self.found)
            for s in self.shards:
                addr = workers[s.index % len(workers)]  # round robin: one shard per worker while there are enough
                s.where = addr
                spec = {"index": s.index, "count": s.count, "version": __version__, "host": socket.gethostname(),
                        "words": self.words, "env": self.shard_env(), "url": self.url,
                        "server_pid": self.server_pid, "ready_queue": names["ready"], "go_event": names["go"],
                        "verdict": names["verdict"], "ready_timeout_s": self.ready_timeout_s,
                        "go_timeout_s": self.go_timeout_s, "finish_s": finish_s}
                futures[s.index] = client.submit(
                    run_shard_task, spec, key=f"partywall-shard-{s.index + 1}-of-{s.count}-{self.run_token}",
                    workers=[addr], allow_other_workers=False, pure=False, retries=0)
            started = self._barrier(client, futures, ready_q)
            verdict.set("go" if started else "stop")
            go.set()
            if started:
                self.say(f"all {self.count} shards ready; go")
            self._collect(client, futures, finish_s if started else 30.0)
        finally:
            for f in futures.values():
                if not f.done():
                    client.cancel(f)
            self.stop_server()
        return self.finish()

    def _lost(self, client: Any, futures: Mapping[int, Any]) -> None:
        """A shard whose task failed, or whose worker left the cluster, is named now."""
        try:
            alive = set(client.scheduler_info(n_workers=-1).get("workers", {}))
        except Exception:
            alive = None
        for s in self.shards:
            f = futures.get(s.index)
            if f is None or s.problem:
                continue
            if f.status == "error":
                exc = f.exception()
                s.problem = f"its task failed on its worker ({type(exc).__name__}: {str(exc)[:200]})"
            elif f.status == "cancelled":
                s.problem = "its task was cancelled"
            elif not f.done() and alive is not None and s.where not in alive:
                # Twice in a row, a second apart: one reading of the scheduler is not enough.
                now = time.monotonic()
                since = self._absent.setdefault(s.where, now)
                if now - since >= 1.0:
                    s.problem = "its Dask worker left the cluster mid-run"
            elif alive is not None and s.where in alive:
                self._absent.pop(s.where, None)

    def _barrier(self, client: Any, futures: Mapping[int, Any], ready_q: Any) -> bool:
        deadline = time.monotonic() + self.ready_timeout_s + self.dask_connect_timeout_s
        ready: dict[int, float] = {}
        while len(ready) < self.count and not any(s.problem for s in self.shards):
            if time.monotonic() >= deadline:
                for s in self.shards:
                    if s.index not in ready and not s.problem:
                        s.problem = f"it did not say ready within {self.ready_timeout_s:g} s"
                break
            try:
                note = ready_q.get(timeout=0.5)
            except Exception:  # the queue's time-out: look at the tasks meanwhile
                self._lost(client, futures)
                continue
            s = self.shards[int(note["index"])]
            if note.get("problem"):
                s.problem = str(note["problem"])
            else:
                ready[s.index] = time.monotonic()
                s.ready_s = round(ready[s.index] - self.t0, 3)
                s.pid = (note.get("info") or {}).get("pid")
        if any(s.problem for s in self.shards):
            return False
        self.ready_spread_s = round(max(ready.values()) - min(ready.values()), 3)
        return True

    def _collect(self, client: Any, futures: Mapping[int, Any], budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        while True:
            pending = [s for s in self.shards if not futures[s.index].done() and not s.problem]
            if not pending:
                break
            if time.monotonic() >= deadline:
                for s in pending:
                    s.problem = f"its task did not finish within {budget_s:g} s of 'go'"
                break
            time.sleep(0.25)
            self._lost(client, futures)
        for s in self.shards:
            f = futures[s.index]
            if f.status != "finished":
                continue
            got = f.result()
            s.pid = got.get("pid") or s.pid
            s.exit_code = got.get("exit_code")
            s.where = f"{s.where}, {got.get('where')}"
            if got.get("problem") and not s.problem:
                s.problem = str(got["problem"])
            if got.get("report") is not None and not s.problem:
                try:
                    s.report = BenchReport.from_json(got["report"])
                except ReportError as exc:
                    s.problem = f"its report is unreadable ({exc})"


_DASK_ADDRESS = re.compile(r"([a-z]+://)?(\[[0-9a-fA-F:]+\]|[^\s/:\[\]]+):\d+")


def run_sharded(found: configmod.Settings, *, verbose: bool = False) -> int:
    """``partywall bench --workers N`` or ``--dask ADDRESS``: the exit code of the merged run.

    HarnessError (exit 2, one line) when the run could not be made or a shard
    is missing; the report then says why (and, once shards ran, holds them).
    """
    return sharded(found, verbose=verbose)[0]


def sharded(found: configmod.Settings, *, verbose: bool = False) -> tuple[int, BenchReport]:
    """`run_sharded`'s exit code and the merged report (the pytest bench raises its violations)."""
    workers, address = found.get("workers"), found.get("dask")
    launch: Launch | None = None
    try:
        if workers is not None and int(workers) < 1:
            raise HarnessError(f"--workers needs a whole number >= 1 (got {workers}).")
        if address:
            if not _DASK_ADDRESS.fullmatch(str(address)):
                raise HarnessError(f"--dask expects the scheduler's address, tcp://HOST:PORT (got {address!r}).")
            launch = DaskLaunch(found, str(address), verbose=verbose)
        else:
            launch = ProcessLaunch(found, int(workers), verbose=verbose)
        status = launch.run()
        assert launch.merged is not None
        return status, launch.merged
    except HarnessError as exc:
        path = found.get("report")
        if path and (launch is None or not launch.written):
            # Nothing was merged: the report still says why, in the bench report's own shape.
            report = BenchReport.of_error(str(exc), seed=int(found["bench"]["seed"]))
            report.extra["sharding"] = {"mode": "dask" if address else "processes", "count": workers}
            report.write(path)
        raise
