"""Each invariant on small recorded histories: silent on a correct one, loud on a broken one.

Rules: no sockets here. A `Sim` appends events to a real `History` and feeds
them, with frames parsed by the real adapter, to the real `Checker` with the
real model and invariants, exactly as the driver does during a run. Each
broken history is the smallest one that shows the bug; the generated suite
finding the same bugs in a real server is `test_fault_proofs.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from partywall_props.invariants import INVARIANTS, percentile_violations
from partywall_props.model import Model

from partywall.adapter import Adapter, Semantics
from partywall.checks import Checker
from partywall.history import History

M1 = "PWMabcdef0000001Z"
M2 = "PWMabcdef0000002Z"


class Sim:
    def __init__(self, limits: dict[str, Any] | None = None, adapter: Adapter | None = None,
                 readable_ids: bool = True) -> None:
        self.history = History()
        self.adapter = adapter if adapter is not None else Adapter()
        self.model = Model(limits=limits, adapter=self.adapter)
        checks = INVARIANTS.select()
        if readable_ids:
            # These histories name ids for their reader (m1, m2, T1, cid-c0): counters, which
            # ids_are_opaque rightly flags. Its own tests use random ids and keep it on.
            checks = [c for c in checks if c.fn.__name__ != "ids_are_opaque"]
        self.checker = Checker(self.model, checks, self.history)
        self.t = 0.0

    def ev(self, kind: str, op: str, conn: str | None = None, req_id: str | None = None,
           data: dict[str, Any] | None = None, frame: dict[str, Any] | str | None = None, dt: float = 0.01) -> None:
        self.t += dt
        raw = frame if isinstance(frame, str) or frame is None else json.dumps(frame)
        parsed = self.adapter.decode(raw) if raw is not None else None
        event = self.history.append(kind, op, t=self.t, conn=conn, req_id=req_id, data=data or {}, raw=raw)
        self.checker(event, parsed)

    def connect(self, conn: str, tenant: str, user: str = "alice", token_kind: str = "valid",
                welcome: dict[str, Any] | None = None) -> None:
        """Open ``conn`` with a token for ``tenant``/``user``; ``welcome`` overrides fields of the server's welcome."""
        self.ev("invoke", "connect", conn, data={"tenant": tenant, "user": user, "via": "header", "token_kind": token_kind})
        welcome = {"type": "welcome", "protocol": 1, "tenant": tenant, "user": user, "connection_id": f"cid-{conn}",
                   "server_time": 1764000001.0, **(welcome or {})}
        self.ev("frame", "welcome", conn, frame=welcome)
        self.ev("ok", "connect", conn, data={"welcome": welcome, "latency_ms": 1.0})

    def request(self, conn: str, rid: str, rtype: str, **fields: Any) -> None:
        self.ev("invoke", rtype, conn, rid, data=fields)

    def reply(self, conn: str, rid: str | None, frame: dict[str, Any], final: str | None = None, latency_ms: float = 5.0) -> None:
        if rid is not None:
            frame = {**frame, "re": rid}
        self.ev("frame", frame["type"], conn, rid, frame=frame)
        if final is not None:
            self.ev(final, "request", conn, rid, data={"latency_ms": latency_ms}, frame=frame)

    def start(self, conn: str, rid: str, thread: str, assistant_id: str = "as1") -> None:
        self.request(conn, rid, "start_agent", assistant="helper")
        self.reply(conn, rid, {"type": "agent_started", "agent_id": "ag-" + thread, "assistant_id": assistant_id,
                               "thread_id": thread, "startup_ms": 50.0})
        self.ev("ok", "start_agent", conn, rid, data={"latency_ms": 60.0})

    def turn(self, conn: str, rid: str, thread: str, content: str, mid: str, rmid: str, chunks: list[str] | None = None) -> None:
        self.request(conn, rid, "user_message", thread_id=thread, content=content)
        self.reply(conn, rid, {"type": "ack", "thread_id": thread, "message_id": mid})
        reply = "echo: " + content
        parts = chunks if chunks is not None else [reply[:6], reply[6:]]
        for i, part in enumerate(parts):
            self.reply(conn, rid, {"type": "agent_chunk", "thread_id": thread, "seq": i, "delta": part})
        self.reply(conn, rid, {"type": "agent_response", "thread_id": thread, "message_id": rmid, "content": reply})
        self.ev("ok", "user_message", conn, rid, data={"latency_ms": 80.0})

    def found(self) -> list[tuple[str, str]]:
        return [(f.violation.invariant, f.violation.title) for f in self.checker.found]

    def names(self) -> set[str]:
        return {f.violation.invariant for f in self.checker.found}

    def by_check(self) -> list[tuple[str, str | None, str]]:
        """(invariant, check, title) of each violation found, in order."""
        return [(f.violation.invariant, f.violation.check, f.violation.title) for f in self.checker.found]


def two_tenants_with_a_turn() -> Sim:
    s = Sim()
    s.connect("c0", "acme")
    s.connect("c1", "globex")
    s.start("c0", "r0", "T1")
    s.turn("c0", "r1", "T1", f"{M1} hello", "m1", "m2")
    return s


def test_invariants_silent_on_a_correct_history() -> None:
    s = two_tenants_with_a_turn()
    s.request("c0", "r2", "get_history", thread_id="T1")
    s.reply("c0", "r2", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": f"{M1} hello", "created_at": 1764000001.0},
        {"message_id": "m2", "role": "assistant", "content": f"echo: {M1} hello", "created_at": 1764000001.1}]}, final="ok")
    s.ev("info", "probe", "c1", data={"foreign": "p1", "absent": "p2", "request": "get_history", "thread": "th0", "owner_tenant": "acme"})
    not_found = {"type": "error", "code": "not_found", "message": "No thread with that id exists for this tenant."}
    s.request("c1", "p1", "get_history", thread_id="T1")
    s.request("c1", "p2", "get_history", thread_id="Zzzz")
    s.reply("c1", "p1", not_found, final="fail")
    s.reply("c1", "p2", not_found, final="fail")
    assert s.found() == []


def test_isolation_foreign_marker_and_id() -> None:
    s = two_tenants_with_a_turn()
    s.reply("c1", None, {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user",
                         "user": "alice", "content": f"{M1} hello"})
    titles = [t for n, t in s.found() if n == "isolation"]
    assert any("marker" in t for t in titles) and any("thread_id" in t for t in titles)


def test_isolation_unknown_user_and_refused_token() -> None:
    s = Sim()
    s.connect("c0", "acme", "alice")
    s.connect("c1", "globex", "bob", token_kind="expired")
    s.request("c0", "r1", "get_history", thread_id="T9")
    s.reply("c0", "r1", {"type": "history", "thread_id": "T9", "messages": [
        {"message_id": "x", "role": "user", "user": "mallory", "content": "", "created_at": 1764000001.0}]})
    titles = [t for n, t in s.found() if n == "isolation"]
    assert any("must be refused" in t for t in titles)
    assert any("'mallory'" in t for t in titles)


