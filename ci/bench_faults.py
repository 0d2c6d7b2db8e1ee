"""How long the `ci` profile takes to find and shrink each planted fault.

Runs `partywall run --profile ci` once per fault of `partywall_agentserver/faults.py`
(with the server options the fault proofs use) and prints, per fault: the
invariant named, the whole run's wall time, the time spent shrinking, the
program length found and shrunk, and how often the shrunk program
reproduced. Bounded: each run has a time limit and the script stops by
itself. Run by hand or nightly, not in .ci/run:

    python ci/bench_faults.py [--only FAULT ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "suite"))
from test_fault_proofs import FAULTS  # noqa: E402 - the proofs' own table, so the figures match them


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="faults to run (default: all)")
    parser.add_argument("--limit-s", type=float, default=300, help="time limit per fault")
    args = parser.parse_args()
    rows = []
    for fault in args.only or sorted(FAULTS):
        invariant, server_opts, opts = FAULTS[fault]
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "r.json"
            cmd = f"{sys.executable} -m partywall_agentserver --port 0 --db {tmp}/db --fault {fault} {server_opts}"
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "partywall.cli", "run", "--profile", "ci", "--server-cmd", cmd,
                 "--auth-secret", "bench-faults-" + "x" * 32, "--report", str(report), "--replay-dir", tmp,
                 "--set", "shrink_seconds=25", *opts],
                capture_output=True, text=True, timeout=args.limit_s, cwd=tmp,
            )
            took = time.monotonic() - started
            data = json.loads(report.read_text())
        named = [v["invariant"] for v in data["violations"]]
        v = data["violations"][0] if data["violations"] else {}
        st = data.get("stats", {})
        rows.append((fault, invariant, ", ".join(dict.fromkeys(named)) or "-", proc.returncode, took,
                     st.get("shrink_s"), st.get("found_steps"), st.get("shrunk_steps"), v.get("reproduced")))
        print(f"{fault}: exit {proc.returncode} in {took:.1f} s", file=sys.stderr)
    print("| fault | must name | named | exit | run (s) | shrinking (s) | steps found -> shrunk | reproduced |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fault, inv, named, code, took, shrink_s, found, shrunk, rep in rows:
        print(f"| `{fault}` | {inv} | {named} | {code} | {took:.1f} | {shrink_s} | {found} -> {shrunk} | {rep} |")
    return 0 if all(r[3] == 1 and r[1] in r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
