"""The bench as one call: ``partywall bench`` runs it without pytest, and the pytest test shares it.

`main` is the ``partywall.bench`` entry point (``pyproject.toml``): the
harness's command looks the group up with ``importlib.metadata`` and calls it
with the resolved settings, so the command neither imports the properties
by name nor pays for starting pytest and Hypothesis, which the bench does
not use. `bench_once` is the part both ways share: the plan of the
settings, its users (or one shard of them) against a started session, the
report written wherever the settings say (JSON, JUnit, HTML), and a report
that says why when the run could not be made.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from partywall_props.bench import error_report, run_bench
from partywall_props.plan import Plan, parse_shard, xdist_shard

from partywall.benchreport import BenchReport, format_summary, verdict
from partywall.errors import HarnessError

Option = Callable[[str], Any]


def _worker_path(path: str | None, worker: str | None) -> str | None:
    """``out/bench.json`` → ``out/bench.gw1.json`` on xdist worker gw1 (shards must not overwrite each other)."""
    if path is None or worker is None:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{worker}{p.suffix}"))


def write_outputs(report: BenchReport, opt: Option, worker: str | None, bench: Mapping[str, Any]) -> list[str]:
    """Write the report wherever the settings ask (``opt`` gives an option's value by name).

    ``bench`` is ``[tool.partywall.bench]`` (the Pushgateway's job and time-out).
    """
    written = []
    json_path = _worker_path(opt("report"), worker)
    if json_path:
        report.write(json_path)
        written.append(json_path)
    junit_path = _worker_path(opt("junit"), worker)
    html_path = _worker_path(opt("html"), worker)
    if junit_path or html_path:
        from partywall.reports import write_html, write_junit

        if junit_path:
            write_junit(report, junit_path)
            written.append(junit_path)
        if html_path:
            write_html(report, html_path)
            written.append(html_path)
    metrics_path = _worker_path(opt("openmetrics"), worker)
    if metrics_path:
        from partywall import openmetrics

        openmetrics.write(report.to_json(), metrics_path)
        written.append(metrics_path)
    return written


def push_metrics(report: BenchReport, opt: Option, worker: str | None, bench: Mapping[str, Any]) -> str | None:
    """Push the report's metrics to ``--pushgateway`` (if given); where they went (None: not asked).

    A refused push is the run's error: the report says so (its JSON is
    rewritten) and HarnessError names the Pushgateway and why.
    """
    gateway = opt("pushgateway")
    if not gateway:
        return None
    from partywall import openmetrics

    try:
        return openmetrics.push(report.to_json(), str(gateway), float(bench["pushgateway_timeout_s"]),
                                job=str(bench["pushgateway_job"]))
    except HarnessError as exc:
        json_path = _worker_path(opt("report"), worker)
        if json_path:
            attrs.evolve(report, error=str(exc), ok=False).write(json_path)
        raise


def bench_once(session: Any, opt: Option, seed: int, *, workerinput: Mapping[str, Any] | None = None,
               progress: bool = True) -> tuple[BenchReport, list[str]]:
    """Run the settings' plan (its shard) on a started session; (report, files written).

    HarnessError when the run could not be made, after writing a report that says so.
    """
    worker = str(workerinput["workerid"]) if workerinput else None
    plan: Plan | None = None
    shard = None
    try:
        if opt("pushgateway"):  # a bad URL is refused before the run, not after it
            from partywall.openmetrics import check_url

            check_url(opt("pushgateway"))
        shard_opt = opt("shard")
        shard = parse_shard(shard_opt) if shard_opt else xdist_shard(workerinput)
        plan = Plan.from_config(session.config["bench"], seed=seed)
        gate = None
        if opt("start_gate"):  # a shard of a launched run (the launcher's module only then: start-up)
            from partywall.launch import start_gate

            gate = start_gate(opt("start_gate"), shard)
        report = run_bench(session, plan, shard=shard, progress=progress, start_gate=gate)
    except HarnessError as exc:
        session.bench_report = error_report(plan, str(exc), shard)
        write_outputs(session.bench_report, opt, worker, session.config["bench"])
        raise
    session.bench_report = report
    written = write_outputs(report, opt, worker, session.config["bench"])
    pushed = push_metrics(report, opt, worker, session.config["bench"])
    if pushed:
        written.append(f"metrics to {pushed}")
    return report, written


def main(found: Any) -> int:
    """``partywall bench``: the resolved settings (`partywall.config.Settings`) in, the exit code out."""
    from partywall.session import session_from_settings

    seed = found.get("seed")
    seed = int(found["bench"]["seed"] if seed is None else seed)
    session = None
    try:
        session = session_from_settings(found, seed=seed, profile="bench")
        session.start(observer=lambda ev, frame: None)
        report, written = bench_once(session, found.get, seed)
    except HarnessError as exc:
        if session is None or session.bench_report is None:
            # Before the plan ran (settings, target, credentials): the report still says why.
            write_outputs(BenchReport.of_error(str(exc)), found.get, None, found["bench"])
        elif session.bench_report.users:
            print("\n" + format_summary(session.bench_report))  # the run was made; only what followed failed
        raise
    finally:
        if session is not None:
            session.close()
    print("\n" + format_summary(report))
    for path in written:
        print(f"wrote {path}")
    status, line = verdict(report)
    print(line, file=sys.stderr if status == 2 else sys.stdout)
    return status