def refusals(*attempts: tuple[str, int, str]) -> Sim:
    """Handshakes of (token kind, HTTP status, body), each refused."""
    s = Sim()
    for i, (kind, status, body) in enumerate(attempts):
        s.ev("invoke", "connect", f"x{i}", data={"tenant": "acme", "user": "alice", "via": "header", "token_kind": kind})
        s.ev("fail", "connect", f"x{i}", data={"status": status, "body": body, "latency_ms": 1.0})
    return s


def test_protocol_refusals_are_404_for_a_path_then_401_with_an_empty_body() -> None:
    assert refusals(("other_path", 404, ""), ("other_path:wrong_key", 404, "not here"), ("expired", 401, ""),
                    ("valid", 503, "")).by_check() == []
    assert refusals(("other_path:wrong_key", 401, "")).by_check() == [
        ("protocol", "refused_as_specified", "a handshake on another path than the service's got HTTP 401, not 404 "
                                             "(the path is checked before the credential)")]
    assert refusals(("wrong_key", 403, "")).by_check() == [
        ("protocol", "refused_as_specified", "a credential that must be refused (wrong_key) got HTTP 403, not 401")]
    assert refusals(("expired", 401, "token expired")).by_check() == [
        ("protocol", "refused_as_specified", "a refused credential's HTTP 401 has a body (13 characters): it must be empty")]


def test_isolation_foreign_id_answered_differently_from_absent() -> None:
    s = two_tenants_with_a_turn()
    s.ev("info", "probe", "c1", data={"foreign": "p1", "absent": "p2", "request": "join_thread", "thread": "th0", "owner_tenant": "acme"})
    s.request("c1", "p1", "join_thread", thread_id="T1")
    s.request("c1", "p2", "join_thread", thread_id="Zzzz")
    s.reply("c1", "p2", {"type": "error", "code": "not_found", "message": "No such thread."}, final="fail")
    s.reply("c1", "p1", {"type": "error", "code": "not_found", "message": "Thread belongs to another tenant."}, final="fail")
    assert any("differently" in t for n, t in s.found() if n == "isolation")


def bob_watches_t1() -> Sim:
    """alice (c0) starts T1 in acme, and bob (c1, acme) joins it."""
    s = Sim()
    s.connect("c0", "acme")
    s.connect("c1", "acme", "bob")
    s.start("c0", "r0", "T1")
    s.request("c1", "r1", "join_thread", thread_id="T1")
    s.reply("c1", "r1", {"type": "joined", "thread_id": "T1"}, final="ok")
    return s


def test_routing_fanout_after_leave_and_stray_re() -> None:
    s = bob_watches_t1()
    s.request("c1", "r2", "leave_thread", thread_id="T1")
    s.reply("c1", "r2", {"type": "left", "thread_id": "T1"}, final="ok")
    s.reply("c1", None, {"type": "agent_chunk", "thread_id": "T1", "seq": 0, "delta": "echo"})
    s.reply("c1", "r0", {"type": "pong", "server_time": 1764000001.0})
    titles = [t for n, t in s.found() if n == "routing"]
    assert any("has left" in t for t in titles) and any("reached c1" in t for t in titles)


@pytest.mark.parametrize("fanout_first", [True, False])
def test_routing_requester_never_gets_a_copy_of_its_own_turn(fanout_first: bool) -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1")
    copy = {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user", "user": "alice",
            "content": f"{M1} hi"}
    if fanout_first:
        s.request("c0", "r1", "user_message", thread_id="T1", content=f"{M1} hi")
        s.reply("c0", None, copy)
        s.reply("c0", "r1", {"type": "ack", "thread_id": "T1", "message_id": "m1"})
    else:
        s.turn("c0", "r1", "T1", f"{M1} hi", "m1", "m2")
        s.reply("c0", None, copy)
    assert ("routing", "no_copy_to_requester", "the requester received a fan-out copy of its own turn "
            + ("(ack)" if fanout_first else "(thread_message)")) in s.by_check()


class PrivateThreads(Adapter):
    """Threads private to their user, fan-out to the owner's other connections (multi-device sync)."""

    operations = frozenset({"start_agent", "user_message", "get_history"})
    semantics = Semantics(thread_scope="user", fanout="owner")


def test_user_scoped_threads_owner_sync_is_silent_and_another_user_is_foreign() -> None:
    s = Sim(adapter=PrivateThreads())
    s.connect("c0", "acme", "alice")
    s.connect("c1", "acme", "bob")
    s.connect("c2", "acme", "alice")  # alice's second device
    s.start("c0", "r0", "T1")
    s.request("c0", "r1", "user_message", thread_id="T1", content=f"{M1} hi")
    s.reply("c0", "r1", {"type": "ack", "thread_id": "T1", "message_id": "m1"})
    s.reply("c2", None, {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user",
                         "user": "alice", "content": f"{M1} hi"})
    assert s.found() == []  # the owner's other connection may have the sync copy
    assert s.model.accepts_for("c1", "get_history", {"thread_id": "T1"}) == {"not_found"}
    assert s.model.accepts_for("c2", "get_history", {"thread_id": "T1"}) == {"ok"}
    s.reply("c1", None, {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user",
                         "user": "alice", "content": f"{M1} hi"})
    found = s.by_check()
    assert ("routing", "fanout_to_members", "thread_message of a thread reached a connection that is not its owner's") in found
    assert ("isolation", "no_foreign_data", "user 'alice' of tenant 'acme''s marker reached a connection of "
            "user 'bob' of tenant 'acme'") in found


