#!/usr/bin/env python3
"""Compare a bench report with a stored baseline; fail on a regression.

    python ci/compare_baseline.py REPORT BASELINE [--tolerance F] [--floor-ms MS]
                                  [--rss-tolerance F] [--rss-floor-mib MIB]

Exit 0 when nothing regressed, 1 when something did (the table says what),
2 when the two cannot be compared: a file is missing or not a bench report,
the plan fingerprints differ (another seed, user count or plan: comparing
would be meaningless), or the report says its run could not be made.

Gated: agent start-up p95 and p99 and reply p95 (client-side, ms); the
connect, agent start-up and overall success rates; the server's peak RSS.

How the tolerance was chosen. The bench runs on a shared 2-core machine
beside other work, 100 users against a server whose agent start-ups take a
few hundred ms by design. What moves between two runs of the same commit is
scheduling, not the code: a stall of the event loop of 50-200 ms when a
neighbour takes both cores lands in the tail, and at n = 100 the p99 is the
second-largest sample, so one stall moves it entirely. Hence a latency
regresses only when it exceeds BOTH the baseline times (1 + tolerance) and
the baseline plus an absolute floor:

- ``--tolerance 0.5`` (+50 %): wide enough that two runs of one commit on a
  busy machine stay inside it, narrow enough that a doubling is caught. The
  regressions this gate exists for are far larger: start-ups serialised
  under a lock turn a p95 of under a second into tens of seconds for 100
  users.
- ``--floor-ms 100``: below it a difference is within one scheduler stall, so
  tiny latencies (a 4 ms reply read against 7 ms next time, +75 %) never flap.

Success rates get no tolerance by default: with 100 users one failed
connection is 1 %, and a failure is a real event, not noise (the threshold
gate demands every connection anyway). Memory is less noisy than time but
the allocator keeps arenas by chance: ``--rss-tolerance 0.25`` with a floor
of 32 MiB. Re-check these figures when the machine changes: run the bench
five times on one commit; the spread must sit well inside the band.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (label, path into the report) of every latency the gate reads.
GATED_LATENCIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("agent_startup p95 (ms)", ("latency_ms", "agent_startup", "p95")),
    ("agent_startup p99 (ms)", ("latency_ms", "agent_startup", "p99")),
    ("response p95 (ms)", ("latency_ms", "response", "p95")),
)
GATED_RATES: tuple[str, ...] = ("connect", "agent_startup", "overall")


class CannotCompare(Exception):
    """The two files cannot be compared; exit 2 with this sentence."""


def _load(path: str, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CannotCompare(f"the {what} {path} could not be read ({exc.strerror or exc}).") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CannotCompare(f"the {what} {path} is not JSON ({exc}); expected a bench report.") from exc
    if not isinstance(data, dict) or "plan_fingerprint" not in data:
        raise CannotCompare(
            f"the {what} {path} is not a bench report (it has no plan_fingerprint); pass the JSON "
            "that `partywall bench --report` wrote."
        )
    return data


def _get(report: dict[str, Any], path: Sequence[str]) -> float | None:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return None
    return float(node)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "rate":
        return "100%" if value >= 1 else f"{math.floor(value * 10000) / 100:.2f}%"
    return f"{value:,.1f}"


def _change(base: float | None, cur: float | None) -> str:
    if base is None or cur is None:
        return "-"
    if base == 0:
        return "+inf" if cur > 0 else "0%"
    return f"{(cur - base) / base * 100:+.1f}%"


def compare(
    report: dict[str, Any],
    baseline: dict[str, Any],
    *,
    tolerance: float = 0.5,
    floor_ms: float = 100.0,
    rss_tolerance: float = 0.25,
    rss_floor_mib: float = 32.0,
    rate_tolerance: float = 0.0,
) -> tuple[list[list[str]], list[str]]:
    """(table rows, regressions) of a report against a baseline; CannotCompare if they don't compare."""
    if report.get("plan_fingerprint") != baseline.get("plan_fingerprint"):
        raise CannotCompare(
            f"the plan fingerprints differ (report {report.get('plan_fingerprint')!r}, baseline "
            f"{baseline.get('plan_fingerprint')!r}): the runs used different plans (seed, users or "
            "options), so their figures are not comparable; re-run with the baseline's options or "
            "record a new baseline."
        )
    if report.get("error"):
        raise CannotCompare(f"the report says its run could not be made: {report['error']}")

    _require_gated_metrics(baseline)
    rows: list[list[str]] = []
    regressions: list[str] = []

    for label, path in GATED_LATENCIES:
        base, cur = _get(baseline, path), _get(report, path)
        assert base is not None  # _require_gated_metrics
        allowed = max(base * (1 + tolerance), base + floor_ms)
        if cur is None:
            verdict = "REGRESSED (no successful samples)"
            regressions.append(f"{label}: no successful samples (baseline {base:,.1f})")
        elif cur > allowed:
            verdict = "REGRESSED"
            regressions.append(f"{label}: {cur:,.1f} > allowed {allowed:,.1f} (baseline {base:,.1f})")
        else:
            verdict = "ok"
        rows.append([label, _fmt(base, "ms"), _fmt(cur, "ms"), _change(base, cur), _fmt(allowed, "ms"), verdict])

    for name in GATED_RATES:
        label = f"{name} success rate"
        base, cur = _get(baseline, ("success_rate", name)), _get(report, ("success_rate", name))
        assert base is not None  # _require_gated_metrics
        allowed = base - rate_tolerance
        # A tiny epsilon so that 97/97 computed two ways never reads as a drop.
        if cur is None or cur < allowed - 1e-9:
            verdict = "REGRESSED"
            regressions.append(f"{label}: {_fmt(cur, 'rate')} < allowed {_fmt(allowed, 'rate')}")
        else:
            verdict = "ok"
        rows.append([label, _fmt(base, "rate"), _fmt(cur, "rate"), _change(base, cur),
                     f">= {_fmt(allowed, 'rate')}", verdict])

    label = "server peak RSS (MiB)"
    base, cur = _get(baseline, ("server", "rss_mib_peak")), _get(report, ("server", "rss_mib_peak"))
    if cur is None:
        # No server figures in the report is legitimate (a remote server without
        # --server-pid); the table shows it rather than failing or hiding it.
        rows.append([label, _fmt(base, "MiB"), _fmt(cur, "MiB"), "-", "-", "not sampled"])
    else:
        allowed = max(base * (1 + rss_tolerance), base + rss_floor_mib)
        verdict = "ok" if cur <= allowed else "REGRESSED"
        if verdict != "ok":
            regressions.append(f"{label}: {cur:,.1f} > allowed {allowed:,.1f} (baseline {base:,.1f})")
        rows.append([label, _fmt(base, "MiB"), _fmt(cur, "MiB"), _change(base, cur), _fmt(allowed, "MiB"), verdict])
    return rows, regressions


