"""The driver records every way a connection can fail, and never waits forever.

Rules: every test runs the contract server (contract_server.py) with ``--ws``,
a sliver of protocol v1 that can refuse, stall, cut connections and leave
requests unanswered, as a real subprocess on 127.0.0.1 port 0 started through
`CommandTarget` and stopped in a ``with`` block; the driver is a real `Driver`
with its own trio thread, closed in a fixture. Nothing is mocked. No test
bounds the wall clock from above: each has a pytest time-out, and waits inside
the loop use ``trio.fail_after``. Lower bounds (the connect limit was waited
out) and recorded facts (event kinds, ops, statuses, reasons) are asserted.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import trio

from partywall import tokens
from partywall.adapter import STRAY, Adapter, Frame
from partywall.driver import Conn, Driver, Refused
from partywall.history import Event, History
from partywall.target import CommandTarget, parse_ws_url

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-for-driver-tests-only-32-bytes-or-more"
TENANT, USER = "acme", "alice"
#: Long enough that nothing in these tests is resolved by the driver's reply limit.
REPLY_LIMIT_S = 30.0
#: What the driver records when the peer vanished without a close frame.
ABNORMAL = 1006


class Seen:
    """The driver's observer: keeps what it was shown."""

    def __init__(self) -> None:
        self.shown: list[tuple[Event, Frame | None]] = []
        self._changed = threading.Condition()

    def __call__(self, ev: Event, frame: Frame | None) -> None:
        with self._changed:
            self.shown.append((ev, frame))
            self._changed.notify_all()

    def wait_frame(self, req_id: str, frame_type: str) -> None:
        """Block until a frame of ``frame_type`` answering ``req_id`` was shown (a hang guard, not a bound)."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: any(f is not None and f.re == req_id and f.type == frame_type for _, f in self.shown),
                timeout=15,
            ), f"no {frame_type} for {req_id}"

    def seqs(self) -> set[int]:
        return {ev.seq for ev, _ in self.shown}


MakeDriver = Callable[..., tuple[Driver, History, Seen]]


@pytest.fixture
def make_driver() -> Iterator[MakeDriver]:
    """Starts drivers (each with its own history and observer) and closes them all at the end."""
    started: list[Driver] = []

    def make(url: str, **limits: float) -> tuple[Driver, History, Seen]:
        history, seen = History(), Seen()
        limits.setdefault("reply_timeout_s", REPLY_LIMIT_S)
        driver = Driver(url, history=history, observer=seen, **limits).start()
        started.append(driver)
        return driver, history, seen

    yield make
    for driver in started:
        driver.close()


@pytest.fixture
def ws_server(server_cmd: str) -> Iterator[CommandTarget]:
    with CommandTarget(f"{server_cmd} --ws", SECRET, ready_timeout_s=10) as target:
        assert isinstance(target, CommandTarget) and target.url is not None
        yield target


def _token() -> str:
    return tokens.mint(SECRET, TENANT, USER)


def _connect(driver: Driver, name: str, token: str, via: str = "header",
             token_kind: str = "valid") -> Conn | Refused:
    return driver.call(driver.connect, name, TENANT, USER, token, via, token_kind)


def _of(history: History, *, conn: str | None = None, req_id: str | None = None) -> list[tuple[str, str]]:
    """(kind, op) of the events of one connection or one request, in order."""
    return [(e.kind, e.op) for e in history
            if (conn is None or e.conn == conn) and (req_id is None or e.req_id == req_id)]


def _one(history: History, kind: str, op: str, conn: str) -> Event:
    found = [e for e in history if e.kind == kind and e.op == op and e.conn == conn]
    assert len(found) == 1, f"expected one {kind} {op} of {conn}, got {found}"
    return found[0]


async def _closed(driver: Driver, name: str) -> None:
    with trio.fail_after(15):
        await driver.conns[name].done.wait()


def _established_to(port: int) -> list[Any]:
    """This process's TCP connections to ``port`` that are still established."""
    return [c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]


