"""What a team sees when it installs partywall from a wheel: CI's install check.

Builds the wheel from this checkout, installs it into a fresh virtual
environment outside the checkout, and from an empty folder runs the first
commands a new user runs, against the embedded reference server:

1. the distribution's top-level import names are all partywall's own;
2. ``partywall run --profile smoke`` and ``partywall bench --users 20`` pass
   with the packaged defaults alone;
3. with a ``pyproject.toml`` in that folder that overrides one threshold,
   the override takes effect and every other default stays;
4. a bad key there stops the run with one line and exit 2.

Usage: ``python ci/install_check.py [--keep DIR]``. Exit 0 when every check
holds; 1 with the failed check's name otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Words of pytest's and Hypothesis's own output that a partywall command must not print.
INTERNALS = ("PytestConfigWarning", "deselected", "docs.pytest.org", "hypothesis.errors", "Traceback",
             "warnings summary", "short test summary")


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr)
    return proc


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""), flush=True)
    if not ok:
        raise SystemExit(1)


def clean(proc: subprocess.CompletedProcess[str]) -> bool:
    return not any(word in proc.stdout + proc.stderr for word in INTERNALS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    ns = ap.parse_args()
    tmp = Path(ns.keep) if ns.keep else Path(tempfile.mkdtemp(prefix="partywall-install-"))
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    wheels = tmp / "wheels"
    proc = sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)], cwd=tmp)
    check("the wheel builds", proc.returncode == 0, proc.stderr[-500:])
    wheel = next(wheels.glob("partywall-*.whl"))
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    py, exe = venv / "bin" / "python", venv / "bin" / "partywall"
    proc = sh([str(py), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp, timeout=600)
    check("the wheel installs into a fresh environment", proc.returncode == 0, proc.stderr[-500:])

    names = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print('\\n'.join(sorted({str(f).split('/')[0] for f in "
         "m.distribution('partywall').files if not str(f).split('/')[0].endswith(('.dist-info', '..'))})))"],
        capture_output=True, text=True, cwd=tmp, check=True).stdout.split()
    print("top-level names:", ", ".join(names))
    check("every top-level name is partywall's own", bool(names) and all(n.startswith("partywall") for n in names)
          and "bin" not in names, str(names))

    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTYWALL_") and k not in ("CI", "PYTHONPATH")}
    empty = tmp / "empty"
    if empty.exists():
        shutil.rmtree(empty)  # a kept folder from an earlier check: start empty again
    empty.mkdir()
    proc = sh([str(exe), "run", "--profile", "smoke", "--report", "smoke.json"], cwd=empty, env=env)
    report = json.loads((empty / "smoke.json").read_text())
    check("partywall run --profile smoke passes from an empty folder", proc.returncode == 0 and report["ok"],
          proc.stderr[-500:])
    check("its output is partywall's own", clean(proc))
    proc = sh([str(exe), "bench", "--users", "20", "--report", "bench.json"], cwd=empty, env=env)
    bench = json.loads((empty / "bench.json").read_text())
    check("partywall bench --users 20 passes from an empty folder", proc.returncode == 0 and bench["ok"],
          proc.stderr[-500:])
    check("its output is partywall's own", clean(proc))
    default_p99 = bench["thresholds"]["agent_startup_p99_ms"]["limit"]

    # A threshold no server meets: the override must take effect (exit 1, the limit in the
    # report), and the keys it does not name must keep their packaged defaults.
    (empty / "pyproject.toml").write_text("[tool.partywall.bench.thresholds]\nagent_startup_p95_ms = 1\n")
    proc = sh([str(exe), "bench", "--users", "20", "--report", "bench1.json"], cwd=empty, env=env)
    bench1 = json.loads((empty / "bench1.json").read_text())
    t = bench1["thresholds"]
    check("the project's threshold takes effect", proc.returncode == 1 and t["agent_startup_p95_ms"]["limit"] == 1
          and not t["agent_startup_p95_ms"]["ok"], json.dumps(t["agent_startup_p95_ms"]))
    check("every other default stays", t["agent_startup_p99_ms"]["limit"] == default_p99
          and t["server_peak_rss_mib"]["limit"] == bench["thresholds"]["server_peak_rss_mib"]["limit"])
    proc = sh([str(exe), "run", "--profile", "smoke", "--report", "smoke2.json"], cwd=empty, env=env)
    check("the smoke run still passes beside that file", proc.returncode == 0)
    proc = sh([str(exe), "config"], cwd=empty, env=env)
    row = next((line.split() for line in proc.stdout.splitlines()
                if line.startswith("bench.thresholds.agent_startup_p95_ms ")), [])
    check("partywall config names the file as the source",
          row[1:] == ["1", str((empty / "pyproject.toml").resolve())], str(row))

    (empty / "pyproject.toml").write_text("[tool.partywall]\nreply_timout_s = 3\n")
    proc = sh([str(exe), "run", "--profile", "smoke"], cwd=empty, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    check("a bad key is one line, exit 2", proc.returncode == 2 and len(lines) == 1 and "reply_timout_s" in lines[0]
          and "pyproject.toml" in lines[0], proc.stderr)
    print(f"install check passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