def test_user_scoped_threads_owe_the_turn_to_the_owners_other_devices() -> None:
    s = Sim(adapter=PrivateThreads())
    s.connect("c0", "acme", "alice")
    s.connect("c1", "acme", "bob")
    s.connect("c2", "acme", "alice")  # alice's second device, open before her message
    s.start("c0", "r0", "T1")
    s.turn("c0", "u1", "T1", "hi", "m1", "m2")
    s.connect("c3", "acme", "alice")  # opened after it: nothing of that turn is owed to it
    assert owed(s) == [("c2", ("thread_message", "agent_response"))]
    s.reply("c2", None, {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user",
                         "user": "alice", "content": "hi"})
    s.reply("c2", None, {"type": "agent_chunk", "thread_id": "T1", "seq": 0, "delta": "echo: hi"})
    s.reply("c2", None, {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": "echo: hi"})
    assert owed(s) == [] and s.by_check() == []


def test_durability_missing_and_changed_messages() -> None:
    s = two_tenants_with_a_turn()
    s.request("c0", "r2", "get_history", thread_id="T1")
    s.reply("c0", "r2", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": "changed", "created_at": 1764000001.0}]})
    titles = [t for n, t in s.found() if n == "durability"]
    assert any("missing" in t for t in titles) and any("different" in t for t in titles)


def test_exactly_once_repeated_response_and_bad_assembly() -> None:
    s = two_tenants_with_a_turn()
    s.reply("c0", "r1", {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": "echo: x"})
    s.turn("c0", "r3", "T1", "again", "m3", "m4", chunks=["echo: ", "agai"])
    titles = [t for n, t in s.found() if n == "exactly-once"]
    assert any("second agent_response" in t for t in titles) and any("add up" in t for t in titles)


def test_exactly_once_chunk_gap() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1")
    s.request("c0", "r1", "user_message", thread_id="T1", content="a")
    s.reply("c0", "r1", {"type": "ack", "thread_id": "T1", "message_id": "m1"})
    s.reply("c0", "r1", {"type": "agent_chunk", "thread_id": "T1", "seq": 1, "delta": "echo: a"})
    s.reply("c0", "r1", {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": "echo: a"})
    assert any("missing" in t for n, t in s.found() if n == "exactly-once")


def test_ordering_two_users_in_a_row_and_reply_order() -> None:
    s = two_tenants_with_a_turn()
    s.turn("c0", "r3", "T1", "second", "m3", "m4")
    s.request("c0", "r4", "get_history", thread_id="T1")
    s.reply("c0", "r4", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": f"{M1} hello", "created_at": 1764000001.0},
        {"message_id": "m3", "role": "user", "user": "alice", "content": "second", "created_at": 1764000001.2},
        {"message_id": "m2", "role": "assistant", "content": f"echo: {M1} hello", "created_at": 1764000001.1},
        {"message_id": "m4", "role": "assistant", "content": "echo: second", "created_at": 1764000001.3}]})
    assert "ordering" in s.names()


def test_liveness_timeout_and_death() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.request("c0", "r1", "ping")
    s.ev("info", "timeout", "c0", "r1", data={"type": "ping", "waited_s": 10.1, "limit_s": 10.0})
    s.ev("info", "died", None, data={"reason": "exit 1"})
    assert [n for n, _ in s.found()] == ["liveness", "liveness"]


@pytest.mark.parametrize("queued", [True, False])
def test_timing_a_queued_message_is_timed_from_when_its_turn_could_begin(queued: bool) -> None:
    # alice sends two messages in a row to T1; the first turn takes 3 s, so the second is acked
    # only after it (the protocol's rule). Its own wait is what came after: 20 ms. Alone, the same
    # 3 s before its ack is all its own, over the 1 s limit.
    s = Sim(limits={"ack_ms": 1000})
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1")
    if queued:
        s.request("c0", "r1", "user_message", thread_id="T1", content=f"{M1} one")
    s.request("c0", "r2", "user_message", thread_id="T1", content=f"{M2} two")
    if queued:
        s.reply("c0", "r1", {"type": "ack", "thread_id": "T1", "message_id": "m1"})
        s.ev("frame", "agent_chunk", "c0", "r1", dt=3.0,
             frame={"type": "agent_chunk", "re": "r1", "thread_id": "T1", "seq": 0, "delta": f"echo: {M1} one"})
        s.reply("c0", "r1", {"type": "agent_response", "thread_id": "T1", "message_id": "m2",
                             "content": f"echo: {M1} one"})
        s.ev("ok", "user_message", "c0", "r1", data={"latency_ms": 3000.0})
    else:
        s.t += 3.0
    s.reply("c0", "r2", {"type": "ack", "thread_id": "T1", "message_id": "m3"})
    s.reply("c0", "r2", {"type": "agent_chunk", "thread_id": "T1", "seq": 0, "delta": f"echo: {M2} two"})
    s.reply("c0", "r2", {"type": "agent_response", "thread_id": "T1", "message_id": "m4", "content": f"echo: {M2} two"})
    s.ev("ok", "user_message", "c0", "r2", data={"latency_ms": 3050.0})
    found = [(check, title.split(" took")[0]) for _, check, title in s.by_check()]
    assert found == ([] if queued else [("within_limits", "ack")])


def test_timing_per_operation_and_percentiles() -> None:
    s = Sim(limits={"start_agent_ms": 100})
    s.connect("c0", "acme")
    s.request("c0", "r0", "start_agent", assistant="helper")
    s.reply("c0", "r0", {"type": "agent_started", "agent_id": "a", "assistant_id": "b", "thread_id": "T", "startup_ms": 1.0})
    s.ev("ok", "start_agent", "c0", "r0", data={"latency_ms": 250.0})
    assert any("250 ms, over the limit of 100" in t for n, t in s.found() if n == "timing")
    fast = {"start_agent": [10.0] * 19}
    assert percentile_violations(fast, {"start_agent_p95_ms": 5, "min_samples": 20}) == []  # too few samples to judge
    slow = {"start_agent": [10.0] * 18 + [900.0, 900.0]}
    (v,) = percentile_violations(slow, {"start_agent_p95_ms": 500, "min_samples": 20})
    assert v.evidence["actual_ms"] == 900.0 and v.evidence["n"] == 20


@pytest.mark.parametrize("message, leaks", [
    ("The frame is not valid JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 "
     "digits; use sys.set_int_max_str_digits() to increase the limit.", True),
    ("Traceback (most recent call last):\n  File \"/srv/app/handlers.py\", line 88, in on_frame", True),
    ("KeyError: 'thread_id'", True),
    ("The frame has a number too large to accept.", False),
    ("The frame is not valid JSON (at character 31).", False),
    ("Unknown request type 'subscribe_all_tenants'.", False),
])
def test_protocol_error_message_reveals_no_internals(message: str, leaks: bool) -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.request("c0", "r1", "get_history", thread_id="T9")
    s.reply("c0", "r1", {"type": "error", "code": "not_found", "message": message}, final="fail")
    found = [t for n, c, t in s.by_check() if c == "errors_say_no_internals"]
    assert bool(found) == leaks, found


@pytest.mark.parametrize("frame, says", [
    ('{"type": "pong", "re": "r1", "server_time": NaN}', "strict JSON"),
    ('{"type": "pong", "re": "r1"}', "server_time"),
    ('{"type": "error", "re": "r1", "code": "internal", "message": "boom"}', "internal"),
    ('{"type": "joined", "re": "r1", "thread_id": "T"}', "answered with 'joined'"),
    ('{"type": "teleport", "re": "r1"}', "unknown frame type"),
])
def test_protocol_schema_and_codes(frame: str, says: str) -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.request("c0", "r1", "ping")
    s.ev("frame", "x", "c0", "r1", frame=frame)
    assert any(says in t for n, t in s.found() if n == "protocol"), s.found()


def test_protocol_wrong_error_code_for_oversized_content() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1")
    s.request("c0", "r1", "user_message", thread_id="T1", content="x" * 16_385)
    s.ev("frame", "error", "c0", "r1", frame={"type": "error", "re": "r1", "code": "too_large", "message": "big"})
    s.ev("fail", "user_message", "c0", "r1", data={"latency_ms": 1.0},
         frame={"type": "error", "re": "r1", "code": "too_large", "message": "big"})
    assert any("bad_request" in t for n, t in s.found() if n == "protocol")


# -- one history per check no other test here depends on (test_check_mutations.py finds them) --------


def welcomed(welcome: dict[str, Any] | None) -> Sim:
    """Two tenants that both have an ``alice``; globex's welcome carries ``welcome``'s fields."""
    s = Sim()
    s.connect("c0", "acme", "alice")
    s.connect("c1", "globex", "alice", welcome=welcome)
    return s


@pytest.mark.parametrize("welcome", [{"tenant": "acme"}, {"user": "bob"}, {"tenant": "Globex"}],
                         ids=["other_tenant", "other_user", "tenant_case"])
def test_isolation_welcome_naming_another_identity(welcome: dict[str, Any]) -> None:
    s = welcomed(welcome)
    assert s.by_check() == [("isolation", "identity_as_token", "the welcome names another identity than the token")]
    (f,) = s.checker.found
    assert f.violation.evidence["token"] == {"tid": "globex", "sub": "alice"}
    assert f.violation.evidence["welcome"]["tenant"] == welcome.get("tenant", "globex")
    assert welcomed(None).by_check() == []


def listed(threads: list[str], t1_count: int = 2) -> Sim:
    """acme starts T1 and T2 and lists its threads (``threads`` listed, T1 counting ``t1_count``
    messages); globex, with none, lists its own."""
    s = two_tenants_with_a_turn()
    s.start("c0", "r2", "T2")
    counts = {"T1": t1_count, "T2": 0}
    s.request("c0", "r3", "list_threads")
    s.reply("c0", "r3", {"type": "threads", "threads": [
        {"thread_id": t, "assistant": "helper", "created_at": 1764000001.0, "message_count": counts[t]} for t in threads]}, final="ok")
    s.request("c1", "r4", "list_threads")
    s.reply("c1", "r4", {"type": "threads", "threads": []}, final="ok")
    return s


def test_durability_thread_missing_from_list_threads() -> None:
    s = listed(["T1"])
    assert s.by_check() == [("durability", "threads_kept", "a thread the tenant started is missing from list_threads")]
    assert s.checker.found[0].violation.evidence["thread_id"] == "T2"
    assert listed(["T1", "T2"]).by_check() == []


def test_durability_message_count_below_what_was_committed() -> None:
    # T1 holds a user message and its reply: counting only user messages says 1.
    assert listed(["T1", "T2"], t1_count=1).by_check() == [
        ("durability", "threads_kept", "list_threads counts 1 messages in a thread where 2 were committed "
         "(user messages and replies)")]
    assert listed(["T1", "T2"], t1_count=2).by_check() == []


def test_durability_message_count_above_what_was_sent() -> None:
    # One user message was sent to T1: with its reply that is two, and no more can be stored.
    assert listed(["T1", "T2"], t1_count=3).by_check() == [
        ("durability", "threads_kept", "list_threads counts 3 messages in a thread where 1 user message(s) were "
                                       "sent, so at most 2 with the replies")]


def test_durability_history_limit_returns_the_oldest() -> None:
    s = two_tenants_with_a_turn()
    s.turn("c0", "r2", "T1", "second", "m3", "m4")
    s.request("c0", "r3", "get_history", thread_id="T1", limit=2)
    s.reply("c0", "r3", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": f"{M1} hello", "created_at": 1764000001.0},
        {"message_id": "m2", "role": "assistant", "content": f"echo: {M1} hello", "created_at": 1764000001.1}]}, final="ok")
    assert s.by_check() == [("durability", "history_keeps_commits",
                             "history with limit 2 left out a newer message and returned an older one")]
    s = two_tenants_with_a_turn()
    s.turn("c0", "r2", "T1", "second", "m3", "m4")
    s.request("c0", "r3", "get_history", thread_id="T1", limit=2)
    s.reply("c0", "r3", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m3", "role": "user", "user": "alice", "content": "second", "created_at": 1764000001.2},
        {"message_id": "m4", "role": "assistant", "content": "echo: second", "created_at": 1764000001.3}]}, final="ok")
    assert s.by_check() == []


def test_durability_history_holds_another_threads_message() -> None:
    s = two_tenants_with_a_turn()
    s.start("c0", "r2", "T2")
    s.request("c0", "r3", "get_history", thread_id="T2")
    s.reply("c0", "r3", {"type": "history", "thread_id": "T2", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": f"{M1} hello", "created_at": 1764000001.0},
        {"message_id": "m2", "role": "assistant", "content": f"echo: {M1} hello", "created_at": 1764000001.1}]}, final="ok")
    assert s.by_check() == [("durability", "history_keeps_commits",
                             "the history of one thread holds a message of another thread")]