@pytest.mark.parametrize(
    ("case", "status", "body"),
    [("wrong_key via header", 401, ""), ("wrong_key via query", 401, ""), ("wrong path", 404, "no such path\n")],
)
def test_driver_refused_handshake_returns_the_status(
    ws_server: CommandTarget, make_driver: MakeDriver, case: str, status: int, body: str
) -> None:
    assert ws_server.url is not None
    driver, history, seen = make_driver(ws_server.url)
    if case == "wrong path":
        driver.url = ws_server.url.removesuffix("/ws") + "/nope"
        result = _connect(driver, "c1", _token())
        driver.url = ws_server.url
    else:
        via = case.rsplit(" ", 1)[1]
        bad = tokens.mint_bad("wrong_key", SECRET, TENANT, USER)
        result = _connect(driver, "c1", bad, via, "wrong_key")

    assert result == Refused(status, f"HTTP {status}")
    assert "c1" not in driver.conns
    assert _of(history, conn="c1") == [("invoke", "connect"), ("fail", "connect")]
    fail = _one(history, "fail", "connect", "c1")
    assert fail.data["status"] == status and fail.data["body"] == body
    assert fail.data["latency_ms"] >= 0
    invoke = _one(history, "invoke", "connect", "c1")
    assert invoke.data["token_kind"] == ("valid" if case == "wrong path" else "wrong_key")
    assert {invoke.seq, fail.seq} <= seen.seqs()
    # The same server, the right path and a good token: the refusal was about the request.
    ok = _connect(driver, "c2", _token())
    assert isinstance(ok, Conn) and ok.open
    assert ok.welcome is not None and ok.welcome["tenant"] == TENANT
    assert _of(history, conn="c2") == [("invoke", "connect"), ("frame", "welcome"), ("ok", "connect")]
    driver.raise_errors()


@pytest.mark.parametrize("stall", ["handshake", "welcome"])
def test_driver_handshake_timeout_gives_up_after_the_connect_limit(
    server_cmd: str, make_driver: MakeDriver, stall: str
) -> None:
    limit = 0.5
    with CommandTarget(f"{server_cmd} --ws --ws-stall {stall}", SECRET, ready_timeout_s=10) as target:
        assert target.url is not None
        _, port, _ = parse_ws_url(target.url)
        driver, history, seen = make_driver(target.url, connect_timeout_s=limit)
        started = time.monotonic()
        result = _connect(driver, "c1", _token())
        waited = time.monotonic() - started

        assert result == Refused(None, f"no welcome within {limit} s")
        assert waited >= limit
        assert "c1" not in driver.conns
        # No welcome, no close event: the connection never opened.
        assert _of(history, conn="c1") == [("invoke", "connect"), ("info", "connect")]
        info = _one(history, "info", "connect", "c1")
        assert info.data["reason"] == "timeout" and info.data["limit_s"] == limit
        assert info.data["latency_ms"] >= limit * 1000
        assert info.seq in seen.seqs()
        # The socket it gave up on is closed, not left open beside the loop.
        assert _established_to(port) == []
        # The loop is still alive and free for the next step.
        driver.call(driver.pause, 0)
        driver.raise_errors()


