"""What PROTOCOL.md asks of clients, which the suite is: recorded frames fed to the adapter and the checks.

Rules: no sockets. Each test is a clause of PROTOCOL.md about clients
(docs/coverage.md, rows C1-C3): the v1 adapter parses what a server may
send, and the checks stay silent on it, or flag what the clause forbids.
"""

from __future__ import annotations

import json

from partywall.adapter import Adapter
from partywall.driver import MAX_FRAME
from tests.suite.test_invariants import Sim


def test_client_accepts_a_16_mib_frame() -> None:
    assert MAX_FRAME >= 16 * 1024 * 1024  # what the driver lets trio-websocket assemble
    s = Sim()
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1")
    s.turn("c0", "r1", "T1", "x" * 16_000, "m1", "m2")
    big = {"type": "history", "re": "r2", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": "x" * 16_000, "created_at": 1764000001.0},
        {"message_id": "m2", "role": "assistant", "content": "echo: " + "x" * 16_000, "created_at": 1764000001.1}]
        + [{"message_id": f"old{i}", "role": r, "user": "alice", "content": "y" * 16_000, "created_at": 1764000000.5}
           for i, r in zip(range(1050), ["user", "assistant"] * 525, strict=True)]}
    raw = json.dumps(big)
    assert len(raw.encode()) >= 16 * 1024 * 1024
    assert Adapter().decode(raw).problems == ()
    s.request("c0", "r2", "get_history", thread_id="T1", limit=1052)
    s.ev("frame", "history", "c0", "r2", frame=raw)
    assert [c for _, c, _ in s.by_check()] == []


def test_client_ignores_unknown_fields() -> None:
    s = Sim()
    s.connect("c0", "acme", welcome={"region": "eu-west", "features": ["x"]})
    s.request("c0", "r1", "ping")
    s.reply("c0", "r1", {"type": "pong", "server_time": 1764000002.0, "load": 0.3}, final="ok")
    assert s.found() == []


def test_client_requires_numbers_for_times() -> None:
    problems = Adapter().decode(json.dumps({"type": "pong", "re": "r1", "server_time": "2026-12-01T00:00:00Z"})).problems
    assert problems and "server_time" in problems[0]
    item = {"message_id": "m1", "role": "assistant", "content": "c", "created_at": "yesterday"}
    problems = Adapter().decode(json.dumps({"type": "history", "re": "r1", "thread_id": "T", "messages": [item]})).problems
    assert problems and "created_at" in problems[0]
