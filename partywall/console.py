"""What the person running ``partywall`` reads: progress, the summary, the verdict.

The command runs the properties through pytest with pytest's own terminal
output switched off; `ConsoleReporter` takes its place. It shows a progress
line on a terminal (never in a CI log, where a line per example is noise),
keeps the text of anything that failed for ``-v``, and hands the plugin's
`Run` back to the command when pytest is done.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import pytest

from partywall.plugin import Run, get_run
from partywall.session import Session

#: pytest's exit statuses that say the run itself went wrong (interrupted, internal
#: error, usage error, nothing collected); 0 and 1 are read from the run instead.
_PYTEST_TROUBLE = {2: "interrupted", 3: "an internal error of pytest", 4: "a usage error", 5: "no test collected"}


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def summary_lines(run: Run, verbose: bool = False) -> list[str]:
    """The run's counts, what did not run, and each violation with how to replay it."""
    s = run.session
    if s is None:
        return []
    st = s.stats
    target = f"{s.target.kind} {s.target.url}"
    lines = [f"profile {run.profile}, seed {run.seed}, target {target}"]
    if run.mode == "run":
        frames = sum(1 for e in s.history if e.kind == "frame")
        rate = st.get("steps_per_second")
        lines.append(f"{_n(st.get('examples', 0))} examples, {_n(st.get('steps', 0))} steps"
                     + (f" ({rate} steps/s)" if rate else "")
                     + f", {_n(len(s.history))} events, {_n(frames)} frames")
        if st.get("coverage"):
            lines.append(coverage_line(st["coverage"]))
        if st.get("program_fingerprint"):
            lines.append(f"generated programs: fingerprint {st['program_fingerprint']} (equal for equal seeds)")
        if verbose and st.get("rules"):
            lines.append("rules run: " + ", ".join(f"{k} {v}" for k, v in sorted(st["rules"].items())))
    for item in s.not_run:
        lines.append(f"not run: {item['check']}: {item['reason']}")
    for v in s.violations:
        lines.append(f"VIOLATION [{v.violation.invariant}] {v.violation.title}")
        lines.extend("    " + line for line in v.detail.splitlines())
    return lines


def coverage_line(coverage: dict[str, Any]) -> str:
    """One line for the terminal: the operations and races a run reached (the report has it all)."""
    ops = coverage.get("operations") or {}
    races = coverage.get("races") or {}
    bursts = sum(v for k, v in races.items() if k.startswith("burst"))
    probes = sum(v for k, v in races.items() if k.startswith("probe"))
    shown = ", ".join(f"{k} {_n(v)}" for k, v in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"reached: {shown}; {_n(bursts)} bursts, {_n(probes)} probes, at most "
            f"{races.get('max in flight', 0)} requests in flight")


class ConsoleReporter:
    """A pytest plugin object for the ``partywall`` command: progress, failures kept, the run handed back."""

    def __init__(self, command: str, verbose: bool = False, stream: TextIO | None = None) -> None:
        self.command = command
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self.run: Run | None = None
        self.failures: list[str] = []
        self.live = self.stream.isatty()
        self.started = time.monotonic()
        self._progress_shown = False
        self.error: str | None = None
        """Why the run could not be made, once `verdict` has run (None when it was made)."""

    @pytest.hookimpl(trylast=True)  # after partywall's plugin has made the Run
    def pytest_configure(self, config: pytest.Config) -> None:
        self.run = get_run(config)
        if self.run is not None and self.live:
            self.run.on_example = self.progress

    def progress(self, session: Session) -> None:
        st = session.stats
        found = len(session.failures)
        self.stream.write(f"\r  {_n(st.get('examples', 0))} examples, {_n(st.get('steps', 0))} steps, "
                          f"{time.monotonic() - self.started:.0f} s, {found} violation{'s' * (found != 1)} so far\x1b[K")
        self.stream.flush()
        self._progress_shown = True

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failures.append(f"{report.nodeid} ({report.when}):\n{report.longreprtext}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.failures.append(f"collecting {report.nodeid}:\n{report.longreprtext}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._progress_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def verdict(self, pytest_code: int) -> tuple[int, list[str]]:
        """The exit code and the closing lines: 1 only with a violation, 2 whenever the run went wrong."""
        if self.command == "list":  # collection only: nothing ran, nothing to judge
            return (0, []) if pytest_code in (0, 5) else (2, self.failures)
        run = self.run
        lines = summary_lines(run, self.verbose) if run is not None and run.mode != "bench" else []
        if self.verbose:
            for text in self.failures:
                lines.append("")
                lines.extend(text.splitlines())
        violations = run.violations if run is not None else []
        error = run.error if run is not None else None
        if error is None and pytest_code in _PYTEST_TROUBLE:
            error = f"the run stopped early ({_PYTEST_TROUBLE[pytest_code]})"
        if error is None and pytest_code != 0 and not violations:
            error = "a test failed without naming a violation" + ("" if self.verbose else "; run with -v to see it")
        self.error = error
        if violations:
            names = sorted({v.violation.invariant for v in violations})
            word = "violation" if len(violations) == 1 else "violations"
            lines.append(f"partywall {self.command}: FAILED, {len(violations)} {word} found ({', '.join(names)})"
                         + (f"; also: {error}" if error else ""))
            return 1, lines
        if error is not None:
            lines.append(f"partywall {self.command}: the run could not be made: {error}")
            return 2, lines
        if self.command == "run":
            lines.append("partywall run: PASSED, every invariant held.")
        elif self.command == "replay":
            lines.append("partywall replay: PASSED, the replayed program broke no invariant now.")
        return 0, lines
