"""Resources of one process, sampled by pid: the server's, or the suite's own.

The seed suite read CPU and memory of the test runner and called them the
server's; here the sampler is always told whose pid to watch (a launched
target finds the process that listens on its port). CPU is percent of ONE
core, psutil's convention: two busy cores read 200. psutil's first
``cpu_percent()`` for a process always returns 0.0 (it has no previous
reading to compare with), so that first reading primes and is discarded.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import psutil

MIB = 1024 * 1024


@attrs.frozen
class ResourceSample:
    """One reading of one process."""

    t: float
    """Seconds since the sampler's time origin (the run's start when given)."""
    pid: int
    """The process read."""
    cpu_percent: float
    """CPU since the previous reading, percent of one core (2 busy cores = 200)."""
    rss_mib: float
    """Resident memory, MiB."""
    open_files: int
    """Open file descriptors (sockets included)."""
    threads: int
    """OS threads."""

    def to_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "pid": self.pid,
            "cpu_percent": round(self.cpu_percent, 1),
            "rss_mib": round(self.rss_mib, 2),
            "open_files": self.open_files,
            "threads": self.threads,
        }


PidSource = int | Callable[[], int | None]


class ResourceSampler:
    """Samples a process every ``interval`` seconds in a daemon thread.

    ``pid`` is a pid, or a function returning the current pid (or None while
    there is none), for a server that is restarted under the sampler: the
    sampler then follows the new process (`follow`). A fixed pid that exits
    ends the sampling, and `exited` says so; a followed one that exits is
    noted and picked up again when the function returns a live pid.

    ``t0`` (a ``time.monotonic()`` reading) aligns sample times with the rest
    of a run's timeline; by default times count from `start`.
    """

    def __init__(self, pid: PidSource, interval: float = 0.25, *, t0: float | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"the sampling interval must be > 0 seconds (got {interval!r}).")
        self.interval = float(interval)
        self._source: PidSource = pid
        self._t0 = t0
        self._samples: list[ResourceSample] = []
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: psutil.Process | None = None
        self._missing: int | None = None
        self.exited: str | None = None
        """Why sampling ended early (the process exited), or None."""

    # -- control --------------------------------------------------------------

    def follow(self, pid_getter: Callable[[], int | None]) -> None:
        """From the next sample on, read whichever process ``pid_getter()`` names."""
        with self._lock:
            self._source = pid_getter

    def start(self) -> ResourceSampler:
        if self._thread is not None:
            raise RuntimeError("this ResourceSampler was already started; make a new one.")
        if self._t0 is None:
            self._t0 = time.monotonic()
        # Prime here, not in the thread, so the first real sample (one
        # interval later) already measures a whole interval.
        self._attach(self._current_pid())
        self._thread = threading.Thread(target=self._run, name="partywall-resources", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling (takes one last sample first) and return `summary()`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.summary()

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- sampling -------------------------------------------------------------

    def _current_pid(self) -> int | None:
        source = self._source
        return source() if callable(source) else source

    def _note(self, what: str, pid: int | None) -> None:
        assert self._t0 is not None
        with self._lock:
            self._events.append({"t": round(time.monotonic() - self._t0, 3), "pid": pid, "event": what})

    def _attach(self, pid: int | None) -> None:
        self._proc = None
        if pid is None:
            return
        try:
            proc = psutil.Process(pid)
            proc.cpu_percent(None)  # primes; this first reading is always 0.0
        except psutil.NoSuchProcess:
            # A followed server's pid function may name a dead pid for a while
            # (until the restart); one event per pid, not one per tick.
            if pid != self._missing:
                self._note("no such process", pid)
                self._missing = pid
            if not callable(self._source):
                self.exited = f"process {pid} did not exist when sampling started"
                self._stop.set()
            return
        self._proc = proc
        self._note("attached", pid)

    def _read(self, proc: psutil.Process) -> ResourceSample:
        assert self._t0 is not None
        with proc.oneshot():
            # Over an interval shorter than the kernel's CPU-time tick (a late tick on a busy
            # machine), one tick of CPU reads as several cores: no process uses more than all.
            cpu = min(proc.cpu_percent(None), 100.0 * (psutil.cpu_count() or 1))
            rss = proc.memory_info().rss / MIB
            fds = proc.num_fds()
            threads = proc.num_threads()
        return ResourceSample(time.monotonic() - self._t0, proc.pid, cpu, rss, fds, threads)

    def _tick(self) -> None:
        wanted = self._current_pid()
        if self._proc is None or (wanted is not None and wanted != self._proc.pid):
            if wanted is not None and self._proc is not None:
                self._note("switched", wanted)
            # A newly attached process has no previous CPU reading; its first
            # sample comes on the next tick, not now.
            self._attach(wanted)
            return
        proc = self._proc
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                raise psutil.ZombieProcess(proc.pid)
            sample = self._read(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self._note("exited", proc.pid)
            self._proc = None
            if not callable(self._source):
                self.exited = f"process {proc.pid} exited while it was being sampled"
                self._stop.set()
            return
        with self._lock:
            self._samples.append(sample)

    def _run(self) -> None:
        # Ticks on a fixed schedule rather than "sleep interval after each
        # reading", so sampling does not drift later and later under load.
        next_at = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._tick()
            next_at += self.interval
            if next_at < time.monotonic():  # fell behind (a stalled machine): skip, don't burst
                next_at = time.monotonic() + self.interval
        if self.exited is None and self._proc is not None:
            self._tick()  # the last reading covers the time since the previous tick

    # -- results --------------------------------------------------------------

    @property
    def samples(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.to_json() for s in self._samples]

    @property
    def events(self) -> list[dict[str, Any]]:
        """Attach, switch and exit events, with times, for the report."""
        with self._lock:
            return list(self._events)

    def summary(self) -> dict[str, Any]:
        """Peaks and means over the samples; figures None when nothing was sampled."""
        with self._lock:
            samples = list(self._samples)
        pids = list(dict.fromkeys(s.pid for s in samples))  # in the order they were read
        current = self._proc.pid if self._proc is not None else None
        out: dict[str, Any] = {
            # The latest process read (after a restart, the new one); all of
            # them under "pids" when there was more than one.
            "pid": pids[-1] if pids else current,
            "cpu_percent_peak": None,
            "cpu_percent_mean": None,
            "rss_mib_peak": None,
            "rss_mib_mean": None,
            "open_files_peak": None,
            "threads_peak": None,
            "samples": len(samples),
            "interval_s": self.interval,
            "exited": self.exited,
        }
        if len(pids) > 1:
            out["pids"] = pids
        if samples:
            out["cpu_percent_peak"] = round(max(s.cpu_percent for s in samples), 1)
            out["cpu_percent_mean"] = round(math.fsum(s.cpu_percent for s in samples) / len(samples), 1)
            out["rss_mib_peak"] = round(max(s.rss_mib for s in samples), 2)
            out["rss_mib_mean"] = round(math.fsum(s.rss_mib for s in samples) / len(samples), 2)
            out["open_files_peak"] = max(s.open_files for s in samples)
            out["threads_peak"] = max(s.threads for s in samples)
        return out
