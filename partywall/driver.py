"""The driver: one long-lived trio loop beside a synchronous caller.

Hypothesis has no async state machines, so the machine runs in the caller's
thread and calls into a trio loop that lives in a worker thread
(`trio.from_thread.run`). Every connection has an owner task started with
``nursery.start`` in the loop's nursery: it holds the TCP stream and the
WebSocket, runs the reader, and exits when told. (Entering the WebSocket in
the task of a ``from_thread.run`` call would outlive that task and corrupt
trio's nursery stack.) Readers drain their connection all the time, so the
suite never measures its own back-pressure. A reader takes each frame's
arrival time the moment it comes off the socket, decodes it and wakes the
request it completes; one task (`_checks`) then records it in the history and
shows it to the observer (the checks), in order of arrival and in true order
with the suite's own requests, so the checks' work never delays a frame's time.

``wss://`` URLs run the WebSocket over ``trio.SSLStream`` with the context the
target's TLS settings give (the system trust store by default). A TLS
handshake that fails (a certificate that does not verify, above all) is a
`HarnessError` with one line, never a refused connection: `start` checks it
once before the run, and `connect` raises it should it happen later.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

try:
    # The function `trio.testing` exports, from where it is defined: importing trio.testing
    # itself imports pytest when it is installed (75 ms of the bench's start-up, for nothing).
    from trio._core import wait_all_tasks_blocked
except ImportError:  # a trio that moved it: the public name
    from trio.testing import wait_all_tasks_blocked

from partywall.adapter import STRAY, Adapter, Frame
from partywall.errors import HarnessError
from partywall.history import Event, History
from partywall.target import tls_problem

T = TypeVar("T")

#: Server frames may be large (a long history); the protocol says clients accept 16 MiB.
MAX_FRAME = 16 * 1024 * 1024 + 4096
#: Frames queued between trio-websocket's reader and ours. Ours never stops
#: reading, so this only absorbs bursts; the default of 1 would stall pings.
QUEUE = 4096

Observer = Callable[[Event, Frame | None], None]


@attrs.define(eq=False)
class Conn:
    """A connection the suite holds open across steps."""

    name: str
    tenant: str
    user: str
    via: str
    open: bool = False
    welcome: dict[str, Any] | None = None
    welcome_t: float | None = None
    """When the welcome came off the socket (``time.monotonic()``)."""
    close_code: int | None = None
    close_expected_t: float | None = None
    """When a frame the server must answer by closing (an oversized one) was sent."""
    close_overdue: bool = False
    ws: trio_websocket.WebSocketConnection | None = attrs.field(default=None, repr=False)
    tcp: trio.SocketStream | None = attrs.field(default=None, repr=False)
    stop: trio.Event = attrs.field(factory=trio.Event, repr=False)
    abrupt: bool = False
    done: trio.Event = attrs.field(factory=trio.Event, repr=False)
    wire_ids: Iterator[str] = attrs.field(factory=lambda: iter(()), repr=False)
    """The ids its requests carry on the wire, in order (`Adapter.request_ids`)."""
    sent: dict[str, str] = attrs.field(factory=dict, repr=False)
    """Wire id -> the suite's own id of the request this connection sent with it."""
    owed_errors: list[tuple[float, str, str]] = attrs.field(factory=list, repr=False)
    """(sent at, kind, the suite's id) of each malformed frame whose id the service may not read,
    oldest first: each is owed an error, which comes without ``re`` (or with its id)."""
    errors_paid: trio.Event = attrs.field(factory=trio.Event, repr=False)
    """Set once no error is owed (or the one owed longest is overdue)."""
    errors_overdue: bool = False

    def __repr__(self) -> str:  # valid Python in Hypothesis's printed program
        return self.name


