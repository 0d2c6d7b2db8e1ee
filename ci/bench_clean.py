"""No false alarms: the `ci` profile under many seeds against the clean reference server.

Runs `partywall run --profile ci --seed N` for each seed against a fresh
embedded reference server (which the suite may crash and restart) and prints,
per seed: the exit code (0 expected), examples, steps, wall time, steps per
second and the fingerprint of the generated programs; any finding is printed
whole. Bounded: each run has a time limit and the script stops by itself.
Run by hand or nightly, not in .ci/run:

    python ci/bench_clean.py --seeds 1 2 3 4 5 6 7 8 9 10 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def one(seed: int) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "partywall.cli", "run", "--profile", "ci", "--seed", str(seed),
                               "--report", str(report), "--replay-dir", tmp],
                              capture_output=True, text=True, timeout=1200, cwd=tmp)
        took = time.monotonic() - started
        data = json.loads(report.read_text())
    st = data.get("stats", {})
    print(f"seed {seed}: exit {proc.returncode} in {took:.0f} s", file=sys.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-4000:] + proc.stderr[-4000:], file=sys.stderr)
    return seed, proc.returncode, st.get("examples"), st.get("steps"), took, st.get("steps_per_second"), \
        st.get("program_fingerprint"), [f"{v['invariant']}/{v.get('check')}: {v['title']}" for v in data["violations"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    args = parser.parse_args()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(one, args.seeds))
    print("| seed | exit | examples | steps | wall (s) | steps/s | programs fingerprint | findings |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed, code, examples, steps, took, rate, fingerprint, found in rows:
        print(f"| {seed} | {code} | {examples} | {steps} | {took:.0f} | {rate} | {fingerprint} | {'; '.join(found) or 'none'} |")
    return 0 if all(r[1] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
