#!/usr/bin/env python3
"""How much of `partywall bench` is the suite's own overhead: the same socket
work done by a minimal client, measured in one run beside the real thing.

    python ci/bench_minimal.py [--users 100] [--seed 100] [--rounds 3] [--json PATH]

For each round it starts two fresh reference servers (`python -m partywall_agentserver`,
port 0, new database, identical options) and against one runs this file's
minimal client, against the other `partywall bench --server-url ...`, each as
a process of its own, alternating which goes first. Both run the very same
seeded plan (`partywall_props.bench.Plan`): every user connects at one instant, starts
an agent, sends its messages (waiting for each whole reply), reads its
history, disconnects, reconnects and reads it again. The minimal client is
plain trio-websocket with no driver, no history, no invariants, no markers
registry and no resource sampling: what any load generator would do.

It prints per tool: the wall time of the whole command (interpreter, pytest
and plugin start-up included), the workload phase alone, the client's CPU
seconds (from the kernel's accounting of the child, not sampled), and
connect / agent start-up / reply percentiles; then partywall's added agent
start-up (p50 and p95 of the differences, round by round, against the targets
of 2 ms and 5 ms), its own `measurement_overhead_ms`, and a warning when its
process was CPU-saturated during the workload (mean over the resource samples
of the report's `client` section over 90 % of one core: a saturated load
generator measures its own queue, and its latencies are not the server's).
Bounded: each child has a --time-limit (default 300 s).

``python ci/bench_minimal.py client --url URL --secret S --json PATH`` is the
minimal client alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio
from partywall_props.bench import METRICS, Plan, PlannedUser
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from partywall import config as configmod
from partywall import tokens
from partywall.stats import summarize
from partywall.target import EmbeddedTarget

#: partywall's added agent start-up that the comparison aims at (ms, p50 and p95).
TARGET_ADDED_MS = {"p50": 2.0, "p95": 5.0}
#: Client CPU (mean percent of one core over the workload) past which its latencies are suspect.
SATURATED_CPU_PERCENT = 90.0
MAX_FRAME = 16 * 1024 * 1024 + 4096


class Minimal:
    """The workload of `partywall_props.bench`, written the shortest way with trio-websocket."""

    def __init__(self, url: str, secret: str, plan: Plan, timeout_s: float) -> None:
        self.url = url
        self.secret = secret
        self.plan = plan
        self.timeout_s = timeout_s
        self.prefix = f"min{os.getpid()}-"
        self.samples: dict[str, list[float]] = {m: [] for m in METRICS}
        self.failures: dict[str, int] = {m: 0 for m in METRICS}
        self.ok_users = 0
        self.seq = 0

    def _url_and_headers(self, u: PlannedUser) -> tuple[str, list[tuple[bytes, bytes]]]:
        token = tokens.mint(self.secret, self.prefix + u.tenant, u.user)
        if u.via == "header":
            return self.url, [(b"Authorization", f"Bearer {token}".encode())]
        return f"{self.url}?token={quote(token, safe='')}", []

    async def _call(self, ws: Any, req_type: str, final: str, **fields: Any) -> tuple[dict[str, Any], dict[str, float]]:
        """Send a request and read until its final reply; (final frame, first arrival time of each type)."""
        self.seq += 1
        rid = f"m{self.seq}"
        await ws.send_message(json.dumps({"type": req_type, "id": rid, **fields}, ensure_ascii=False))
        seen: dict[str, float] = {}
        with trio.fail_after(self.timeout_s):
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("re") != rid:
                    continue
                seen.setdefault(frame["type"], time.monotonic())
                if frame["type"] in (final, "error"):
                    if frame["type"] == "error":
                        raise RuntimeError(f"error {frame.get('code')}")
                    return frame, seen

    def _open(self, u: PlannedUser) -> Any:
        url, headers = self._url_and_headers(u)
        return open_websocket_url(url, extra_headers=headers, message_queue_size=4096,
                                  max_message_size=MAX_FRAME)

    async def user(self, u: PlannedUser, t_go: float) -> None:
        step = "connect"
        try:
            async with self._open(u) as ws:
                await ws.get_message()  # welcome
                t = time.monotonic()
                self.samples["connect"].append((t - t_go) * 1000)
                step = "agent_startup"
                started, seen = await self._call(ws, "start_agent", "agent_started", assistant=u.assistant)
                self.samples["agent_startup"].append((seen["agent_started"] - t) * 1000)
                t = seen["agent_started"]
                thread = started["thread_id"]
                for i, body in enumerate(u.messages):
                    step = "response"
                    _, seen = await self._call(ws, "user_message", "agent_response", thread_id=thread,
                                               content=f"PWM{u.index:06d}{i:07d}Z {body}")
                    self.samples["first_chunk"].append((seen.get("agent_chunk", seen["agent_response"]) - t) * 1000)
                    self.samples["response"].append((seen["agent_response"] - t) * 1000)
                    t = seen["agent_response"]
                step = "history"
                _, seen = await self._call(ws, "get_history", "history", thread_id=thread)
                self.samples["history"].append((seen["history"] - t) * 1000)
            step = "reconnect"
            t = time.monotonic()
            async with self._open(u) as ws:
                await ws.get_message()
                self.samples["reconnect"].append((time.monotonic() - t) * 1000)
                t = time.monotonic()
                step = "history"
                _, seen = await self._call(ws, "get_history", "history", thread_id=thread)
                self.samples["history"].append((seen["history"] - t) * 1000)
        except (OSError, HandshakeError, ConnectionClosed, RuntimeError, trio.TooSlowError) as exc:
            self.failures[step] += 1
            print(f"user {u.index} failed at {step}: {exc!r}", file=sys.stderr)
            return
        self.ok_users += 1

    async def run(self) -> float:
        t_go = time.monotonic()
        async with trio.open_nursery() as n:
            for u in self.plan.members:
                n.start_soon(self.user, u, t_go)
        return time.monotonic() - t_go


def cmd_client(ns: argparse.Namespace) -> int:
    cfg = configmod.resolve().table
    plan = Plan.from_config(cfg["bench"], seed=ns.seed, users=ns.users)
    client = Minimal(ns.url, ns.secret, plan, float(cfg["bench"]["request_timeout_s"]))
    wall = trio.run(client.run)
    out = {
        "users": plan.users, "ok_users": client.ok_users, "duration_s": round(wall, 3),
        "plan_fingerprint": plan.fingerprint(),
        "latency_ms": {m: summarize(client.samples[m], client.failures[m]) for m in METRICS},
    }
    Path(ns.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if client.ok_users == plan.users else 1


def _child(cmd: list[str], time_limit: float) -> tuple[float, float, int]:
    """(wall s, CPU s of the child from the kernel's accounting, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, timeout=time_limit, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0,):
        print(proc.stdout[-4000:], file=sys.stderr)
    return wall, cpu, proc.returncode


def _one(kind: str, ns: argparse.Namespace, work: Path) -> dict[str, Any]:
    # Zero server delay by default, so what is left is the clients' own time (--server-args to change it).
    with EmbeddedTarget(work / f"{kind}-db", ns.server_args.split()) as target:  # stopped and deleted on exit
        assert target.url is not None
        out = work / f"{kind}.json"
        if kind == "minimal":
            cmd = [sys.executable, __file__, "client", "--url", target.url, f"--secret={target.secret}",
                   "--json", str(out), "--users", str(ns.users), "--seed", str(ns.seed)]
        else:
            cmd = [sys.executable, "-m", "partywall.cli", "bench", "--server-url", target.url,
                   f"--auth-secret={target.secret}", "--server-pid", str(target.server_pid()),
                   "--users", str(ns.users), "--seed", str(ns.seed), "--report", str(out)]
        wall, cpu, code = _child(cmd, ns.time_limit)
    if not out.exists():
        raise SystemExit(f"bench_minimal: the {kind} client wrote no report (exit {code}); its output is above.")
    report = json.loads(out.read_text())
    lat = report["latency_ms"]
    row = {"tool": kind, "exit": code, "wall_s": wall, "workload_s": report["duration_s"], "cpu_s": cpu,
           "fingerprint": report["plan_fingerprint"],
           **{f"{m}_{p}": lat[m][p] for m in ("connect", "agent_startup", "response") for p in ("p50", "p95")}}
    if kind == "partywall":
        overhead = report.get("measurement_overhead_ms") or {}
        client = report.get("client") or {}
        row.update(overhead_p50=overhead.get("p50"), overhead_p95=overhead.get("p95"),
                   client_cpu_mean=client.get("cpu_percent_mean"), client_cpu_peak=client.get("cpu_percent_peak"))
    return row


def cmd_compare(ns: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="partywall-minimal-") as tmp:
        for r in range(ns.rounds):
            order = ("minimal", "partywall") if r % 2 == 0 else ("partywall", "minimal")
            for kind in order:
                row = _one(kind, ns, Path(tmp) / f"r{r}")
                row["round"] = r
                rows.append(row)
                print(f"round {r + 1}/{ns.rounds} {kind:<9} exit {row['exit']} wall {row['wall_s']:.2f} s "
                      f"workload {row['workload_s']:.2f} s cpu {row['cpu_s']:.2f} s", file=sys.stderr)
    if len({r["fingerprint"] for r in rows}) != 1:
        print("the two tools ran different plans; this comparison means nothing", file=sys.stderr)
        return 2
    keys = ["wall_s", "workload_s", "cpu_s", "connect_p50", "connect_p95", "agent_startup_p50",
            "agent_startup_p95", "response_p50", "response_p95"]
    med = {kind: {k: statistics.median(r[k] for r in rows if r["tool"] == kind) for k in keys}
           for kind in ("minimal", "partywall")}
    print(f"\n{ns.users} users, seed {ns.seed}, {ns.rounds} rounds each, medians; plan {rows[0]['fingerprint'][:12]}")
    print(f"{'':<22}{'minimal':>12}{'partywall':>12}{'difference':>12}")
    labels = {"wall_s": "whole command (s)", "workload_s": "workload phase (s)", "cpu_s": "client CPU (s)"}
    for k in keys:
        a, b = med["minimal"][k], med["partywall"][k]
        label = labels.get(k, k.replace("_p", " p") + " (ms)")
        print(f"{label:<22}{a:>12.2f}{b:>12.2f}{b - a:>+12.2f}")
    # The added start-up, round by round (each round's two tools ran back to back on identical servers).
    by_round = {(r["round"], r["tool"]): r for r in rows}
    added = {p: [by_round[(i, "partywall")][f"agent_startup_{p}"] - by_round[(i, "minimal")][f"agent_startup_{p}"]
                 for i in range(ns.rounds)] for p in ("p50", "p95")}
    added_med = {p: statistics.median(v) for p, v in added.items()}
    print(f"\npartywall's added agent start-up, median of the rounds: p50 {added_med['p50']:+.2f} ms "
          f"(target {TARGET_ADDED_MS['p50']:g}), p95 {added_med['p95']:+.2f} ms (target {TARGET_ADDED_MS['p95']:g}); "
          f"rounds p50 {', '.join(f'{x:+.1f}' for x in added['p50'])}, p95 {', '.join(f'{x:+.1f}' for x in added['p95'])}")
    pw = [r for r in rows if r["tool"] == "partywall"]
    if all(r.get("overhead_p50") is not None for r in pw):
        print(f"partywall's measurement_overhead_ms (client start-up less the server's own): p50 "
              f"{statistics.median(r['overhead_p50'] for r in pw):.2f}, "
              f"p95 {statistics.median(r['overhead_p95'] for r in pw):.2f}")
    saturated = [r for r in pw if (r.get("client_cpu_mean") or 0.0) > SATURATED_CPU_PERCENT]
    for r in saturated:
        print(f"warning: round {r['round'] + 1}: partywall's own process used {r['client_cpu_mean']:.0f} % of a core "
              f"on average during the workload (over {SATURATED_CPU_PERCENT:g} %): its latencies include its own queue")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"users": ns.users, "seed": ns.seed, "rounds": rows, "median": med,
                                             "added_agent_startup_ms": added_med,
                                             "client_saturated_rounds": [r["round"] for r in saturated]},
                                            indent=2) + "\n")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("client", help="the minimal client alone")
    c.add_argument("--url", required=True)
    c.add_argument("--secret", required=True)
    c.add_argument("--json", required=True)
    for q in (p, c):
        q.add_argument("--users", type=int, default=100)
        q.add_argument("--seed", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-args", default="--startup-ms 0:0 --chunks 4 --chunk-delay-ms 0:0",
                   help="the reference servers' options (default: no agent delay)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds each child may take")
    p.add_argument("--json", help="write the rounds and medians here")
    ns = p.parse_args()
    return cmd_client(ns) if ns.cmd == "client" else cmd_compare(ns)


if __name__ == "__main__":
    sys.exit(main())