@attrs.define(eq=False)
class Pending:
    """A request on its way: completed by its final reply or an ``error``."""

    req_id: str
    conn: str
    type: str
    t: float
    done: trio.Event = attrs.field(factory=trio.Event)
    answered: trio.Event = attrs.field(factory=trio.Event)
    """Set by its first answer (an ``ack``, for a message), or when it is done."""
    frames: list[Frame] = attrs.field(factory=list)
    times: list[tuple[str, float]] = attrs.field(factory=list)
    """(frame type, arrival time) of each frame that answered it, as each came off the socket."""
    timed_out: bool = False
    replied: bool = False
    """Completed by its final reply or an ``error`` (not by its connection closing)."""

    @property
    def final(self) -> Frame | None:
        """The frame that completed the request; None while it waits and when its connection
        closed first (an ``ack`` or chunk that came before is in ``frames``, not final)."""
        return self.frames[-1] if self.replied else None


@attrs.frozen
class Refused:
    """A handshake that did not open a connection."""

    status: int | None
    """The HTTP status, when the server answered the upgrade with one."""
    reason: str


class _NotLetIn(Exception):
    """The service's first frame was not a welcome: it refused the credential after the socket opened."""

    def __init__(self, frame: Frame) -> None:
        super().__init__(frame.raw)
        self.frame = frame