@pytest.mark.parametrize("how", ["fin", "rst", "kill"])
def test_driver_abrupt_drop_by_the_server_is_recorded_as_a_close(
    ws_server: CommandTarget, make_driver: MakeDriver, how: str
) -> None:
    assert ws_server.url is not None
    driver, history, seen = make_driver(ws_server.url)
    conn = _connect(driver, "c1", _token())
    assert isinstance(conn, Conn) and conn.open
    ping = driver.call(driver.send, "c1", "ping", "r1", {})
    assert ping is not None
    reply = driver.call(driver.wait, ping)
    assert reply is not None and reply.type == "pong"

    if how == "kill":
        ws_server.kill()
    else:
        assert driver.call(driver.send, "c1", "drop", "r2", {"how": how}) is not None
    driver.call(_closed, driver, "c1")

    assert not conn.open
    assert conn.close_code == ABNORMAL
    closed = _one(history, "info", "closed", "c1")
    assert closed.data == {"reason": f"closed by the server (code {ABNORMAL})", "code": ABNORMAL}
    assert closed.seq in seen.seqs()
    # Recorded once: the owner task's own end does not record a second close.
    assert [e.op for e in history if e.conn == "c1" and e.kind == "info"].count("closed") == 1
    # Closing what is already gone returns at once and records nothing.
    before = len(history)
    driver.call(driver.disconnect, "c1", False)
    assert len(history) == before
    if how != "kill":
        # The server still serves: only that connection was cut.
        again = _connect(driver, "c2", _token())
        assert isinstance(again, Conn) and again.open
    driver.raise_errors()


@pytest.mark.parametrize("how", ["drop", "kill"])
def test_driver_pending_requests_are_resolved_when_their_connection_closes(
    ws_server: CommandTarget, make_driver: MakeDriver, how: str
) -> None:
    assert ws_server.url is not None
    driver, history, seen = make_driver(ws_server.url)
    assert isinstance(_connect(driver, "c1", _token()), Conn)
    sent = {
        "m1": driver.call(driver.send, "c1", "user_message", "m1", {"thread_id": "t1", "content": "hi"}),
        "h1": driver.call(driver.send, "c1", "get_history", "h1", {"thread_id": "t1"}),
        "l1": driver.call(driver.send, "c1", "list_threads", "l1", {}),
    }
    pendings = {rid: p for rid, p in sent.items() if p is not None}
    assert set(pendings) == {"m1", "h1", "l1"}
    # The user message is acked (its turn never ends); the others get nothing.
    seen.wait_frame("m1", "ack")
    assert [f.type for f in pendings["m1"].frames] == ["ack"]
    assert set(driver.pending) == {"m1", "h1", "l1"}

    if how == "kill":
        ws_server.kill()
    else:
        dropped = driver.call(driver.send, "c1", "drop", "d1", {"how": "fin"})
        assert dropped is not None
        pendings["d1"] = dropped
    driver.call(_closed, driver, "c1")

    assert driver.pending == {}
    for rid, pending in pendings.items():
        assert pending.done.is_set(), rid
        # No final reply came: the outcome is unknown, not the ack.
        assert pending.final is None, rid
        assert driver.call(driver.wait, pending) is None, rid
        outcome = [e for e in history if e.req_id == rid and e.kind != "invoke" and e.kind != "frame"]
        assert [(e.kind, e.op, dict(e.data)) for e in outcome] == [
            ("info", pending.type, {"reason": "connection closed"})], rid
    assert _of(history, req_id="m1") == [("invoke", "user_message"), ("frame", "ack"), ("info", "user_message")]
    assert _of(history, req_id="h1") == [("invoke", "get_history"), ("info", "get_history")]
    # The requests were resolved by the close, not by the reply limit.
    assert not [e for e in history if e.op == "timeout"]
    assert driver.call(driver.settle) == []
    # A request on the closed connection is refused at once, and recorded.
    assert driver.call(driver.send, "c1", "ping", "p2", {}) is None
    assert _of(history, req_id="p2") == [("invoke", "ping"), ("fail", "ping")]
    driver.raise_errors()


