#!/usr/bin/env python3
"""1,000 users over several local load generators against ONE server, merged into one report.

    python ci/bench_1000.py [--users 1000] [--workers 4] [--out DIR] [--time-limit 600]

Not part of `.ci/run` (it takes the machine for a while). It starts one
reference server (`python -m partywall_agentserver` on 127.0.0.1 port 0 with a fresh
database and a random secret, through `partywall.target.EmbeddedTarget`),
then runs the bench profile under pytest-xdist with ``-n WORKERS``: every
worker is a process of its own and runs its shard of the same seeded plan
(worker gwK runs the users with index % WORKERS == K) against that one server,
given by ``--server-url``/``--auth-secret``/``--server-pid`` so every shard
samples the server's own process. Each worker writes ``REPORT.gwK.json``;
`partywall.benchreport.merge_reports` (what ``partywall merge`` runs) merges them (percentiles from merged histograms, never
averaged; thresholds re-evaluated on the merged figures) into
``DIR/bench-1000.json``, ``.html`` and ``.xml``, and the figures are printed.

Exit 0 when the merged gate holds, 1 when it fails, 2 when the run could not
be made. Bounded: pytest is killed after --time-limit seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from partywall.benchreport import BenchReport, format_summary, merge_reports
from partywall.errors import HarnessError
from partywall.reports import write_html, write_junit
from partywall.target import EmbeddedTarget


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4, help="load-generating processes (pytest-xdist -n)")
    p.add_argument("--seed", type=int, default=None, help="the plan's seed (default [tool.partywall.bench])")
    p.add_argument("--out", default="bench-1000", help="directory for the shard and merged reports")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds the sharded run may take")
    ns = p.parse_args()
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("REPORT.gw*.json"):
        old.unlink()  # a shard left from an earlier run must not be merged into this one

    with tempfile.TemporaryDirectory(prefix="partywall-1000-") as tmp, EmbeddedTarget(tmp) as server:
        pid = server.server_pid()
        assert server.url is not None
        print(f"server: {server.url} pid {pid}", flush=True)
        cmd = [sys.executable, "-m", "pytest", "--pyargs", "partywall_props", "-p", "no:cacheprovider", "-q",
               "--no-header", "-n", str(ns.workers), "--hypothesis-profile=bench",
               "--partywall-server-url", server.url, "--partywall-auth-secret", server.secret,
               "--partywall-server-pid", str(pid),
               "--partywall-users", str(ns.users), "--partywall-report", str(out / "REPORT.json")]
        if ns.seed is not None:
            cmd += ["--partywall-seed", str(ns.seed)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, timeout=ns.time_limit, env={**os.environ, "CI": ""},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired:
            print(f"bench-1000: the sharded run took longer than {ns.time_limit:g} s", file=sys.stderr)
            return 2
        wall = time.monotonic() - t0
        died = server.died()
    print(proc.stdout[-2000:])
    shards = sorted(out.glob("REPORT.gw*.json"))
    if len(shards) != ns.workers:
        print(f"bench-1000: expected {ns.workers} shard reports, found {len(shards)} (pytest exit "
              f"{proc.returncode}); the run could not be made", file=sys.stderr)
        return 2
    try:
        merged = merge_reports([BenchReport.read(str(path)) for path in shards], names=[str(p) for p in shards])
    except HarnessError as exc:
        print(f"bench-1000: {exc}", file=sys.stderr)
        return 2
    merged.extra["wall_s"] = round(wall, 3)
    if died:
        merged.error = f"the server died during the run: {died}"
        merged.ok = False
    merged.write(str(out / "bench-1000.json"))
    write_html(merged, out / "bench-1000.html")
    write_junit(merged, out / "bench-1000.xml")
    print(format_summary(merged))
    print(f"{ns.workers} load generators, whole sharded run (pytest start-up included) {wall:.1f} s; "
          f"reports in {out}")
    if merged.error:
        return 2
    return 0 if merged.ok else 1


if __name__ == "__main__":
    sys.exit(main())
