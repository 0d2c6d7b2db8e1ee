"""The fixed-seed benchmark as a pytest test (profile ``bench``; ``partywall bench`` runs it).

It runs the plan of ``[tool.partywall.bench]`` (or ``--partywall-users`` /
``--partywall-seed``, as every layer of the settings leaves them), writes the JSON (``--partywall-report``), JUnit
(``--partywall-junit``) and HTML (``--partywall-html``) reports, prints a
summary, and fails when the gate fails: a threshold (a `timing` violation
naming actual and limit) or any invariant.

Sharding: ``--partywall-shard K/N`` runs the users with index % N == K-1.
Under pytest-xdist (``-n N``; the bench profile makes xdist hand this test to
every worker, see ``props/conftest.py``) worker ``gwK`` runs shard K of N by
itself and writes ``REPORT.gwK.json`` beside the ``--partywall-report``
path, ready for `partywall.stats.merge_bench_reports`. Give the workers one
shared server with ``--server-url`` (else each starts its own).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from partywall_props.bench import (
    Plan,
    error_report,
    format_summary,
    parse_shard,
    run_bench,
    xdist_shard,
)

from partywall.errors import HarnessError, Violation
from partywall.plugin import Run
from partywall.reports import write_html, write_junit
from partywall.session import Session


def _worker_path(path: str | None, worker: str | None) -> str | None:
    """``out/bench.json`` → ``out/bench.gw1.json`` on xdist worker gw1 (shards must not overwrite each other)."""
    if path is None or worker is None:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{worker}{p.suffix}"))


def _write(report: dict[str, Any], opt: Any, worker: str | None) -> list[str]:
    """Write the report wherever the settings ask; ``opt`` gives an option's value by name."""
    written = []
    json_path = _worker_path(opt("report"), worker)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n",
                                   encoding="utf-8")
        written.append(json_path)
    junit_path = _worker_path(opt("junit"), worker)
    if junit_path:
        write_junit(report, junit_path)
        written.append(junit_path)
    html_path = _worker_path(opt("html"), worker)
    if html_path:
        write_html(report, html_path)
        written.append(html_path)
    return written


@pytest.mark.partywall_bench
def test_bench_100_users(partywall_session: Session, partywall_run: Run, request: pytest.FixtureRequest,
                         capsys: pytest.CaptureFixture[str]) -> None:
    opt = partywall_run.settings.get
    session = partywall_session
    workerinput = getattr(request.config, "workerinput", None)
    worker = workerinput["workerid"] if workerinput else None
    plan: Plan | None = None
    shard = None
    try:
        shard_opt = opt("shard")
        shard = parse_shard(shard_opt) if shard_opt else xdist_shard(workerinput)
        plan = Plan.from_config(session.config["bench"], seed=partywall_run.seed)
        with capsys.disabled():  # the progress line belongs on the terminal, even under capture
            report = run_bench(session, plan, shard=shard)
    except HarnessError as exc:
        # The run could not be made: exit 2 (the CLI reads the plugin's error), and a report says so.
        partywall_run.fail(str(exc))
        session.bench_report = error_report(plan, str(exc), shard)
        _write(session.bench_report, opt, worker)
        raise
    session.bench_report = report
    written = _write(report, opt, worker)
    with capsys.disabled():
        print("\n" + format_summary(report))
        for path in written:
            print(f"wrote {path}")
    found = [Violation(v["invariant"], v["title"], v.get("evidence"), v.get("check")) for v in report["violations"]]
    for v in found:
        session.report(v)
    if not report["ok"]:
        if not found:
            raise HarnessError("the bench gate failed but named no violation; see the report's thresholds.")
        more = len(found) - 1
        raise Violation(found[0].invariant, found[0].title + (f" (and {more} more)" if more else ""),
                        found[0].evidence)
