"""The fixed-seed benchmark as a pytest test (profile ``bench``; ``partywall bench`` runs it).

It runs the plan of ``[tool.partywall.bench]`` (or ``--partywall-users`` /
``--partywall-seed``, as every layer of the settings leaves them), writes the JSON (``--partywall-report``), JUnit
(``--partywall-junit``) and HTML (``--partywall-html``) reports, prints a
summary, and fails when the gate fails: a threshold (a `timing` violation
naming actual and limit) or any invariant. ``partywall bench`` runs the same
`partywall_props.benchmain.bench_once` without pytest.

Sharding: ``--partywall-shard K/N`` runs the users with index % N == K-1.
``--partywall-workers N`` and ``--partywall-dask ADDRESS`` run every shard,
as ``partywall bench`` does with them (`partywall.launch`): one server, the
shards started at one instant, one merged report. Under pytest-xdist
(``-n N``; the bench profile makes xdist hand this test to
every worker, see ``props/conftest.py``) worker ``gwK`` runs shard K of N by
itself and writes ``REPORT.gwK.json`` beside the ``--partywall-report``
path, ready for ``partywall merge``. Give the workers one
shared server with ``--server-url`` (else each starts its own).
"""

from __future__ import annotations

import pytest
from partywall_props.benchmain import bench_once

from partywall.benchreport import format_summary
from partywall.errors import HarnessError
from partywall.plugin import Run
from partywall.session import Session


@pytest.mark.partywall_bench
def test_bench_100_users(partywall_run: Run, request: pytest.FixtureRequest,
                         capsys: pytest.CaptureFixture[str]) -> None:
    settings = partywall_run.settings
    workerinput = getattr(request.config, "workerinput", None)
    try:
        with capsys.disabled():  # the progress line belongs on the terminal, even under capture
            if settings.get("workers") is not None or settings.get("dask"):
                if workerinput is not None:
                    raise HarnessError("--partywall-workers and --partywall-dask start their own shards; "
                                       "run them without pytest-xdist's -n.")
                from partywall.launch import sharded

                partywall_run.report_written = True  # the launcher writes it, whatever happens
                _, report = sharded(settings, verbose=request.config.getoption("verbose") > 0)
            else:
                # The one run here: its session (the server) is started only now.
                session: Session = request.getfixturevalue("partywall_session")
                report, written = bench_once(session, settings.get, partywall_run.seed, workerinput=workerinput)
                print("\n" + format_summary(report))
                for path in written:
                    print(f"wrote {path}")
    except HarnessError as exc:
        # The run could not be made: exit 2 (the CLI reads the plugin's error); the report says so.
        partywall_run.fail(str(exc))
        raise
    if not report.ok:
        # The violations are in the session's record already (the bench reports each once).
        if not report.violations:
            raise HarnessError("the bench gate failed but named no violation; see the report's thresholds.")
        first = report.violations[0].violation()
        more = len(report.violations) - 1
        raise type(first)(first.invariant, first.title + (f" (and {more} more)" if more else ""), first.evidence)