def _require_gated_metrics(baseline: dict[str, Any]) -> None:
    """CannotCompare unless the baseline holds every gated figure: a gate with a gap passes silently."""
    paths = [path for _, path in GATED_LATENCIES] + [("success_rate", name) for name in GATED_RATES]
    paths.append(("server", "rss_mib_peak"))
    missing = [".".join(path) for path in paths if _get(baseline, path) is None]
    if missing:
        raise CannotCompare(
            f"the baseline lacks gated figures ({', '.join(missing)}), so the gate could not check them; "
            "record the baseline again where CI runs (see the README, 'The CI gate')."
        )


def _table(rows: list[list[str]]) -> str:
    head = ["metric", "baseline", "current", "change", "allowed", "verdict"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for j, row in enumerate([head, *rows]):
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 5)] + [row[5]]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare_baseline.py",
        description="Compare a partywall bench report with a stored baseline.",
    )
    parser.add_argument("report", help="the bench report of this run (JSON)")
    parser.add_argument("baseline", help="the stored baseline bench report (JSON)")
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help="allowed relative growth of a gated latency (default 0.5 = +50%%)")
    parser.add_argument("--floor-ms", type=float, default=100.0,
                        help="growth in ms that never fails, whatever the ratio (default 100)")
    parser.add_argument("--rss-tolerance", type=float, default=0.25,
                        help="allowed relative growth of the server's peak RSS (default 0.25)")
    parser.add_argument("--rss-floor-mib", type=float, default=32.0,
                        help="RSS growth in MiB that never fails (default 32)")
    parser.add_argument("--rate-tolerance", type=float, default=0.0,
                        help="allowed drop of a success rate, as a fraction (default 0)")
    args = parser.parse_args(argv)
    for name in ("tolerance", "floor_ms", "rss_tolerance", "rss_floor_mib", "rate_tolerance"):
        if getattr(args, name) < 0:
            print(f"compare_baseline: --{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)}).",
                  file=sys.stderr)
            return 2
    try:
        report = _load(args.report, "report")
        baseline = _load(args.baseline, "baseline")
        rows, regressions = compare(
            report, baseline, tolerance=args.tolerance, floor_ms=args.floor_ms,
            rss_tolerance=args.rss_tolerance, rss_floor_mib=args.rss_floor_mib,
            rate_tolerance=args.rate_tolerance,
        )
    except CannotCompare as exc:
        print(f"compare_baseline: cannot compare: {exc}", file=sys.stderr)
        return 2
    print(f"plan {report['plan_fingerprint']}, seed {report.get('seed')}, users {report.get('users')}; "
          f"latency tolerance +{args.tolerance * 100:g}% and {args.floor_ms:g} ms")
    print(_table(rows))
    if regressions:
        print(f"\n{len(regressions)} regression(s) against the baseline:")
        for line in regressions:
            print(f"  - {line}")
        return 1
    print("\nno regression against the baseline.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
