#!/usr/bin/env python3
"""Load benchmark of the reference agent server (run by hand or nightly, not in .ci/run).

Starts `python -m partywall_agentserver` with zero delays on a fresh database and
drives it with a load client, then prints one summary (and, with --json, a
JSON object). Bounded: every run stops by itself after --time-limit seconds.

Modes:

* turns (default): --users users (default 100), spread over --tenants
  tenants, each on its own connection starts an agent and then does --turns
  turns (default 20) one after another. Reports turns per second end to end
  (all turns over the wall time of the turn phase), p50/p95/max turn latency
  (user_message sent -> agent_response received), connections held, and the
  server's RSS (psutil, by the server's pid).
* --connections N: holds N connections open at once (default mode uses
  --users), each starting an agent and exchanging --messages messages; every
  one must be answered.

The load generator is the asyncio `websockets` client, not trio-websocket:
on this 2-core machine the client shares the CPU with the server, and the
faster client library leaves more of it to the server being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import jwt
import psutil
from websockets.asyncio.client import ClientConnection, connect


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Results:
    latencies_ms: list[float] = field(default_factory=list)
    startup_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    answered: int = 0
    connected: int = 0
    held_peak: int = 0
    held_now: int = 0


class Server:
    def __init__(self, db: str, secret: str, extra: list[str]) -> None:
        cmd = [
            sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db", db, "--secret", secret,
            "--startup-ms", "0:0", "--chunk-delay-ms", "0:0", "--chunks", "4", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise SystemExit(f"server did not start (got {line!r})")
        self.url = line.removeprefix("listening on ")
        self.ps = psutil.Process(self.proc.pid)
        self.rss_peak = 0

    def rss(self) -> int:
        rss = self.ps.memory_info().rss
        self.rss_peak = max(self.rss_peak, rss)
        return rss

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def token(secret: str, tenant: str, user: str) -> str:
    return jwt.encode({"tid": tenant, "sub": user, "exp": time.time() + 3600}, secret, "HS256")


async def recv_until(ws: ClientConnection, re: str, final: str) -> dict:
    """Frames up to the one of type `final` for request `re` (errors fail)."""
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("re") != re:
            continue
        if frame["type"] == "error":
            raise RuntimeError(f"error reply: {frame}")
        if frame["type"] == final:
            return frame


async def open_user(
    url: str, secret: str, tenant: str, user: str, res: Results
) -> ClientConnection:
    ws = await connect(
        url,
        additional_headers={"Authorization": "Bearer " + token(secret, tenant, user)},
        max_size=16 * 2**20,
        ping_interval=None,
        compression=None,
    )
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome
    res.connected += 1
    res.held_now += 1
    res.held_peak = max(res.held_peak, res.held_now)
    return ws


async def start_agent(ws: ClientConnection, res: Results) -> str:
    began = time.perf_counter()
    await ws.send(json.dumps({"type": "start_agent", "id": "s", "assistant": "bench"}))
    started = await recv_until(ws, "s", "agent_started")
    res.startup_ms.append((time.perf_counter() - began) * 1000)
    return started["thread_id"]


async def turn(ws: ClientConnection, thread_id: str, n: int, res: Results) -> None:
    content = f"turn {n} " + secrets.token_hex(8)
    began = time.perf_counter()
    await ws.send(
        json.dumps(
            {"type": "user_message", "id": f"m{n}", "thread_id": thread_id, "content": content}
        )
    )
    reply = await recv_until(ws, f"m{n}", "agent_response")
    res.latencies_ms.append((time.perf_counter() - began) * 1000)
    if reply["content"] != "echo: " + content:
        res.failures.append(f"wrong reply {reply['content']!r}")
    else:
        res.answered += 1


async def user_session(
    url: str, secret: str, tenant: str, user: str, turns: int, ready: asyncio.Barrier, res: Results
) -> None:
    ws = await open_user(url, secret, tenant, user, res)
    try:
        thread_id = await start_agent(ws, res)
        await ready.wait()
        for n in range(turns):
            await turn(ws, thread_id, n, res)
    finally:
        await ws.close()
        res.held_now -= 1


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_turns(server: Server, args: argparse.Namespace, secret: str) -> dict:
    res = Results()
    ready = asyncio.Barrier(args.users + 1)
    tasks = [
        asyncio.create_task(
            user_session(
                server.url,
                secret,
                f"tenant-{i % args.tenants}",
                f"user-{i}",
                args.turns,
                ready,
                res,
            )
        )
        for i in range(args.users)
    ]
    await ready.wait()  # every user connected and has an agent
    held = res.held_now
    rss_before = server.rss()
    began = time.perf_counter()
    sampler = asyncio.create_task(sample_rss(server))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - began
    sampler.cancel()
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors:
        res.failures.append(repr(err))
    total = len(res.latencies_ms)
    return {
        "mode": "turns",
        "users": args.users,
        "tenants": args.tenants,
        "turns_per_user": args.turns,
        "turns": total,
        "answered": res.answered,
        "failures": len(res.failures),
        "failure_examples": res.failures[:3],
        "connections_held": held,
        "elapsed_s": round(elapsed, 3),
        "turns_per_s": round(total / elapsed, 1) if elapsed else None,
        "turn_ms": {
            "p50": round(pct(res.latencies_ms, 0.50), 2),
            "p95": round(pct(res.latencies_ms, 0.95), 2),
            "max": round(max(res.latencies_ms, default=float("nan")), 2),
            "mean": round(statistics.fmean(res.latencies_ms), 2) if res.latencies_ms else None,
        },
        "server_rss_mib": {
            "before_turns": round(rss_before / 2**20, 1),
            "peak": round(server.rss_peak / 2**20, 1),
        },
    }


async def sample_rss(server: Server) -> None:
    while True:
        server.rss()
        await asyncio.sleep(0.2)


async def hold_connection(
    url: str, secret: str, i: int, args: argparse.Namespace, all_open: asyncio.Event, res: Results
) -> None:
    ws = await open_user(url, secret, f"tenant-{i % args.tenants}", f"user-{i}", res)
    try:
        if res.held_now >= args.connections:
            all_open.set()
        await all_open.wait()  # every connection is open before any turn starts
        thread_id = await start_agent(ws, res)
        for n in range(args.messages):
            await turn(ws, thread_id, n, res)
    finally:
        await ws.close()
        res.held_now -= 1


async def run_connections(server: Server, args: argparse.Namespace, secret: str) -> dict:
    res = Results()
    all_open = asyncio.Event()
    began = time.perf_counter()
    sampler = asyncio.create_task(sample_rss(server))
    tasks = []
    for i in range(args.connections):
        tasks.append(
            asyncio.create_task(hold_connection(server.url, secret, i, args, all_open, res))
        )
        if i % 50 == 49:
            # Let the accept queue drain instead of a 1,000-SYN burst.
            await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - began
    sampler.cancel()
    for r in results:
        if isinstance(r, BaseException):
            res.failures.append(repr(r))
    expected = args.connections * args.messages
    return {
        "mode": "connections",
        "connections": args.connections,
        "connected": res.connected,
        "connections_held_peak": res.held_peak,
        "agents_started": len(res.startup_ms),
        "messages": expected,
        "answered": res.answered,
        "all_answered": res.answered == expected and not res.failures,
        "failures": len(res.failures),
        "failure_examples": res.failures[:3],
        "elapsed_s": round(elapsed, 3),
        "start_agent_ms": {
            "p50": round(pct(res.startup_ms, 0.5), 2),
            "p95": round(pct(res.startup_ms, 0.95), 2),
        },
        "turn_ms": {
            "p50": round(pct(res.latencies_ms, 0.5), 2),
            "p95": round(pct(res.latencies_ms, 0.95), 2),
        },
        "server_rss_mib": {"peak": round(server.rss_peak / 2**20, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--turns", type=int, default=20, help="turns per user, one after another")
    parser.add_argument("--connections", type=int, default=0, help="hold this many connections")
    parser.add_argument("--messages", type=int, default=2, help="messages per held connection")
    parser.add_argument("--time-limit", type=float, default=180.0, help="seconds before giving up")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server option")
    args = parser.parse_args(argv)
    nofile = raise_open_files_limit()
    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="agentserver-bench-") as tmp:
        server = Server(os.path.join(tmp, "bench.db"), secret, args.server_arg)
        try:
            scenario = run_connections if args.connections else run_turns
            try:
                result = asyncio.run(
                    asyncio.wait_for(scenario(server, args, secret), args.time_limit)
                )
            except TimeoutError:
                print(f"benchmark did not finish in {args.time_limit} s", file=sys.stderr)
                return 1
        finally:
            status = server.stop()
    result["client"] = "websockets (asyncio) " + __import__("websockets").__version__
    result["client_open_files_limit"] = nofile
    result["server_exit_status"] = status
    result["cpus"] = os.cpu_count()
    print_summary(result)
    if args.json:
        print(json.dumps(result))
    ok = not result["failures"] and status == 0
    return 0 if ok else 1


def print_summary(r: dict) -> None:
    print(f"client: {r['client']} (load generator; trio-websocket would itself be a bottleneck)")
    if r["mode"] == "turns":
        print(
            f"{r['users']} users x {r['turns_per_user']} turns over {r['tenants']} tenants: "
            f"{r['turns']} turns in {r['elapsed_s']} s = {r['turns_per_s']} turns/s; "
            f"turn latency p50 {r['turn_ms']['p50']} ms, p95 {r['turn_ms']['p95']} ms, "
            f"max {r['turn_ms']['max']} ms; connections held {r['connections_held']}; "
            f"server RSS peak {r['server_rss_mib']['peak']} MiB; failures {r['failures']}"
        )
    else:
        print(
            f"{r['connections']} connections: {r['connected']} connected, "
            f"peak held {r['connections_held_peak']}, {r['agents_started']} agents started, "
            f"{r['answered']}/{r['messages']} messages answered in {r['elapsed_s']} s; "
            f"start_agent p50 {r['start_agent_ms']['p50']} ms p95 {r['start_agent_ms']['p95']} ms; "
            f"turn p50 {r['turn_ms']['p50']} ms p95 {r['turn_ms']['p95']} ms; "
            f"server RSS peak {r['server_rss_mib']['peak']} MiB; failures {r['failures']}"
        )
    for example in r.get("failure_examples", []):
        print(f"  failure: {example}")


if __name__ == "__main__":
    sys.exit(main())
