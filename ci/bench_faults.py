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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "suite"))
from test_fault_proofs import PROOFS, run_suite  # noqa: E402 - the proofs' own table and runner, so the figures match them


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="faults to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[20250801], help="seeds to run each fault with")
    args = parser.parse_args()
    rows = []
    for fault in args.only or sorted(PROOFS):
        proof = PROOFS[fault]
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.monotonic()
                found = run_suite(Path(tmp), proof.server, (*proof.options, "--seed", str(seed)), fault)
                took = time.monotonic() - started
                v = found.report["violations"][0] if found.report["violations"] else {}
                steps = len(json.loads(Path(v["replay"]).read_text())["program"]) if v.get("replay") else None
            st = found.report.get("stats", {})
            named = f"{v.get('invariant')}/{v.get('check')}" if v else "-"
            rows.append((fault, seed, f"{proof.invariant}/{proof.check}", named, found.code, took, st.get("shrink_s"),
                         st.get("found_steps"), steps, v.get("reproduced")))
            print(f"{fault} seed {seed}: exit {found.code} in {took:.1f} s", file=sys.stderr)
    print("| fault | seed | must name | named | exit | run (s) | shrinking (s) | steps found -> shrunk | reproduced |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fault, seed, must, named, code, took, shrink_s, found_steps, shrunk, rep in rows:
        print(f"| `{fault}` | {seed} | {must} | {named} | {code} | {took:.1f} | {shrink_s} | {found_steps} -> {shrunk} | {rep} |")
    return 0 if all(r[4] == 1 and r[2] == r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
