"""How long the `ci` profile takes to find and shrink each planted fault.

Runs `partywall run --profile ci` once per fault of `partywall_agentserver/faults.py`
and seed (with the server options the fault proofs use) and prints, per run:
the invariant and check named, the whole run's wall time, the time spent
shrinking, the program length found and shrunk, and how often the shrunk
program reproduced; then per fault the median time over the seeds. With
``--update-coverage`` the medians go into docs/coverage.md's last column.
Bounded: each run has a time limit and the script stops by itself. Run by
hand or nightly, not in .ci/run:

    python ci/bench_faults.py --seeds 1 2 3 --jobs 2 [--only FAULT ...] [--update-coverage]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "suite"))
from test_fault_proofs import PROOFS, run_suite  # noqa: E402 - the proofs' own table and runner, so the figures match them


def one(fault: str, seed: int) -> tuple:
    proof = PROOFS[fault]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        try:
            found = run_suite(Path(tmp), proof.server, (*proof.options, "--seed", str(seed)), fault)
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:  # no report: killed, or out of time
            print(f"{fault} seed {seed}: no report ({type(exc).__name__})", file=sys.stderr)
            return (fault, seed, f"{proof.invariant}/{proof.check}", "-", None, time.monotonic() - started,
                    None, None, None, None)
        took = time.monotonic() - started
        v = found.report["violations"][0] if found.report["violations"] else {}
        steps = len(json.loads(Path(v["replay"]).read_text())["program"]) if v.get("replay") else None
    st = found.report.get("stats", {})
    named = f"{v.get('invariant')}/{v.get('check')}" if v else "-"
    print(f"{fault} seed {seed}: exit {found.code} in {took:.1f} s, {named}", file=sys.stderr)
    return (fault, seed, f"{proof.invariant}/{proof.check}", named, found.code, took, st.get("shrink_s"),
            st.get("found_steps"), steps, v.get("reproduced"))


def update_coverage(medians: dict[str, float]) -> None:
    """Write each fault's median time into docs/coverage.md, in the order the row names the faults."""
    path = ROOT / "docs" / "coverage.md"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"^\| \d+ \|", line):
            continue
        cells = line.split(" | ")
        faults = re.findall(r"`([a-z_0-9]+)`", cells[-2]) if "**gap**" not in cells[-2] else []
        if faults:
            before = cells[-1].rstrip(" |").split(", ")
            before = before if len(before) == len(faults) else ["?"] * len(faults)
            cells[-1] = ", ".join(f"{medians[f]:.1f}" if f in medians else old for f, old in zip(faults, before, strict=True)) + " |"
            lines[i] = " | ".join(cells)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="faults to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[20250801], help="seeds to run each fault with")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1; at most the machine's cores)")
    parser.add_argument("--update-coverage", action="store_true", help="write the medians into docs/coverage.md")
    args = parser.parse_args()
    work = [(fault, seed) for fault in (args.only or sorted(PROOFS)) for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda fs: one(*fs), work))
    print("| fault | seed | must name | named | exit | run (s) | shrinking (s) | steps found -> shrunk | reproduced |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fault, seed, must, named, code, took, shrink_s, found_steps, shrunk, rep in rows:
        print(f"| `{fault}` | {seed} | {must} | {named} | {code} | {took:.1f} | {shrink_s} | {found_steps} -> {shrunk} | {rep} |")
    print()
    print("| fault | caught with the right check | median s [min-max] | shrunk steps | reproduced |")
    print("| --- | --- | --- | --- | --- |")
    medians = {}
    for fault in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == fault]
        times = [r[5] for r in mine]
        medians[fault] = statistics.median(times)
        right = sum(1 for r in mine if r[4] == 1 and r[2] == r[3])
        shrunk = ", ".join(sorted({str(r[8]) for r in mine}))
        print(f"| `{fault}` | {right}/{len(mine)} | {medians[fault]:.1f} [{min(times):.1f}-{max(times):.1f}] | {shrunk} | "
              f"{', '.join(str(r[9]) for r in mine)} |")
    if args.update_coverage:
        update_coverage(medians)
    return 0 if all(r[4] == 1 and r[2] == r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
