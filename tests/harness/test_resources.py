"""The resource sampler reads the process it is told to read, not the runner.

Rules: each test starts a real child process that idles, allocates and burns
CPU on a schedule, samples it by pid, and ends it; sampling intervals are
short so the whole module takes a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from partywall.resources import ResourceSampler

pytestmark = pytest.mark.timeout(30)

# Idle, then allocate 120 MiB of touched memory (zero pages would not count
# as resident), then spin one core, then exit or wait for stdin to close.
WORKLOAD = textwrap.dedent(
    """
    import sys, time
    time.sleep(0.5)
    ballast = b"\\x01" * (120 * 1024 * 1024)
    end = time.monotonic() + 1.2
    while time.monotonic() < end:
        pass
    print("done", flush=True)
    if sys.argv[1:] == ["wait"]:
        sys.stdin.read()
    """
)


@pytest.fixture
def busy_child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_resources_sample_a_busy_child_not_the_runner(busy_child: subprocess.Popen[bytes]) -> None:
    sampler = ResourceSampler(busy_child.pid, interval=0.1).start()
    assert busy_child.stdout is not None
    assert busy_child.stdout.readline() == b"done\n"
    summary = sampler.stop()
    samples = sampler.samples
    assert summary["pid"] == busy_child.pid != os.getpid()
    assert summary["samples"] == len(samples) >= 10
    assert {s["pid"] for s in samples} == {busy_child.pid}
    # The primed first reading (always 0.0) is not among the samples: the
    # first real one already covers a full interval of the idle child.
    assert samples[0]["t"] >= 0.09
    assert summary["cpu_percent_peak"] > 50  # one spinning core, on a shared machine
    assert summary["cpu_percent_peak"] <= 100 * (os.cpu_count() or 1) + 20
    assert 0 < summary["cpu_percent_mean"] < summary["cpu_percent_peak"]
    # Resident memory grows by the allocation.
    assert summary["rss_mib_peak"] - samples[0]["rss_mib"] > 100
    assert summary["open_files_peak"] >= 3 and summary["threads_peak"] >= 1
    times = [s["t"] for s in samples]
    assert times == sorted(times)
    assert summary["exited"] is None


def test_resources_sampler_survives_the_process_exiting() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    sampler = ResourceSampler(proc.pid, interval=0.05).start()
    proc.wait()
    deadline = time.monotonic() + 5
    while sampler.exited is None and time.monotonic() < deadline:
        time.sleep(0.05)
    summary = sampler.stop()
    assert summary["exited"] == f"process {proc.pid} exited while it was being sampled"
    assert summary["samples"] >= 3
    assert summary["rss_mib_peak"] > 1
    assert [e["event"] for e in sampler.events] == ["attached", "exited"]


def test_resources_sampler_of_a_missing_pid_reports_no_figures() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    summary = ResourceSampler(proc.pid, interval=0.05).start().stop()
    assert summary["samples"] == 0
    assert summary["cpu_percent_peak"] is None and summary["rss_mib_peak"] is None
    assert "did not exist" in (summary["exited"] or "")


def test_resources_sampler_follows_a_restarted_process() -> None:
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    current = {"pid": first.pid}
    try:
        sampler = ResourceSampler(lambda: current["pid"], interval=0.05, t0=time.monotonic() - 10)
        sampler.start()
        time.sleep(0.3)
        first.kill()
        first.wait()
        time.sleep(0.2)  # a gap while "the server restarts"
        current["pid"] = second.pid
        time.sleep(0.3)
        summary = sampler.stop()
    finally:
        second.kill()
        second.wait()
    pids = [s["pid"] for s in sampler.samples]
    assert pids[0] == first.pid and pids[-1] == second.pid
    assert summary["pid"] == second.pid and summary["pids"] == [first.pid, second.pid]
    assert summary["exited"] is None  # a followed server that goes away may come back
    assert sampler.samples[0]["t"] > 10  # times count from the given origin
    events = [e["event"] for e in sampler.events]
    assert "exited" in events and events.count("attached") == 2


def test_resources_sampler_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        ResourceSampler(os.getpid(), interval=0)