def test_driver_follows_the_new_url_after_a_restart(
    ws_server: CommandTarget, make_driver: MakeDriver
) -> None:
    old_url = ws_server.url
    assert old_url is not None
    driver, history, _ = make_driver(old_url)
    first = _connect(driver, "c1", _token())
    assert isinstance(first, Conn) and first.welcome is not None
    old_pid = ws_server.server_pid()
    assert first.welcome["server_pid"] == old_pid

    ws_server.kill()
    driver.call(_closed, driver, "c1")
    assert _one(history, "info", "closed", "c1").data["code"] == ABNORMAL
    # Nothing listens at the old URL any more, and the driver still points there.
    stale = _connect(driver, "c2", _token())
    assert isinstance(stale, Refused) and stale.status is None
    stale_fail = _one(history, "fail", "connect", "c2")
    assert "status" not in stale_fail.data and stale_fail.data["reason"] == stale.reason

    ws_server.restart()
    new_url = ws_server.url
    assert new_url is not None
    driver.url = new_url  # how the state machine hands the driver the restarted server
    second = _connect(driver, "c3", _token())
    assert isinstance(second, Conn) and second.open and second.welcome is not None
    new_pid = ws_server.server_pid()
    assert new_pid is not None and new_pid != old_pid
    assert second.welcome["server_pid"] == new_pid
    _, port, _ = parse_ws_url(new_url)
    assert second.tcp is not None and second.tcp.socket.getpeername()[1] == port
    ping = driver.call(driver.send, "c3", "ping", "r3", {})
    assert ping is not None
    reply = driver.call(driver.wait, ping)
    assert reply is not None and reply.type == "pong" and reply.re == "r3"
    assert _of(history, conn="c3") == [
        ("invoke", "connect"), ("frame", "welcome"), ("ok", "connect"),
        ("invoke", "ping"), ("frame", "pong"), ("ok", "ping"),
    ]
    driver.raise_errors()


def test_driver_request_ids_are_each_connections_own(ws_server: CommandTarget, make_driver: MakeDriver) -> None:
    """Requests carry their connection's own ids on the wire (two connections send the same ones),
    replies are matched through the connection that got them, and an ``re`` the connection never
    sent answers none of the suite's requests."""
    assert ws_server.url is not None
    driver, history, _ = make_driver(ws_server.url, reply_timeout_s=1.0)
    for name in ("c0", "c1"):
        assert isinstance(_connect(driver, name, _token()), Conn)
    pings = [driver.call(driver.send, name, "ping", f"{name}-p{k}", {}) for k in range(2) for name in ("c0", "c1")]
    replies = [driver.call(driver.wait, p) for p in pings if p is not None]
    assert [r.re if r else None for r in replies] == ["c0-p0", "c1-p0", "c0-p1", "c1-p1"]
    assert [r.wire_re if r else None for r in replies] == ["1", "1", "2", "2"]
    invokes = [(e.conn, e.req_id, e.wire_id) for e in history if e.kind == "invoke" and e.op == "ping"]
    assert invokes == [("c0", "c0-p0", "1"), ("c1", "c1-p0", "1"), ("c0", "c0-p1", "2"), ("c1", "c1-p1", "2")]
    # A pong carrying an id c1 never sent: it answers nothing, and is kept as stray.
    stray = driver.call(driver.send, "c1", "ping", "c1-p2", {"as": "9"})
    assert stray is not None and driver.call(driver.wait, stray) is None  # its own answer never came
    frames = [e for e in history if e.kind == "frame" and e.conn == "c1" and e.op == "pong"]
    assert frames[-1].req_id == STRAY + "9"
    driver.raise_errors()


@pytest.mark.parametrize(("name", "style"), [("c0", "count"), ("c3", "wide"), ("c5", "uuid"), ("u42", "count")])
def test_request_ids_span_what_clients_send(name: str, style: str) -> None:
    ids = list(itertools.islice(Adapter().request_ids(name), 12))
    assert len(set(ids)) == len(ids) and all(1 <= len(i) <= 64 for i in ids)
    if style == "count":
        assert ids == [str(k) for k in range(1, 13)]
    elif style == "wide":  # 64 characters, more than 64 bytes of UTF-8
        assert all(len(i) == 64 and len(i.encode()) > 64 for i in ids)
        assert ids == list(itertools.islice(Adapter().request_ids("c7"), 12))  # two such connections collide
    else:
        assert all(str(uuid.UUID(i)) == i for i in ids)