def _only(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside (nested) groups, or the group itself when there are several."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]  # type: ignore[assignment]
    return group


class Driver:
    """Runs connections and requests for a synchronous caller, recording everything."""

    CHECKS_PER_TURN = 16
    """Events recorded and checked per idle turn of the loop, before looking at the sockets again."""

    def __init__(
        self,
        url: str,
        *,
        history: History,
        observer: Observer,
        adapter: Adapter | None = None,
        reply_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context
        """For wss:// URLs; None means ``ssl.create_default_context()`` (the system trust store)."""
        self.history = history
        self.observer = observer
        self.adapter = adapter or Adapter()
        self.reply_timeout_s = reply_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.conns: dict[str, Conn] = {}
        self.pending: dict[str, Pending] = {}
        self.errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._shutdown: trio.Event | None = None
        self._ready = threading.Event()
        self._crashed: BaseException | None = None
        self._inbox: deque[tuple[Any, ...]] = deque()
        """What happened and is not yet recorded, in order: frames taken off their sockets with
        their arrival times, and the suite's own requests with the times they went out."""
        self._checks_waiter: trio.lowlevel.Task | None = None

    # -- the loop -----------------------------------------------------------

    def start(self) -> Driver:
        self._thread = threading.Thread(target=self._run_loop, name="partywall-driver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise HarnessError("the driver's trio loop did not start within 10 s.")
        if self._crashed:
            raise HarnessError(f"the driver's trio loop failed to start: {self._crashed!r}")
        if urlsplit(self.url).scheme == "wss":
            try:
                self.call(self._check_tls)
            except BaseException:
                self.close()
                raise
        return self

    def _tls_context(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    async def _open_tls(self, tcp: trio.SocketStream, hostname: str) -> trio.SSLStream[trio.SocketStream]:
        """The TLS handshake over ``tcp``; HarnessError (one line) when it fails."""
        stream = trio.SSLStream(tcp, self._tls_context(), server_hostname=hostname, https_compatible=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, OSError) as exc:
            problem = tls_problem(exc, self.url)
            if problem is None:
                raise
            raise HarnessError(problem) from exc
        return stream

    async def _check_tls(self) -> None:
        """One TLS handshake before the run: a certificate that does not verify stops it at once.
        A server that does not answer at all is left to the run, as for ws://."""
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        try:
            with trio.fail_after(self.connect_timeout_s):
                tcp = await trio.open_tcp_stream(parts.hostname, parts.port)
        except (OSError, trio.TooSlowError):
            return
        try:
            with trio.fail_after(self.connect_timeout_s):
                await self._open_tls(tcp, parts.hostname)
        except trio.TooSlowError:
            raise HarnessError(
                f"the TLS handshake with {self.url} did not finish within {self.connect_timeout_s:g} s; "
                "check that the server serves wss:// on that port."
            ) from None
        except (trio.BrokenResourceError, OSError):
            pass  # closed without a TLS error: the run will see what the server does
        finally:
            await tcp.aclose()

    def _run_loop(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, not swallowed
            self._crashed = exc
            self._ready.set()

    async def _main(self) -> None:
        self._shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            nursery.start_soon(self._watchdog)
            nursery.start_soon(self._checks)
            self._ready.set()
            await self._shutdown.wait()
            await self._close_all(abrupt=False)
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` in the loop and return its result (from the caller's thread)."""
        if self._crashed is not None:
            raise HarnessError(f"the driver's trio loop has stopped: {self._crashed!r}")
        return trio.from_thread.run(self._then_flush, fn, args, trio_token=self._token)

    async def _then_flush(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
        try:
            return await fn(*args)
        finally:
            self._flush()  # the caller reads what the checks found: every frame read so far

    def close(self) -> None:
        """Close every connection cleanly and stop the loop."""
        if self._thread is None or self._token is None:
            return
        if self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)  # type: ignore[union-attr]
            except trio.RunFinishedError:
                pass  # the loop is already gone: nothing left to stop
            self._thread.join(15)
        self._thread = None

    def raise_errors(self) -> None:
        """Raise a harness error recorded in the loop (a bug of the suite, not the server)."""
        if self._crashed is not None:
            raise HarnessError(f"the driver's trio loop crashed: {self._crashed!r}") from self._crashed
        if self.errors:
            exc = self.errors[0]
            raise HarnessError(f"the driver failed: {exc!r}") from exc

    # -- connections ----------------------------------------------------------

    async def connect(self, name: str, tenant: str, user: str, token: str, via: str,
                      token_kind: str = "valid", *, url: str | None = None,
                      query_token: str | None = None) -> Conn | Refused:
        """Open a connection and wait for its ``welcome``; a refused handshake is returned, not raised.

        ``url``: another URL of the service than its own (another path); ``via`` ``both`` sends
        ``token`` as ``header`` and ``query_token`` as ``query`` at once (`Adapter.handshake_both`).
        """
        assert self._nursery is not None
        conn = Conn(name, tenant, user, via, wire_ids=self.adapter.request_ids(name))
        t0 = time.monotonic()
        data = {"tenant": tenant, "user": user, "via": via, "token_kind": token_kind}
        if url is not None:
            data["url"] = url
        self._later("invoke", "connect", t0, conn=name, data=data)
        if via == "both":
            url, headers = self.adapter.handshake_both(url or self.url, token, query_token or "")
            hello = None
        else:
            url, headers = self.adapter.handshake(url or self.url, token, via)
            hello = self.adapter.auth_message(token, via)
        try:
            try:
                with trio.fail_after(self.connect_timeout_s):
                    await self._nursery.start(self._own, conn, url, headers, hello)
            except BaseExceptionGroup as group:
                raise _only(group) from None
        except ConnectionRejected as exc:
            refused = Refused(exc.status_code, f"HTTP {exc.status_code}")
            body = (exc.body or b"").decode("utf-8", "replace")
            self._outcome("fail", "connect", conn, status=exc.status_code, body=body, t0=t0)
            return refused
        except _NotLetIn as exc:
            frame = exc.frame
            self._outcome("fail", "connect", conn, reason="refused after the socket opened", frame=frame.raw, t0=t0)
            return Refused(None, f"refused after the socket opened: {frame.raw[:160]}")
        except trio.TooSlowError:
            self._outcome("info", "connect", conn, reason="timeout", limit_s=self.connect_timeout_s, t0=t0)
            return Refused(None, f"no welcome within {self.connect_timeout_s} s")
        except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError) as exc:
            # (A TLS handshake that failed is a HarnessError from _open_tls, and goes up.)
            self._outcome("fail", "connect", conn, reason=repr(exc), t0=t0)
            return Refused(None, repr(exc))
        self.conns[name] = conn
        self._outcome("ok", "connect", conn, t0=t0, welcome=conn.welcome)
        return conn

    def _outcome(self, kind: str, op: str, conn: Conn, *, t0: float, **data: Any) -> None:
        t = time.monotonic()
        data["latency_ms"] = (t - t0) * 1000.0
        data["wall_s"] = time.time()  # the client's clock at ``t``: server times are compared with it
        self._later(kind, op, t, conn=conn.name, data=data)

    async def _own(self, conn: Conn, url: str, headers: list[tuple[str, str]], hello: str | bytes | None,
                   task_status: Any) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.port is None:
            raise HandshakeError(f"expected a ws:// or wss://HOST:PORT/PATH URL (got {url!r})")
        resource = parts.path or "/"
        if parts.query:
            resource += "?" + parts.query
        tcp = await trio.open_tcp_stream(parts.hostname, parts.port)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.tcp = tcp
        try:
            # An abrupt drop resets `tcp` under the TLS layer, as a crashed client would.
            stream: trio.abc.Stream = tcp
            if parts.scheme == "wss":
                stream = await self._open_tls(tcp, parts.hostname)
            async with trio.open_nursery() as inner:
                ws = await trio_websocket.wrap_client_stream(
                    inner,
                    stream,
                    f"{parts.hostname}:{parts.port}",
                    resource,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                    message_queue_size=QUEUE,
                    max_message_size=MAX_FRAME,
                    receive_buffer_size=65536,
                )
                conn.ws = ws
                if hello is not None:
                    await ws.send_message(hello)  # a service that authenticates in the first message
                first = await ws.get_message()
                t = time.monotonic()
                frame = self._arrive(conn, first, t)
                conn.welcome_t = t
                if frame.type != "welcome":
                    raise _NotLetIn(frame)
                conn.welcome = frame.data
                conn.open = True
                task_status.started(conn)
                inner.start_soon(self._read, conn, ws)
                await conn.stop.wait()
                if conn.abrupt:
                    # RST instead of a close handshake: what a crashed client or a cut cable does.
                    tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    await tcp.aclose()
                else:
                    with trio.move_on_after(3):
                        await ws.aclose()
                inner.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
            self._mark_closed(conn, "abrupt drop" if conn.abrupt else "closed by the suite")

    async def _read(self, conn: Conn, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                message = await ws.get_message()
                # Its arrival time, taken before anything of the suite's touches it. Then it is
                # decoded (to wake the request it completes); the history, the model and the
                # checks take it later, in order of arrival (`_checks`).
                t = time.monotonic()
                self._arrive(conn, message, t)
        except ConnectionClosed as exc:
            self._flush()  # every frame before the close is recorded before it
            # wsproto names the codes it knows (CloseReason.UNSUPPORTED_DATA): the number is what
            # the protocol, the checks and the reports speak of.
            code = int(exc.reason.code) if exc.reason is not None and exc.reason.code is not None else None
            conn.close_code = code
            if conn.stop.is_set():  # the suite is closing it (a disconnect step, the end of an example)
                self._mark_closed(conn, "abrupt drop" if conn.abrupt else "closed by the suite", code=code)
            else:
                self._mark_closed(conn, f"closed by the server (code {code})", code=code)
            conn.stop.set()

    def _wake_checks(self) -> None:
        waiter = self._checks_waiter
        if waiter is not None:
            self._checks_waiter = None
            trio.lowlevel.reschedule(waiter)

    async def _checks(self) -> None:
        """Record and check the frames the readers took off their sockets, oldest first, in the
        loop's idle time: only once every reader and sender is waiting on its socket (trio's
        `wait_all_tasks_blocked`), so a frame that arrives, or a request due to go out, never
        waits behind the checks. A caller of the driver still sees every check done: each call
        ends with `_flush`."""
        inbox = self._inbox
        while True:
            if not inbox:
                self._checks_waiter = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_checks_wait)
                continue
            await wait_all_tasks_blocked()
            for _ in range(min(len(inbox), self.CHECKS_PER_TURN)):
                self._record(inbox.popleft())

    def _abort_checks_wait(self, _: Any) -> trio.lowlevel.Abort:
        self._checks_waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _flush(self) -> None:
        """Record every frame that has arrived and is not yet recorded, before an event of the
        suite's own (a request, a close, a note), so the history keeps the order things happened in."""
        inbox = self._inbox
        while inbox:
            self._record(inbox.popleft())

    def _later(self, kind: str, op: str, t: float, **fields: Any) -> None:
        """An event of the suite's own on a hot path (a request going out, a connection opening):
        queued behind the frames that came before it, recorded and checked in that order."""
        self._inbox.append(("event", kind, op, t, self.history.step, fields))
        self._wake_checks()

    def _arrive(self, conn: Conn, message: str | bytes, t: float) -> Frame:
        """A frame just taken off the socket at ``t``: decoded, and the request it completes woken,
        at once; recorded in the history and shown to the checks in order, by `_checks`."""
        frame = self.adapter.decode(message)
        wire = frame.wire_re
        if wire is not None:
            frame = attrs.evolve(frame, request=conn.sent.get(wire, STRAY + wire))
        done = None
        if frame.type == "error" and conn.owed_errors:
            # The error owed to a malformed frame: without re (the oldest's), or with its id.
            paid = (conn.owed_errors[0] if frame.re is None
                    else next((o for o in conn.owed_errors if o[2] == frame.re), None))
            if paid is not None:
                conn.owed_errors.remove(paid)
                if not conn.owed_errors:
                    conn.errors_paid.set()
        pending = self.pending.get(frame.re) if frame.re is not None else None
        if pending is not None and pending.conn == conn.name and not pending.done.is_set():
            pending.frames.append(frame)
            pending.times.append((frame.type or "?", t))
            pending.answered.set()
            if self.adapter.completes(pending.type, frame):
                done = pending
                pending.replied = True
                pending.done.set()
                del self.pending[pending.req_id]
        self._inbox.append(("frame", conn, frame, t, self.history.step, done))
        self._wake_checks()
        return frame

    def _record(self, item: tuple[Any, ...]) -> None:
        if item[0] == "frame":
            self._record_frame(*item[1:])
        else:
            _, kind, op, t, step, fields = item
            self._observe(self.history.append(kind, op, t=t, step=step, **fields), None)

    def _record_frame(self, conn: Conn, frame: Frame, t: float, step: int | None, pending: Pending | None) -> None:
        """Record a frame that arrived at ``t`` (during ``step``) and show it to the checks, then
        the outcome of the request it completed (``pending``), if any."""
        ev = self.history.append("frame", frame.type or "?", t=t, step=step, conn=conn.name, req_id=frame.re,
                                 data=frame.data, raw=frame.raw)
        self._observe(ev, frame)
        if pending is not None:
            kind = "fail" if frame.type == "error" else "ok"
            done = self.history.append(
                kind, pending.type, t=t, step=step, conn=conn.name, req_id=pending.req_id,
                data={"latency_ms": (t - pending.t) * 1000.0, "frames": len(pending.frames)},
            )
            self._observe(done, frame)

    def _mark_closed(self, conn: Conn, reason: str, code: int | None = None) -> None:
        if not conn.open and conn.done.is_set():
            return
        self._flush()
        was_open = conn.open
        conn.open = False
        if was_open:
            ev = self.history.append("info", "closed", conn=conn.name, data={"reason": reason, "code": code})
            self._observe(ev, None)
        for p in [p for p in self.pending.values() if p.conn == conn.name]:
            # The outcome of a request on a closed connection is unknown (Jepsen's info).
            ev = self.history.append("info", p.type, conn=conn.name, req_id=p.req_id, data={"reason": "connection closed"})
            self._observe(ev, None)
            p.done.set()
            p.answered.set()
            del self.pending[p.req_id]
        conn.done.set()

    def _observe(self, ev: Event, frame: Frame | None) -> None:
        try:
            self.observer(ev, frame)
        except Exception as exc:  # noqa: BLE001 - kept and raised at the next step
            self.errors.append(exc)

    async def disconnect(self, name: str, abrupt: bool = False) -> None:
        """Close a connection (a clean close handshake, or an abrupt TCP reset) and wait until it is gone."""
        conn = self.conns[name]
        if not conn.open:
            return
        self._flush()
        self._observe(self.history.append("invoke", "drop" if abrupt else "close", conn=name), None)
        conn.abrupt = abrupt
        conn.stop.set()
        with trio.move_on_after(5):
            await conn.done.wait()

    async def _close_all(self, abrupt: bool) -> None:
        async with trio.open_nursery() as n:
            for name, conn in list(self.conns.items()):
                if conn.open:
                    n.start_soon(self.disconnect, name, abrupt)

    async def close_all(self) -> None:
        """Close every open connection cleanly (the end of an example)."""
        await self._close_all(abrupt=False)

    async def wait_closed(self) -> None:
        """Wait (up to 5 s) until every connection has seen its end (after the server was killed)."""
        with trio.move_on_after(5.0):
            for conn in list(self.conns.values()):
                await conn.done.wait()

    async def note(self, op: str, conn: str | None, data: dict[str, Any]) -> None:
        """Record a fact of the run (a probe pairing, a crash, a restart) for the checks."""
        self._flush()
        ev = self.history.append("info", op, conn=conn, data=data)
        self._observe(ev, None)

    def forget_closed(self) -> None:
        """Drop closed connections from the table (between examples)."""
        for name in [n for n, c in self.conns.items() if not c.open]:
            del self.conns[name]

    # -- requests -------------------------------------------------------------

    async def send(self, name: str, req_type: str, req_id: str, fields: dict[str, Any], t: float | None = None) -> Pending | None:
        """Send a request without waiting for its reply; None when the connection is closed."""
        conn = self.conns[name]
        t0 = time.monotonic() if t is None else t
        if not conn.open or conn.ws is None:
            self._flush()
            self.history.append("invoke", req_type, t=t0, conn=name, req_id=req_id, data=fields)
            self.history.append("fail", req_type, conn=name, req_id=req_id, data={"reason": "connection closed before sending"})
            return None
        pending = Pending(req_id, name, req_type, t0)
        self.pending[req_id] = pending
        wire = next(conn.wire_ids)
        conn.sent[wire] = req_id
        self._later("invoke", req_type, t0, conn=name, req_id=req_id, wire_id=wire, data=fields)
        try:
            await conn.ws.send_message(self.adapter.encode(req_type, wire, fields))
        except ConnectionClosed:
            # Closed under it: the reader records that close, with the server's code, after
            # every frame that came before it (marking it here would lose the code).
            pass
        return pending

    async def send_raw(self, name: str, message: str | bytes, *, note: str, req_id: str, readable: bool | None,
                       expect: str) -> Pending | None:
        """Send a malformed frame (bad input). When its id is readable the error
        must answer it, so it is tracked like a request; otherwise the error
        comes without ``re`` and the checks expect exactly that."""
        conn = self.conns[name]
        self._flush()
        ev = self.history.append("invoke", "raw", conn=name, req_id=req_id,
                                 data={"note": note, "readable": readable, "expect": expect,
                                       "size": len(message if isinstance(message, bytes)
                                                   else message.encode("utf-8", "surrogatepass"))})
        if not conn.open or conn.ws is None:
            return None
        conn.sent[req_id] = req_id  # a malformed frame carries the suite's own id
        pending = None
        if expect == "too_large" and conn.close_expected_t is None:
            conn.close_expected_t = ev.t  # the server must close this connection (1009)
        if readable:
            pending = Pending(req_id, name, "raw", ev.t)
            self.pending[req_id] = pending
        elif expect != "too_large":
            # Owed an error, with re or without (where the protocol leaves that open, either):
            # counted, so an error that never comes is not hidden by another frame's.
            if not conn.owed_errors:
                conn.errors_paid = trio.Event()
            conn.owed_errors.append((ev.t, note, req_id))
        self._observe(ev, None)
        try:
            await conn.ws.send_message(message)
        except ConnectionClosed:
            # The server closed it while the frame was going out (after its too_large, or a
            # transport that refuses a message past its own size limit): the reader records
            # that close, with its code, after every frame that came before it.
            pass
        return pending

    async def wait(self, pending: Pending) -> Frame | None:
        """Wait up to the reply limit for a request's final reply; None when it timed out or its
        connection closed. (An async caller wanting another limit puts ``move_on_after`` around
        ``pending.done.wait()`` itself.)"""
        with trio.move_on_after(self.reply_timeout_s):
            await pending.done.wait()
        return pending.final

    async def settle(self, found: Callable[[], bool] | None = None,
                     only: Sequence[Pending] | None = None) -> list[Pending]:
        """Wait until nothing is in flight and every close the server owes (after an oversized
        frame) has come, or the reply limit passes, or ``found()`` says the checks have found a
        violation (waiting on would only delay the report); return what is still pending. With
        ``only``, wait for those requests' replies alone."""
        with trio.move_on_after(self.reply_timeout_s + 0.5):
            while True:
                self._flush()  # every frame that came is checked before ``found`` is asked
                if found is not None and found():
                    break
                if only is not None:
                    owed = [p.done for p in only if not p.done.is_set()]
                else:
                    owed = [p.done for p in self.pending.values()]
                    owed += [c.done for c in self.conns.values() if c.open and c.close_expected_t is not None]
                    owed += [c.errors_paid for c in self.conns.values() if c.open and c.owed_errors
                             and not c.errors_overdue and c.close_expected_t is None]
                if not owed:
                    break
                with trio.move_on_after(0.05):  # the oldest; then look at the checks again
                    await owed[0].wait()
        return list(self.pending.values())

    async def pause(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def until(self, ready: Callable[[], bool], deadline: float) -> None:
        """Wait until ``ready()`` holds, asked each time after every frame that came has been
        recorded and checked, or the monotonic clock reaches ``deadline``."""
        while True:
            self._flush()
            if ready() or time.monotonic() >= deadline:
                return
            await trio.sleep(0.005)

    async def _watchdog(self) -> None:
        """Flag requests on open connections that outlive the reply limit (once each)."""
        while True:
            await trio.sleep(0.1)
            self._flush()
            now = time.monotonic()
            for conn in list(self.conns.values()):
                expected = conn.close_expected_t
                if conn.open and expected is not None and not conn.close_overdue and now - expected > self.reply_timeout_s:
                    conn.close_overdue = True
                    ev = self.history.append("info", "not_closed", conn=conn.name,
                                             data={"waited_s": round(now - expected, 3), "limit_s": self.reply_timeout_s})
                    self._observe(ev, None)
                owed = conn.owed_errors
                if (conn.open and owed and not conn.errors_overdue and expected is None
                        and now - owed[0][0] > self.reply_timeout_s):
                    # Only while no close is owed: a connection the server must close may go
                    # before it answers what came ahead of the oversized frame.
                    conn.errors_overdue = True
                    conn.errors_paid.set()
                    ev = self.history.append("info", "error_owed", conn=conn.name,
                                             data={"kind": owed[0][1], "request": owed[0][2],
                                                   "waited_s": round(now - owed[0][0], 3), "limit_s": self.reply_timeout_s})
                    self._observe(ev, None)
            for p in list(self.pending.values()):
                if not p.timed_out and now - p.t > self.reply_timeout_s and self.conns[p.conn].open:
                    p.timed_out = True
                    ev = self.history.append(
                        "info", "timeout", conn=p.conn, req_id=p.req_id,
                        data={"type": p.type, "waited_s": round(now - p.t, 3), "limit_s": self.reply_timeout_s},
                    )
                    self._observe(ev, None)
