"""The bench beyond one process: `partywall bench --workers N` and `--dask ADDRESS` (partywall.launch).

Rules: every run is the installed command in a subprocess (``python -m
partywall.cli``) against a real reference server on 127.0.0.1; the Dask
cluster is a real one, a scheduler and two workers started as processes on
loopback as a deployment would run them (not LocalCluster in this process).
Every wait is bounded, and every process a test starts is ended by its pid.

What is checked: the merged report holds every user of every shard, its
percentiles are the nearest-rank percentiles of the union of the shards'
samples (recomputed here from the merged timeline), every shard's clock
started at one instant even when one shard was ready long after the other
(so the gate, not luck, lined them up), and a shard that dies, never says
ready, or a scheduler that cannot be reached is one line and exit 2, with the
report written, within the limits the settings give
(``bench.shard_ready_timeout_s``, ``bench.dask_connect_timeout_s``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from partywall import __version__
from partywall.config import resolve
from partywall.errors import HarnessError
from partywall.launch import (
    GO_TIMEOUT_ENV,
    Child,
    ProcessLaunch,
    child_command,
    child_env,
    empty_config,
    finish_budget_s,
    gate_timeout_s,
    parse_ready,
    ready_problem,
    wait_at_gate,
)
from partywall.target import SECRET_ENV, EmbeddedTarget

PER_USER = {"connect": 1, "agent_startup": 1, "first_chunk": 3, "response": 3, "history": 2, "reconnect": 1}
#: Every shard's clock within this of the others' (the gate releases them within a few ms).
SYNC_S = 0.2


def _bench(*args: str, cwd: Path, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # cwd has no pyproject.toml, so the packaged [tool.partywall] applies.
    return subprocess.run([sys.executable, "-m", "partywall.cli", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _first_connects(report: dict[str, Any], count: int) -> dict[int, float]:
    """Each shard's first intended connect time, on the merged report's one clock (shard = user % count)."""
    first: dict[int, float] = {}
    for user, t0, _t1, _ok, *_ in report["timeline"]["connect"]:
        shard = int(user) % count
        first[shard] = min(first.get(shard, math.inf), float(t0))
    return first


def _nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def _check_whole(report: dict[str, Any], users: int, shards: int) -> None:
    """Every user of every shard is in the merged figures, and the shards are named."""
    assert report["ok"] is True and report["error"] is None, report.get("error")
    assert report["users"] == users and report["shards"] == shards
    assert not report.get("missing_shards")
    sharding = report["sharding"]
    assert sharding["count"] == shards and sharding["missing"] == []
    assert sharding["ran"] == [f"{k}/{shards}" for k in range(1, shards + 1)]
    per_shard = [s["users"] for s in sharding["shards"]]
    assert sum(per_shard) == users and all(n >= users // shards for n in per_shard), per_shard
    assert all(s["ran"] and s["exit_code"] == 0 for s in sharding["shards"]), sharding["shards"]
    for metric, each in PER_USER.items():
        # n is the sum over the shards: every sample of every shard, none twice.
        assert report["latency_ms"][metric]["n"] == each * users, (metric, report["latency_ms"][metric])
        assert report["latency_ms"][metric]["failures"] == 0
    assert len(report["timeline"]["connect"]) == users
    assert sorted(row[0] for row in report["timeline"]["connect"]) == list(range(users))
    precision = report["percentiles"]
    assert precision["significant_figures"] == 3 and precision["relative_error"] == 0.001
    assert "union" in precision["method"] and "never an average" in precision["method"]


def _check_union_percentiles(report: dict[str, Any]) -> None:
    """The merged start-up percentiles are the union's, read back from the timeline's spans."""
    spans = [(t1 - t0) * 1000.0 for _u, t0, t1, ok, *_ in report["timeline"]["agent_startup"] if ok]
    entry = report["latency_ms"]["agent_startup"]
    assert len(spans) == entry["n"]
    for p in (50, 95):
        exact = _nearest_rank(spans, p)
        # Spans are kept to 0.1 ms on each end; the histogram reads 3 significant figures.
        assert abs(entry[f"p{p}"] - exact) <= 0.25 + exact * 0.001, (p, entry[f"p{p}"], exact)


def _check_synchronised(report: dict[str, Any], shards: int) -> None:
    first = _first_connects(report, shards)
    assert len(first) == shards, first
    assert max(first.values()) - min(first.values()) < SYNC_S, first
    assert report["sharding"]["start_spread_ms"] < SYNC_S * 1000


# ---------------------------------------------------------------------------
# --workers N
# ---------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_workers_2_against_the_embedded_server_merge_into_one_synchronised_report(tmp_path: Path) -> None:
    out = tmp_path / "merged.json"
    proc = _bench("--workers", "2", "--users", "10", "--report", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(out)
    _check_whole(report, users=10, shards=2)
    _check_union_percentiles(report)
    _check_synchronised(report, 2)
    assert report["sharding"]["mode"] == "processes"
    # One server for both shards, started by the launcher and sampled where it runs (one pid).
    assert report["target"]["kind"] == "embedded"
    assert isinstance(report["server"]["pid"], int) and report["server"]["samples"] >= 2
    assert len({s["pid"] for s in report["sharding"]["shards"]}) == 2
    assert "partywall bench PASSED: 10 users, 2 shard reports merged" in proc.stdout
    assert proc.stderr.count("\n") <= 2  # the children's progress stays theirs


def _pytest_bench(*args: str, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """The bench through pytest, as a team runs it in its own test job."""
    return subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "partywall_props", "--hypothesis-profile=bench",
                           "-p", "no:cacheprovider", "-q", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(180)
def test_partywall_workers_under_pytest_runs_the_shards_and_fails_on_the_merged_gate(tmp_path: Path) -> None:
    """``--partywall-workers 2``: the launcher's run, not one process; a merged threshold fails the test."""
    out = tmp_path / "merged.json"
    proc = _pytest_bench("--partywall-workers", "2", "--partywall-users", "10", "--partywall-report", str(out),
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(out)
    _check_whole(report, users=10, shards=2)
    _check_synchronised(report, 2)
    assert len({s["pid"] for s in report["sharding"]["shards"]}) == 2
    assert "partywall bench: PASSED over 2 shards" in proc.stdout and "1 passed" in proc.stdout

    failing = _pytest_bench("--partywall-workers", "2", "--partywall-users", "10", "--partywall-report", str(out),
                            "--partywall-set", "bench.thresholds.agent_startup_p95_ms=1", cwd=tmp_path)
    assert failing.returncode == 1, failing.stdout[-3000:] + failing.stderr[-3000:]
    assert "[timing] agent_startup_p95_ms: actual" in failing.stdout and "exceeds limit 1" in failing.stdout
    merged = _report(out)  # the launcher's merged report stays what the plugin leaves
    assert merged["ok"] is False and merged["shards"] == 2 and merged["sharding"]["ran"] == ["1/2", "2/2"]
    p95 = merged["latency_ms"]["agent_startup"]["p95"]
    assert merged["violations"][0]["title"] == f"agent_startup_p95_ms: actual {round(p95, 1)} exceeds limit 1"


def test_an_option_of_another_job_is_refused_under_pytest(tmp_path: Path) -> None:
    """An option nothing in the session would read is a usage error naming how to run its job."""
    bench_only = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "partywall_props", "-p", "no:cacheprovider",
                                 "--partywall-workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bench_only.returncode == 4
    assert ("--partywall-workers is an option of the bench, and this session runs the properties: add "
            "--hypothesis-profile=bench to run the bench.") in bench_only.stderr
    run_only = _pytest_bench("--partywall-profile", "ci", cwd=tmp_path, timeout=60)
    assert run_only.returncode == 4
    assert ("--partywall-profile is an option of the properties, and this session runs the bench: leave out "
            "--hypothesis-profile=bench to run the properties.") in run_only.stderr


@pytest.fixture(scope="module")
def slow_server() -> Iterator[EmbeddedTarget]:
    """A reference server whose agents take 600 ms to start, so a shard is mid-run for a while."""
    target = EmbeddedTarget(None, ["--startup-ms", "600:600"])
    with target:
        yield target


@pytest.mark.timeout(150)
def test_the_gate_starts_a_shard_that_was_ready_early_with_the_late_one(tmp_path: Path,
                                                                        slow_server: EmbeddedTarget) -> None:
    # Shard 2's credentials take 3 s each to come (the token command sleeps when its parent is
    # shard 2), so shard 1 is ready long before shard 2, even when its own start is slow on a busy
    # machine: without the gate it would start alone.
    token = tmp_path / "shard_token.py"  # not token.py, which would shadow the standard library's token
    token.write_text(textwrap.dedent(f"""
        import os, sys, time
        from partywall.tokens import mint
        parent = open(f"/proc/{{os.getppid()}}/cmdline", "rb").read().split(b"\\0")
        if b"2/2" in parent:
            time.sleep(3.0)
        print(mint({slow_server.secret!r}, sys.argv[1], sys.argv[2]))
    """), encoding="utf-8")
    out = tmp_path / "merged.json"
    proc = _bench("--workers", "2", "--users", "10", "--server-url", str(slow_server.url),
                  "--token-cmd", f"{shlex.quote(sys.executable)} {shlex.quote(str(token))}", "--report", str(out),
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(out)
    _check_whole(report, users=10, shards=2)
    shards = {s["shard"]: s for s in report["sharding"]["shards"]}
    assert shards["2/2"]["ready_s"] - shards["1/2"]["ready_s"] >= 1.0, shards
    assert report["sharding"]["ready_spread_s"] >= 1.0
    _check_synchronised(report, 2)


@pytest.mark.timeout(150)
def test_a_shard_killed_mid_run_is_one_line_exit_2_and_the_report_names_it(tmp_path: Path,
                                                                          slow_server: EmbeddedTarget) -> None:
    out = tmp_path / "merged.json"
    env = {**os.environ, "PARTYWALL_AUTH_SECRET": str(slow_server.secret)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "partywall.cli", "bench", "--workers", "2", "--users", "10", "--server-url",
         str(slow_server.url), "--report", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    went = threading.Event()

    def read() -> None:
        assert launcher.stdout is not None
        for line in launcher.stdout:
            lines.append(line)
            if "shards ready; go" in line:
                went.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert went.wait(60), "".join(lines)
        # Every agent takes 600 ms to start: shard 2 is mid-run now.
        victims = [p for p in psutil.Process(launcher.pid).children()
                   if "--shard" in p.cmdline() and "2/2" in p.cmdline()]
        assert len(victims) == 1, [p.cmdline() for p in psutil.Process(launcher.pid).children()]
        victims[0].send_signal(signal.SIGKILL)
        _, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    reader.join(5)
    assert launcher.returncode == 2, "".join(lines) + err
    said = err.strip().splitlines()
    assert len(said) == 1, err
    assert said[0].startswith("partywall: shard 2/2 (pid ") and "killed by signal 9 mid-run" in said[0], said
    assert "holds shard 1/2 only" in said[0]
    report = _report(out)
    assert report["ok"] is False and "shard 2/2" in report["error"]
    assert report["missing_shards"] == [{"index": 1, "count": 2}]
    assert report["sharding"]["ran"] == ["1/2"]
    assert report["sharding"]["missing"] == [{"shard": "2/2", "why": "it was killed by signal 9 mid-run"}]
    # What did run is all there: shard 1's five users, every sample of theirs.
    assert report["users"] == 5 and report["latency_ms"]["connect"]["n"] == 5
    assert {row[0] % 2 for row in report["timeline"]["connect"]} == {0}


def _stuck_token(folder: Path) -> tuple[str, Path]:
    """A --token-cmd that never answers, so its shard never says ready, and the folder where each run of it
    leaves a file named by its pid, holding the go-wait its shard was told (`GO_TIMEOUT_ENV`)."""
    pids = folder / "pids"
    pids.mkdir()
    token = folder / "stuck_token.py"
    token.write_text(textwrap.dedent(f"""
        import os, pathlib, time
        pathlib.Path({str(pids)!r}, str(os.getpid())).write_text(os.environ.get({GO_TIMEOUT_ENV!r}, "unset"))
        time.sleep(60)
    """), encoding="utf-8")
    # The folder is on its command line, so `_end_stuck` knows its own processes by it.
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(token))} {shlex.quote(str(pids))}", pids


def _end_stuck(pids: Path) -> None:
    """End the stuck token commands by the pids they left (their shard, its credentials failing, ends too)."""
    for f in pids.iterdir():
        try:
            proc = psutil.Process(int(f.name))
            if str(pids) in proc.cmdline():
                proc.kill()
                proc.wait(10)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            pass


@pytest.mark.timeout(90)
def test_a_shard_that_never_says_ready_is_named_within_the_configured_ready_timeout(
        tmp_path: Path, slow_server: EmbeddedTarget) -> None:
    # The shard's token command never answers, so the shard never says ready: the launcher must
    # give up after bench.shard_ready_timeout_s (3 s here), not after its default of 120 s.
    token_cmd, pids = _stuck_token(tmp_path)
    out = tmp_path / "merged.json"
    t = time.monotonic()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "partywall.cli", "bench", "--workers", "1", "--users", "2", "--server-url",
         str(slow_server.url), "--token-cmd", token_cmd, "--set", "bench.shard_ready_timeout_s=3",
         "--report", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, err = launcher.communicate(timeout=60)
        took = time.monotonic() - t
    finally:
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
            launcher.wait(10)
        _end_stuck(pids)
    assert launcher.returncode == 2, stdout[-3000:] + err[-3000:]
    said = err.strip().splitlines()
    assert len(said) == 1, err
    assert said[0].startswith("partywall: shard 1/1 (pid "), said
    assert "it did not say ready within 3 s; no shard ran" in said[0], said
    # 3 s for the ready line, 5 s of grace for the stuck shard to go, and the launcher's own start.
    assert took < 30, took
    report = _report(out)
    assert report["ok"] is False and report["sharding"]["ran"] == []
    assert report["sharding"]["missing"] == [{"shard": "1/1", "why": "it did not say ready within 3 s"}]
    # The shard was told to wait for 'go' 30 s longer than its launcher waits for it (3 s).
    told = [f.read_text() for f in pids.iterdir()]
    assert told and set(told) == {"33.0"}, told


@pytest.mark.timeout(60)
def test_a_shard_waits_for_go_as_long_as_its_launcher_tells_it(tmp_path: Path, slow_server: EmbeddedTarget) -> None:
    # The environment a launcher gives its shards carries the go-wait of its settings...
    found = resolve({"workers": 2, "set": ["bench.shard_ready_timeout_s=7.5"]}, environ={}, cwd=tmp_path)
    launch = ProcessLaunch(found, 2)
    assert launch.shard_env()[GO_TIMEOUT_ENV] == "37.5"
    assert gate_timeout_s(launch.shard_env()) == 37.5
    assert gate_timeout_s({}) == 150.0  # a shard started by hand: the packaged default, 120 s + 30 s
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(HarnessError, match=GO_TIMEOUT_ENV):
            gate_timeout_s({GO_TIMEOUT_ENV: bad})
    # ... and a real shard, started as the launcher starts it, gives up on 'go' after that long.
    argv = child_command(["--set", "bench.users=2"], config=empty_config(str(tmp_path)),
                         report=str(tmp_path / "shard.json"), label="1/1", url=str(slow_server.url), server_pid=None)
    env = child_env(os.environ, {GO_TIMEOUT_ENV: "1.5", SECRET_ENV: str(slow_server.secret)})
    child = Child(argv, env, str(tmp_path), "1/1")
    try:
        child.wait_ready(time.monotonic() + 30, 30)
        ready = time.monotonic()
        code = child.wait(ready + 20)  # never 'go', but stdin stays open: only the shard's own wait ends it
        waited = time.monotonic() - ready
    finally:
        child.stop()
    assert code == 2, child.tail(40)
    assert "the start gate got no 'go' within 1.5 s" in child.last_words(), child.tail(40)
    assert 1.0 <= waited < 15, waited


def test_the_finish_budget_takes_the_configured_slack(tmp_path: Path) -> None:
    budget = {slack: finish_budget_s(resolve({"set": [f"bench.shard_finish_slack_s={slack}"]}, environ={},
                                             cwd=tmp_path))
              for slack in (60, 5)}
    assert budget[60] - budget[5] == pytest.approx(55.0)
    assert budget[60] == finish_budget_s(resolve(environ={}, cwd=tmp_path))


# ---------------------------------------------------------------------------
# The gate and the ready line, on their own
# ---------------------------------------------------------------------------


def test_a_child_of_another_partywall_version_is_refused_by_its_ready_line(tmp_path: Path) -> None:
    def child_saying(version: str) -> Child:
        line = "partywall-gate ready " + json.dumps({"pid": 1, "shard": "1/2", "version": version})
        code = f"import sys; print({line!r}, flush=True); sys.stdin.read()"
        return Child([sys.executable, "-c", code], dict(os.environ), str(tmp_path), "1/2")

    for version, refused in (("0.0.0-other", True), (__version__, False)):
        child = child_saying(version)
        try:
            info = child.wait_ready(time.monotonic() + 30, 30)
            problem = ready_problem(info, "1/2")
        finally:
            child.stop()
        if refused:
            assert problem is not None and "'0.0.0-other'" in problem and repr(__version__) in problem
        else:
            assert problem is None
    assert ready_problem({"shard": "2/2", "version": __version__}, "1/2") == "it says it is shard '2/2'"
    assert parse_ready("partywall bench: 5 users") is None
    assert "damaged" in (parse_ready("partywall-gate ready {not json") or {})


def test_the_gate_waits_for_go_and_refuses_anything_else() -> None:
    class Out:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    def gate(feed: bytes | None, timeout_s: float = 10.0) -> Out:
        r, w = os.pipe()
        out = Out()
        try:
            if feed is not None:
                os.write(w, feed)
                os.close(w)
                w = -1
            wait_at_gate("1/2", timeout_s=timeout_s, stdin_fd=r, out=out)  # type: ignore[arg-type]
        finally:
            os.close(r)
            if w != -1:
                os.close(w)
        return out

    out = gate(b"go\n")
    info = parse_ready(out.text)
    assert info == {"shard": "1/2", "version": __version__, "pid": os.getpid()}
    with pytest.raises(HarnessError, match="closed before 'go'"):
        gate(b"")
    with pytest.raises(HarnessError, match="expected 'go'"):
        gate(b"stop\n")
    t = time.monotonic()
    with pytest.raises(HarnessError, match="no 'go' within 0.3 s"):
        gate(None, timeout_s=0.3)
    assert time.monotonic() - t < 5


# ---------------------------------------------------------------------------
# --dask ADDRESS, on a real cluster
# ---------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two workers on loopback, as processes; yields the scheduler's address."""
    pytest.importorskip("distributed")
    from distributed import Client

    home = tmp_path_factory.mktemp("dask")
    info = home / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, *args: str) -> None:
        log = (home / f"{name}.log").open("wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=home, stdout=log, stderr=subprocess.STDOUT))

    try:
        start("scheduler", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
              "--no-dashboard", "--scheduler-file", str(info))
        deadline = time.monotonic() + 60
        while not info.is_file() or not info.read_text().strip():
            assert procs[0].poll() is None, (home / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "the Dask scheduler did not start within 60 s"
            time.sleep(0.1)
        time.sleep(0.1)  # the file is written whole, but give the writer its close
        address = json.loads(info.read_text())["address"]
        for k in (1, 2):
            start(f"worker{k}", "distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                  "--no-nanny", "--no-dashboard", "--name", f"w{k}", "--local-directory", str(home / f"w{k}"))
        with Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for log in logs:
            log.close()


@pytest.mark.timeout(180)
def test_dask_runs_one_shard_per_worker_of_a_real_cluster_and_merges_them(tmp_path: Path, dask_cluster: str) -> None:
    out = tmp_path / "merged.json"
    proc = _bench("--dask", dask_cluster, "--users", "10", "--report", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(out)
    _check_whole(report, users=10, shards=2)
    _check_union_percentiles(report)
    _check_synchronised(report, 2)
    assert report["sharding"]["mode"] == "dask"
    workers = [s["where"].split(",")[0] for s in report["sharding"]["shards"]]
    assert len(set(workers)) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers
    # The workers run on this machine: the server is sampled by its pid, where it runs.
    assert report["target"]["kind"] == "embedded"
    assert isinstance(report["server"]["pid"], int) and report["server"]["samples"] >= 2


@pytest.mark.timeout(180)
def test_partywall_dask_under_pytest_runs_a_shard_per_worker(tmp_path: Path, dask_cluster: str) -> None:
    out = tmp_path / "merged.json"
    proc = _pytest_bench("--partywall-dask", dask_cluster, "--partywall-users", "10", "--partywall-report", str(out),
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(out)
    _check_whole(report, users=10, shards=2)
    assert report["sharding"]["mode"] == "dask"


@pytest.mark.timeout(90)
def test_dask_names_a_shard_that_never_says_ready_within_the_configured_ready_timeout(
        tmp_path: Path, dask_cluster: str, slow_server: EmbeddedTarget) -> None:
    # As with processes, on a worker: the task gives up on its shard after bench.shard_ready_timeout_s
    # (2 s here). The client's own deadline is that plus bench.dask_connect_timeout_s (20 s here), so a
    # task that kept the default of 120 s would be named only after 22 s.
    token_cmd, pids = _stuck_token(tmp_path)
    out = tmp_path / "merged.json"
    t = time.monotonic()
    try:
        proc = _bench("--dask", dask_cluster, "--workers", "1", "--users", "2", "--server-url", str(slow_server.url),
                      "--token-cmd", token_cmd, "--set", "bench.shard_ready_timeout_s=2",
                      "--set", "bench.dask_connect_timeout_s=20", "--report", str(out), cwd=tmp_path, timeout=60)
        took = time.monotonic() - t
    finally:
        _end_stuck(pids)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("partywall: shard 1/1 (tcp://127.0.0.1:"), said
    assert said[0].endswith("): it did not say ready within 2 s; no shard ran"), said
    assert took < 20, took
    assert _report(out)["sharding"]["missing"] == [{"shard": "1/1", "why": "it did not say ready within 2 s"}]
    told = [f.read_text() for f in pids.iterdir()]
    assert told and set(told) == {"32.0"}, told


@pytest.mark.timeout(60)
def test_dask_with_an_unreachable_scheduler_is_one_line_and_exit_2_in_bounded_time(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    out = tmp_path / "merged.json"
    t = time.monotonic()
    # bench.dask_connect_timeout_s bounds the wait: 1 s here, where the default of 10 s alone would take longer
    # than the whole run may.
    proc = _bench("--dask", address, "--users", "10", "--report", str(out), "--set", "bench.dask_connect_timeout_s=1",
                  cwd=tmp_path, timeout=45)
    took = time.monotonic() - t
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"partywall: cannot reach the Dask scheduler at {address} "
                                                 "within 1 s"), said
    assert took < 10
    report = _report(out)
    assert report["ok"] is False and address in report["error"] and report["sharding"]["mode"] == "dask"