def test_durability_history_limit_returns_more_than_the_limit() -> None:
    s = two_tenants_with_a_turn()
    s.turn("c0", "r2", "T1", "second", "m3", "m4")
    s.request("c0", "r3", "get_history", thread_id="T1", limit=2)
    s.reply("c0", "r3", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m2", "role": "assistant", "content": f"echo: {M1} hello", "created_at": 1764000001.1},
        {"message_id": "m3", "role": "user", "user": "alice", "content": "second", "created_at": 1764000001.2},
        {"message_id": "m4", "role": "assistant", "content": "echo: second", "created_at": 1764000001.3}]}, final="ok")
    assert s.by_check() == [("durability", "history_keeps_commits",
                             "history with limit 2 returned 3 messages, more than the limit")]


def streamed(seqs: list[int]) -> Sim:
    """One turn whose three chunks arrive in the order ``seqs``, all of them, adding up to the reply."""
    s = Sim()
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1")
    s.request("c0", "r1", "user_message", thread_id="T1", content="ab")
    s.reply("c0", "r1", {"type": "ack", "thread_id": "T1", "message_id": "m1"})
    deltas = {0: "echo: ", 1: "a", 2: "b"}
    for seq in seqs:
        s.reply("c0", "r1", {"type": "agent_chunk", "thread_id": "T1", "seq": seq, "delta": deltas[seq]})
    s.reply("c0", "r1", {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": "echo: ab"})
    s.ev("ok", "user_message", "c0", "r1", data={"latency_ms": 80.0})
    return s


def test_ordering_chunk_arriving_after_a_later_seq() -> None:
    s = streamed([0, 2, 1])
    assert s.by_check() == [("ordering", "chunks_in_order", "chunk seq 1 arrived after seq 2")]
    assert streamed([0, 1, 2]).by_check() == []


def audited(answered: bool) -> Sim:
    """acme's second message is acked, then its connection closes mid-turn; an auditor reads the thread.

    The server must still store the reply (PROTOCOL.md: a started turn finishes). When it
    has not, the history ends with the user message and the audit notes it unanswered.
    """
    s = two_tenants_with_a_turn()
    s.request("c0", "r3", "user_message", thread_id="T1", content="second")
    s.reply("c0", "r3", {"type": "ack", "thread_id": "T1", "message_id": "m3"})
    s.ev("info", "closed", "c0", data={"reason": "closed by the suite", "code": None})
    s.ev("info", "user_message", "c0", "r3", data={"reason": "connection closed"})
    s.connect("a0", "acme", "auditor")
    s.request("a0", "r4", "get_history", thread_id="T1")
    messages = [
        {"message_id": "m1", "role": "user", "user": "alice", "content": f"{M1} hello", "created_at": 1764000001.0},
        {"message_id": "m2", "role": "assistant", "content": f"echo: {M1} hello", "created_at": 1764000001.1},
        {"message_id": "m3", "role": "user", "user": "alice", "content": "second", "created_at": 1764000001.2},
    ]
    if answered:
        messages.append({"message_id": "m4", "role": "assistant", "content": "echo: second", "created_at": 1764000001.3})
    s.reply("a0", "r4", {"type": "history", "thread_id": "T1", "messages": messages}, final="ok")
    if not answered:
        s.ev("info", "audit_unanswered", "a0", data={"thread_id": "T1", "message_id": "m3", "waited_s": 10.0})
    return s


def test_ordering_audit_finds_a_message_never_answered() -> None:
    s = audited(answered=False)
    assert s.by_check() == [("ordering", "chunks_in_order", "a stored user message has no reply after the run settled")]
    assert s.checker.found[0].violation.evidence["message_id"] == "m3"
    assert audited(answered=True).by_check() == []


def oversized(close_code: int) -> Sim:
    """c0 sends a frame over 64 KiB, gets too_large without re, and the server closes with ``close_code``."""
    s = Sim()
    s.connect("c0", "acme")
    s.ev("invoke", "raw", "c0", "r1", data={"note": "oversize", "size": 65_600, "readable": False, "expect": "too_large"})
    s.ev("frame", "error", "c0", frame={"type": "error", "code": "too_large", "message": "The message is over 64 KiB."})
    s.ev("info", "closed", "c0", data={"reason": f"closed by the server (code {close_code})", "code": close_code})
    return s


@pytest.mark.parametrize("close_code", [1000, 1011])
def test_protocol_oversize_closed_with_another_code(close_code: int) -> None:
    s = oversized(close_code)
    assert s.by_check() == [("protocol", "oversize_closes_1009",
                             f"after an oversized frame the server closed with {close_code}, not 1009")]
    assert oversized(1009).by_check() == []


def test_protocol_oversize_left_open() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.ev("invoke", "raw", "c0", "r1", data={"note": "oversize", "size": 65_600, "readable": False, "expect": "too_large"})
    s.ev("frame", "error", "c0", frame={"type": "error", "code": "too_large", "message": "The message is over 64 KiB."})
    s.ev("info", "not_closed", "c0", data={"waited_s": 10.2, "limit_s": 10.0})
    assert s.by_check() == [("protocol", "oversize_closes_1009",
                             "the server kept the connection open 10.2 s after an oversized frame; it must close it with 1009")]


@pytest.mark.parametrize("answered", [True, False])
def test_protocol_oversize_then_a_request_answered(answered: bool) -> None:
    # A ping sent right behind the oversized frame: the server closes after too_large, so a pong
    # shows at once that it went on serving the connection.
    s = Sim()
    s.connect("c0", "acme")
    s.request("c0", "r0", "ping")
    s.reply("c0", "r0", {"type": "pong", "server_time": 1764000001.0}, final="ok")  # before: fine
    s.ev("invoke", "raw", "c0", "r1", data={"note": "oversize", "size": 65_600, "readable": False, "expect": "too_large"})
    s.request("c0", "r2", "ping")
    s.ev("frame", "error", "c0", frame={"type": "error", "code": "too_large", "message": "The message is over 64 KiB."})
    if answered:
        s.reply("c0", "r2", {"type": "pong", "server_time": 1764000001.0}, final="ok")
    s.ev("info", "closed", "c0", data={"reason": "closed by the server (code 1009)", "code": 1009})
    assert s.by_check() == ([("protocol", "oversize_closes_1009",
                              "the server answered a ping sent after an oversized frame: after too_large it must "
                              "close the connection (1009), not go on serving it")] if answered else [])


def watched(seqs: list[int], leave_after: int | None = None, next_turn: bool = False) -> Sim:
    """c1 watches T1 (joined) while c0's turn streams its chunks to it as fan-out, in ``seqs`` order;
    with ``leave_after``, c1 leaves after that many chunks and joins again (and with ``next_turn``
    the chunks after that belong to the next turn, which opens with its thread_message)."""
    s = bob_watches_t1()
    s.request("c0", "u1", "user_message", thread_id="T1", content="hi")
    s.reply("c1", None, {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user",
                         "user": "alice", "content": "hi"})
    for n, seq in enumerate(seqs):
        if n == leave_after:
            s.request("c1", "l1", "leave_thread", thread_id="T1")
            s.reply("c1", "l1", {"type": "left", "thread_id": "T1"}, final="ok")
            s.request("c1", "j2", "join_thread", thread_id="T1")
            s.reply("c1", "j2", {"type": "joined", "thread_id": "T1"}, final="ok")
            if next_turn:
                s.request("c0", "u2", "user_message", thread_id="T1", content="again")
                s.reply("c1", None, {"type": "thread_message", "thread_id": "T1", "message_id": "m3", "role": "user",
                                     "user": "alice", "content": "again"})
        s.reply("c1", None, {"type": "agent_chunk", "thread_id": "T1", "seq": seq, "delta": f"d{seq}"})
    return s


def test_fanout_chunks_out_of_order_or_repeated() -> None:
    assert watched([0, 1, 2]).by_check() == []
    assert watched([0, 2, 1]).by_check() == [("ordering", "chunks_in_order", "fan-out chunk seq 1 arrived after seq 2")]
    assert watched([0, 1, 0]).by_check() == [("exactly-once", "one_complete_reply", "fan-out chunk seq 0 was delivered twice")]
    # A watcher that leaves part-way and joins again starts over with the next turn.
    assert watched([0, 1, 0], leave_after=2, next_turn=True).by_check() == []


def test_routing_a_watcher_never_gets_part_of_a_turn() -> None:
    # Left and joined again while the turn streamed: the rest of that turn must not reach it.
    assert watched([0, 1, 2], leave_after=2).by_check() == [
        ("routing", "turn_whole_or_nothing", "a watcher received part of a turn (agent_chunk) without its start (no "
         "thread_message): it joined, or left and joined again, while the turn streamed")]


def copies_owed(copy: tuple[str, ...] = ("thread_message", "agent_chunk", "agent_response"),
                before: Callable[[Sim], None] | None = None) -> Sim:
    """bob (c1) watches T1 while alice (c0) has a turn answered; c1 receives the fan-out frames
    named in ``copy``; ``before`` runs just before alice sends her message."""
    s = bob_watches_t1()
    if before is not None:
        before(s)
    s.turn("c0", "u1", "T1", "hi", "m1", "m2")
    fanout = {"thread_message": {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user",
                                 "user": "alice", "content": "hi"},
              "agent_chunk": {"type": "agent_chunk", "thread_id": "T1", "seq": 0, "delta": "echo: hi"},
              "agent_response": {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": "echo: hi"}}
    for kind in copy:
        s.reply("c1", None, fanout[kind])
    return s


def owed(s: Sim) -> list[tuple[str, tuple[str, ...]]]:
    return [(o.conn, o.missing) for o in s.model.owed_copies()]


def test_routing_a_watcher_gets_every_turn() -> None:
    assert owed(copies_owed()) == []
    s = copies_owed(copy=("thread_message",))
    assert owed(s) == [("c1", ("agent_response",))]
    s = copies_owed(copy=())
    assert owed(s) == [("c1", ("thread_message", "agent_response"))]
    # Due the requester's own reply plus timing.fanout_lag_ms (1 s unless set).
    assert s.model.owed_copies()[0].due == s.model.reqs["u1"].response_t + 1.0
    assert s.by_check() == []  # owed, not yet missing: the machine notes a copy once it is late
    s.ev("info", "copy_missing", "c1", data={"request": "u1", "missing": ["thread_message", "agent_response"]})
    assert s.by_check() == [("routing", "fanout_reaches_members",
                             "a turn of a thread never reached c1, which had joined it before the message was sent "
                             "and has not left since (missing: thread_message, agent_response)")]
    assert owed(s) == []  # reported once


def test_routing_no_copy_owed_where_timing_makes_it_optional() -> None:
    # Asked to leave before the message went (answered or not): the server may have acted on it first.
    def leaving(s: Sim) -> None:
        s.request("c1", "l1", "leave_thread", thread_id="T1")
    assert owed(copies_owed(copy=(), before=leaving)) == []

    # Joined by an answer that came after the message was sent: it may have joined mid-turn.
    def late_join(s: Sim) -> None:
        s.connect("c2", "acme", "carol")
        s.request("c2", "j2", "join_thread", thread_id="T1")
    s = copies_owed(copy=(), before=late_join)
    s.reply("c2", "j2", {"type": "joined", "thread_id": "T1"}, final="ok")
    assert owed(s) == [("c1", ("thread_message", "agent_response"))]

    # Joined again while joined, answered after the message went: a server may take that as a
    # fresh join, from its next turn on.
    def join_again(s: Sim) -> None:
        s.request("c1", "j3", "join_thread", thread_id="T1")
    s = copies_owed(copy=(), before=join_again)
    assert owed(s) == []
    s.reply("c1", "j3", {"type": "joined", "thread_id": "T1"}, final="ok")
    assert owed(s) == []
    s.turn("c0", "u2", "T1", "again", "m3", "m4")
    assert owed(s) == [("c1", ("thread_message", "agent_response"))]  # the turn after the answer

    # Closed since: nothing is owed to a connection that is gone.
    s = copies_owed(copy=())
    s.ev("info", "closed", "c1", data={"reason": "closed by the suite", "code": 1000})
    assert owed(s) == []


def hung_up(reason: str = "closed by the suite", reply: bool = False) -> Sim:
    """bob (c1) watches T1; alice (c0) sends a message, gets its ack and hangs up (or the server
    closes her connection); bob gets the thread_message and, with ``reply``, the rest of the turn."""
    s = bob_watches_t1()
    s.request("c0", "u1", "user_message", thread_id="T1", content="bye")
    s.reply("c0", "u1", {"type": "ack", "thread_id": "T1", "message_id": "m1"})
    s.ev("info", "closed", "c0", data={"reason": reason, "code": 1000})
    s.reply("c1", None, {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user",
                         "user": "alice", "content": "bye"})
    if reply:
        s.reply("c1", None, {"type": "agent_chunk", "thread_id": "T1", "seq": 0, "delta": "echo: bye"})
        s.reply("c1", None, {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": "echo: bye"})
    return s


def read_back(s: Sim) -> Sim:
    """c1 reads T1's history, which shows alice's message m1 and its reply m2 stored."""
    s.request("c1", "h1", "get_history", thread_id="T1")
    s.reply("c1", "h1", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": "bye", "created_at": 1764000001.0},
        {"message_id": "m2", "role": "assistant", "content": "echo: bye", "created_at": 1764000001.1}]}, final="ok")
    return s


def test_routing_a_turn_whose_requester_hung_up_still_reaches_its_watchers() -> None:
    # The turn finishes all the same: once a history read shows its reply stored, its watchers
    # must have the rest of it within timing.fanout_lag_ms.
    s = hung_up()
    assert owed(s) == []  # still streaming, for all the suite knows
    read_back(s)
    assert owed(s) == [("c1", ("agent_response",))]
    assert s.model.owed_copies()[0].due == s.model.replies_stored["m1"] + 1.0
    assert owed(read_back(hung_up(reply=True))) == []
    # Closed by the server, not by the requester: whether the turn went on is not known.
    assert owed(read_back(hung_up(reason="closed by the server (code 1011)"))) == []


def test_liveness_a_malformed_frame_that_gets_no_error() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.ev("invoke", "raw", "c0", "r1", data={"note": "invalid_json", "size": 30, "readable": False, "expect": "bad_request"})
    assert s.by_check() == []
    # The driver's watchdog notes it once the reply limit has passed without the error.
    s.ev("info", "error_owed", "c0", data={"kind": "invalid_json", "request": "r1", "waited_s": 1.6, "limit_s": 1.5})
    assert s.by_check() == [("liveness", "answered_in_time", "a malformed frame (invalid_json) got no error within "
                                                             "1.5 s: each gets bad_request, the connection staying open")]


def test_exactly_once_a_watcher_copy_without_its_chunks() -> None:
    assert copies_owed().by_check() == []
    assert copies_owed(copy=("thread_message", "agent_response")).by_check() == [
        ("exactly-once", "one_complete_reply", "the chunks' deltas do not add up to the agent_response content")]


def test_protocol_oversize_closed_1009_without_the_error_first() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.ev("invoke", "raw", "c0", "r1", data={"note": "oversize_16mib", "size": 16 << 20, "readable": False, "expect": "too_large"})
    s.ev("info", "closed", "c0", data={"reason": "closed by the server (code 1009)", "code": 1009})
    assert s.by_check() == [("protocol", "oversize_closes_1009",
                             "after an oversized frame the server closed with 1009 without the too_large error first")]


def test_protocol_malformed_frame_answered_as_if_valid() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.ev("invoke", "raw", "c0", "r1", data={"note": "lone_surrogate", "size": 50, "readable": None, "expect": "bad_request"})
    s.reply("c0", "r1", {"type": "pong", "server_time": 1764000001.0})
    assert s.by_check() == [("protocol", "frames_match_schema",
                             "a malformed frame (lone_surrogate) was answered with 'pong', not an error")]


def test_protocol_two_connections_with_one_connection_id() -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.connect("c1", "acme")
    assert s.found() == []
    s.connect("c2", "acme", welcome={"connection_id": "cid-c0"})
    assert s.by_check() == [("protocol", "replies_as_predicted",
                             "two connections were welcomed with one connection_id: ids must be unique")]


def test_protocol_replies_as_predicted() -> None:
    # The same assistant name in one tenant: one assistant id; a new thread on every start.
    s = Sim()
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1", assistant_id="as1")
    s.start("c0", "r1", "T2", assistant_id="as1")
    assert s.found() == []
    s.start("c0", "r2", "T3", assistant_id="as9")
    s.start("c0", "r3", "T1", assistant_id="as1")
    checks = [(c, t) for _, c, t in s.by_check()]
    assert ("replies_as_predicted", "assistant 'helper' of one tenant was given two assistant ids: start_agent must "
            "find the tenant's assistant of that name") in checks
    assert ("replies_as_predicted", "start_agent answered with a thread the service had already opened, not a new one") in checks
    # An ack for another thread than the one written to, and a message id given twice.
    s = Sim()
    s.connect("c0", "acme")
    s.start("c0", "r0", "T1")
    s.start("c0", "r1", "T2")
    s.turn("c0", "r2", "T1", "one", "m1", "m2")
    s.request("c0", "r3", "user_message", thread_id="T1", content="two")
    s.reply("c0", "r3", {"type": "ack", "thread_id": "T2", "message_id": "m1"})
    assert [t for _, c, t in s.by_check() if c == "replies_as_predicted"] == [
        "a user_message request for one thread was answered with 'ack' of another",
        "ack names a message id the service gave before: ids must be unique"]


def test_durability_history_limit_one_returns_the_message_not_its_reply() -> None:
    s = two_tenants_with_a_turn()  # m1 and its reply m2, both known before the read
    s.request("c0", "r3", "get_history", thread_id="T1", limit=1)
    s.reply("c0", "r3", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": f"{M1} hello", "created_at": 1764000001.0}]}, final="ok")
    assert s.by_check() == [("durability", "history_keeps_commits",
                             "history with limit 1 left out a newer message and returned an older one")]


# -- checks of what the protocol says of ids, times, orders and closes ------------------


def test_isolation_ids_that_count_up() -> None:
    """Thread ids from a counter (thread-7, thread-8) are flagged on the second; random ids, and ids
    whose trailing numbers are far apart (time-based), are not."""

    def started(ids: list[str]) -> Sim:
        s = Sim(readable_ids=False)
        s.connect("c0", "acme", welcome={"connection_id": "Qx3v9KpLw2ZtR8mNc4Yh0A"})
        for i, thread in enumerate(ids):
            s.request("c0", f"r{i}", "start_agent", assistant="helper")
            s.reply("c0", f"r{i}", {"type": "agent_started", "agent_id": f"ag{thread}x", "assistant_id": "bV7nQ2xLp9RtK4mWz8Yc1A",
                                    "thread_id": thread, "startup_ms": 1.0})
        return s

    assert started(["thread-7", "thread-8"]).by_check() == [
        ("isolation", "ids_are_opaque", "thread_ids count up ('thread-7', then 'thread-8'): server ids must be opaque "
                                        "random strings, never counters")]
    assert started(["t0K9dQ2mZ81", "Lr5WbX3yT47"]).by_check() == []
    assert started(["th-1764000001123", "th-1764000009123"]).by_check() == []


def clocked(times: dict[str, float], skew_ms: float = 300_000) -> Sim:
    """c0 connects at Unix time 1,764,000,000 by the client's clock (recorded with its connect),
    starts T1, talks in it and reads its history and its thread list; ``times`` sets the server's
    ``server_time`` (welcome, pong) and ``created_at`` (message, thread) values."""
    s = Sim(limits={"clock_skew_ms": skew_ms})
    now = 1_764_000_000.0
    welcome = {"type": "welcome", "protocol": 1, "tenant": "acme", "user": "alice", "connection_id": "cid-c0",
               "server_time": times.get("welcome", now)}
    s.ev("invoke", "connect", "c0", data={"tenant": "acme", "user": "alice", "via": "header", "token_kind": "valid"})
    s.ev("frame", "welcome", "c0", frame=welcome)
    s.ev("ok", "connect", "c0", data={"welcome": welcome, "latency_ms": 1.0, "wall_s": now + s.t})
    s.start("c0", "r0", "T1")
    s.turn("c0", "r1", "T1", f"{M1} hello", "m1", "m2")
    s.request("c0", "r2", "get_history", thread_id="T1")
    s.reply("c0", "r2", {"type": "history", "thread_id": "T1", "messages": [
        {"message_id": "m1", "role": "user", "user": "alice", "content": f"{M1} hello", "created_at": times.get("message", now)},
        {"message_id": "m2", "role": "assistant", "content": f"echo: {M1} hello", "created_at": now}]}, final="ok")
    s.request("c0", "r3", "list_threads")
    s.reply("c0", "r3", {"type": "threads", "threads": [
        {"thread_id": "T1", "assistant": "helper", "created_at": times.get("thread", now), "message_count": 2}]}, final="ok")
    s.request("c0", "r4", "ping")
    s.reply("c0", "r4", {"type": "pong", "server_time": times.get("pong", now)}, final="ok")
    return s


@pytest.mark.parametrize(("field", "value", "says"), [
    ("message", 1_764_000_000_123.0, "created_at 1764000000123.0"),  # milliseconds
    ("thread", 86_400.5, "created_at 86400.5"),  # seconds since the server's boot
    ("pong", 1_764_000_000.0 - 3600, "server_time 1763996400.0"),  # an hour off: local time as UTC
    ("welcome", 1_764_000_000.0 + 3600, "server_time 1764003600.0"),
    ("message", 1_764_000_000.0 - 600, "created_at 1763999400.0"),  # before it was sent
])
def test_protocol_times_that_are_not_unix_seconds_now(field: str, value: float, says: str) -> None:
    found = clocked({field: value}).by_check()
    assert [(inv, check) for inv, check, _ in found] == [("protocol", "times_are_unix_seconds")]
    assert found[0][2].startswith(says)
    assert clocked({}).by_check() == []
    wide = [check for _, check, _ in clocked({field: value}, skew_ms=7_200_000).by_check()]
    assert wide == ([] if abs(value - 1_764_000_000) < 7200 else ["times_are_unix_seconds"])


def test_protocol_times_without_the_clients_clock_are_checked_for_range() -> None:
    # A recorded history without the client's clock: only the range of Unix seconds is known.
    s = Sim()
    s.connect("c0", "acme", welcome={"server_time": 1_764_000_000_000.0})
    assert [check for _, check, _ in s.by_check()] == ["times_are_unix_seconds"]
    s = Sim()
    s.connect("c0", "acme", welcome={"server_time": 12.5})
    assert [check for _, check, _ in s.by_check()] == ["times_are_unix_seconds"]


def listed_in_order(order: list[str], overlap: bool = False) -> Sim:
    """c0 starts T1, then T2 (after T1's agent_started came back, or, with ``overlap``, both at once),
    and lists its threads in ``order``."""
    s = Sim()
    s.connect("c0", "acme")
    if overlap:
        for rid in ("r0", "r1"):
            s.request("c0", rid, "start_agent", assistant="helper")
        for rid, thread in (("r1", "T2"), ("r0", "T1")):
            s.reply("c0", rid, {"type": "agent_started", "agent_id": "ag-" + thread, "assistant_id": "as1",
                                "thread_id": thread, "startup_ms": 1.0}, final="ok")
    else:
        s.start("c0", "r0", "T1")
        s.start("c0", "r1", "T2")
    s.request("c0", "r2", "list_threads")
    s.reply("c0", "r2", {"type": "threads", "threads": [
        {"thread_id": t, "assistant": "helper", "created_at": 1764000001.0, "message_count": 0} for t in order]}, final="ok")
    return s


def test_ordering_thread_list_newest_first() -> None:
    assert listed_in_order(["T2", "T1"]).by_check() == [
        ("ordering", "threads_in_start_order", "list_threads is not oldest first: a thread is listed before one "
                                               "that was started before it was asked for")]
    assert listed_in_order(["T1", "T2"]).by_check() == []
    # Started at the same instant: either order is oldest first.
    assert listed_in_order(["T2", "T1"], overlap=True).by_check() == []


@pytest.mark.parametrize(("startup_ms", "client_ms", "loud"), [
    (50.0, 60.0, False), (59.9, 60.0, False), (0, 0.4, False),
    (60_000.0, 60.0, True),  # microseconds
    (-1.0, 60.0, True),
])
def test_timing_startup_ms_outside_what_the_client_waited(startup_ms: float, client_ms: float, loud: bool) -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.request("c0", "r0", "start_agent", assistant="helper")
    s.reply("c0", "r0", {"type": "agent_started", "agent_id": "ag", "assistant_id": "as1", "thread_id": "T1",
                         "startup_ms": startup_ms})
    s.ev("ok", "start_agent", "c0", "r0", data={"latency_ms": client_ms})
    assert [check for _, check, _ in s.by_check()] == (["startup_within_latency"] if loud else [])


@pytest.mark.parametrize(("code", "crashed", "loud"), [
    (1003, False, True), (1011, False, True), (1000, False, True),
    (1001, False, False),  # a server shutting down
])
def test_protocol_server_closes_a_connection_without_cause(code: int, crashed: bool, loud: bool) -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.ev("invoke", "raw", "c0", None, data={"note": "binary", "readable": False, "expect": "bad_request"})
    s.ev("frame", "error", "c0", frame={"type": "error", "code": "bad_request", "message": "Binary frames are not supported."})
    if crashed:
        s.ev("info", "crash", None, data={"url": "ws://127.0.0.1:1/ws"})
    s.ev("info", "closed", "c0", data={"reason": f"closed by the server (code {code})", "code": code})
    assert s.by_check() == ([("protocol", "closes_only_for_too_large",
                              f"the server closed the connection (code {code}) without a too_large error or a "
                              "shutdown: an error closes the connection only for too_large")] if loud else [])
    # Closed by the suite itself: nothing to say.
    s = Sim()
    s.connect("c0", "acme")
    s.ev("info", "closed", "c0", data={"reason": "closed by the suite", "code": 1000})
    assert s.by_check() == []


@pytest.mark.parametrize(("gentle", "code", "says"), [
    (True, 1001, None),
    (True, 1000, "the server, shutting down, closed the connection with code 1000, not 1001 (going away)"),
    (True, 1006, "the server, shutting down, closed the connection without a close frame, not 1001 (going away)"),
    (False, 1006, None),  # killed: no close frame is all a dead process can give
    (False, 1000, None),
])
def test_protocol_a_shutdown_closes_with_1001(gentle: bool, code: int, says: str | None) -> None:
    s = Sim()
    s.connect("c0", "acme")
    s.ev("info", "crash", None, data={"url": "ws://127.0.0.1:1/ws", "gentle": gentle})
    s.ev("info", "closed", "c0", data={"reason": f"closed by the server (code {code})", "code": code})
    assert s.by_check() == ([("protocol", "shutdown_closes_1001", says)] if says else [])


@pytest.mark.parametrize("code", [1001, 1009])
def test_protocol_a_shutdown_racing_an_oversized_frame_may_close_either_way(code: int) -> None:
    # c0's oversized frame and the shutdown cross: the close for too_large or the one for the
    # shutdown may come first, and each is right.
    s = Sim()
    s.connect("c0", "acme")
    s.ev("invoke", "raw", "c0", "r1", data={"note": "oversize", "size": 65_600, "readable": False, "expect": "too_large"})
    s.ev("frame", "error", "c0", frame={"type": "error", "code": "too_large", "message": "The message is over 64 KiB."})
    s.ev("info", "crash", None, data={"url": "ws://127.0.0.1:1/ws", "gentle": True})
    s.ev("info", "closed", "c0", data={"reason": f"closed by the server (code {code})", "code": code})
    assert s.by_check() == []


def watched_turn(copy: dict[str, Any], reply_copy: str | None = None, ack_first: bool = True) -> Sim:
    """bob (c1) watches T1 while alice (c0) sends a turn in it; c1 gets ``copy`` of her message as
    fan-out (after her ack, or before it), and the reply's fan-out copy with ``reply_copy`` as content."""
    s = bob_watches_t1()
    content = f"{M1} hi "
    s.request("c0", "r2", "user_message", thread_id="T1", content=content)
    message = {"type": "thread_message", "thread_id": "T1", "message_id": "m1", "role": "user", "user": "alice",
               "content": content, **copy}
    if not ack_first:
        s.reply("c1", None, message)
    s.reply("c0", "r2", {"type": "ack", "thread_id": "T1", "message_id": "m1"})
    if ack_first:
        s.reply("c1", None, message)
    s.reply("c0", "r2", {"type": "agent_chunk", "thread_id": "T1", "seq": 0, "delta": "echo: " + content})
    s.reply("c0", "r2", {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": "echo: " + content})
    s.ev("ok", "user_message", "c0", "r2", data={"latency_ms": 8.0})
    watched = reply_copy if reply_copy is not None else "echo: " + content
    s.reply("c1", None, {"type": "agent_chunk", "thread_id": "T1", "seq": 0, "delta": watched})
    s.reply("c1", None, {"type": "agent_response", "thread_id": "T1", "message_id": "m2", "content": watched})
    return s


@pytest.mark.parametrize(("copy", "reply_copy", "says"), [
    ({"content": f"{M1} hi"}, None, "a thread_message carries content that no message sent to its thread had"),
    ({"user": "bob"}, None, "a thread_message names 'bob' as the sender of a message another user sent"),
    ({"message_id": "m9"}, None, "a thread_message's message_id is not the one the sender's ack gave"),
    ({}, f"echo: {M1} hi", "two copies of one agent_response carry different content"),
])
def test_exactly_once_a_watchers_copy_differs_from_the_turn(copy: dict[str, Any], reply_copy: str | None, says: str) -> None:
    assert watched_turn(copy, reply_copy).by_check() == [("exactly-once", "fanout_copies_match", says)]
    assert watched_turn({}).by_check() == []
    assert watched_turn({}, ack_first=False).by_check() == []


@pytest.mark.parametrize(("crashed", "oversized", "loud"), [(False, False, True), (True, False, False), (False, True, False)])
def test_liveness_server_drops_a_connection_without_a_close_frame(crashed: bool, oversized: bool, loud: bool) -> None:
    s = Sim()
    s.connect("c0", "acme")
    if oversized:
        s.ev("invoke", "raw", "c0", None, data={"note": "oversize_16mib", "size": 16 << 20, "readable": False,
                                               "expect": "too_large"})
    if crashed:
        s.ev("info", "crash", None, data={"url": "ws://127.0.0.1:1/ws"})
    s.ev("info", "closed", "c0", data={"reason": "closed by the server (code 1006)", "code": 1006})
    found = [(inv, check) for inv, check, _ in s.by_check()]
    # Killed by the suite: nothing; after an oversized frame the close is oversize_closes_1009's to judge.
    assert found == ([("liveness", "answered_in_time")] if loud else
                     [("protocol", "oversize_closes_1009")] if oversized else [])
