"""The trio/WebSocket layer: handshakes, the request loop, shutdown.

Thin on purpose: parsing and frame building live in `protocol.py`, storage in
`storage.py`, turns in `turns.py`. This module wires them to sockets.

Task ownership, outermost first: the storage writer; the turns nursery
(turns outlive the connection that asked for them); the connections nursery
(one task per TCP connection, which owns that connection's WebSocket reader,
writer and request tasks).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

from .agent import Agent, AgentConfig
from .auth import Authenticator, Refusal
from .connection import Connection
from .hub import Hub
from .protocol import (
    BAD_REQUEST,
    INTERNAL,
    MAX_MESSAGE_BYTES,
    NOT_FOUND,
    RATE_LIMITED,
    TOO_LARGE,
    GetHistory,
    JoinThread,
    LeaveThread,
    ListThreads,
    Ping,
    ProtocolError,
    Request,
    RequestParser,
    StartAgent,
    UserMessage,
    encode,
    error_frame,
    message_too_large,
    pong_frame,
    welcome_frame,
)
from .storage import Storage, ThreadNotFound, ThreadRecord
from .turns import TurnScheduler, answer_unanswered

log = logging.getLogger("agentserver")

#: Seconds a client gets to send its opening handshake.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds to wait for a peer's close frame before dropping the TCP connection.
CLOSE_TIMEOUT: Final = 3.0
#: trio-websocket closes with 1009 by itself, without our `too_large` error,
#: past this many code points. PROTOCOL.md asks for the error frame first up to
#: at least 16 MiB; we read up to 32 MiB (documented), so every message up to
#: that size reaches our own check. Bigger ones are cut off by the library.
WS_MAX_MESSAGE: Final = 32 << 20
#: Complete messages trio-websocket may buffer before its reader pauses; the
#: request loop drains it continuously.
WS_QUEUE: Final = 32
#: The `too_large` error's message.
TOO_LARGE_MESSAGE: Final = (
    f"A message may be at most {MAX_MESSAGE_BYTES} bytes of UTF-8; closing the connection."
)


class SizeGuard:
    """Oversized client messages: the transport's cap, and what a message over our limit gets.

    A component like the others (only so a planted fault can swap the rule):
    `too_large` without `re` (the message is not parsed), then a close with 1009.
    """

    max_message: int = WS_MAX_MESSAGE
    """Passed to trio-websocket, which closes with 1009 by itself past it."""

    def refuse(self, conn: Connection, message: str | bytes) -> bool:
        """Answer `message` if it is over MAX_MESSAGE_BYTES (True); False leaves it to be parsed."""
        if not message_too_large(message):
            return False
        conn.send(error_frame(TOO_LARGE, TOO_LARGE_MESSAGE))
        conn.close(1009, "message too big")
        return True


class Shutdown:
    """How a server that is shutting down closes each connection: with 1001 (going away)."""

    code = 1001
    reason = "server shutting down"

    async def close(self, conn: Connection) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await conn.ws.aclose(self.code, self.reason)


@attrs.frozen
class Components:
    """The replaceable parts of the server; planted faults swap one class."""

    storage: type[Storage] = Storage
    hub: type[Hub] = Hub
    scheduler: type[TurnScheduler] = TurnScheduler
    agent: type[Agent] = Agent
    authenticator: type[Authenticator] = Authenticator
    parser: type[RequestParser] = RequestParser
    size_guard: type[SizeGuard] = SizeGuard
    shutdown: type[Shutdown] = Shutdown


@attrs.frozen
class ServerConfig:
    db_path: str
    """SQLite database file (created if missing)."""
    secret: str
    """HS256 secret shared with whoever mints tokens."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port."""
    agent: AgentConfig = AgentConfig()
    ssl_context: ssl.SSLContext | None = None
    """Serve TLS (wss://) with this server context; None serves plain ws://."""


class AgentServer:
    def __init__(self, config: ServerConfig, components: Components = Components()) -> None:
        self.config = config
        self.components = components
        self.storage = components.storage(config.db_path)
        self.hub = components.hub()
        self.agent = components.agent(config.agent)
        self.auth = components.authenticator(config.secret)
        self.parser = components.parser()
        self.size_guard = components.size_guard()
        self.closer = components.shutdown()
        self.connections: set[Connection] = set()
        self._scheduler: TurnScheduler | None = None
        self._accepting = trio.CancelScope()
        self._handlers: dict[type[Any], Callable[..., Awaitable[None]]] = {
            Ping: self._ping,
            LeaveThread: self._leave,
            JoinThread: self._join,
            UserMessage: self._user_message,
            StartAgent: self._start_agent,
            GetHistory: self._history,
            ListThreads: self._list_threads,
        }

    def prepare(self) -> int:
        """Migrate the database and answer messages a crash left unanswered.

        Synchronous, before serving: raises StorageError for an unusable
        database. Returns how many messages were answered.
        """
        self.storage.open()
        return answer_unanswered(self.storage, self.agent)

    # -- serving ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started` gets the bound port."""
        async with trio.open_nursery() as storage_nursery:
            await storage_nursery.start(self.storage.serve)
            try:
                async with trio.open_nursery() as turns:
                    self._scheduler = self.components.scheduler(
                        self.storage, self.hub, self.agent, turns
                    )
                    async with trio.open_nursery() as conns:
                        listeners = await conns.start(self._listen, conns)
                        listener = listeners[0]
                        if isinstance(listener, trio.SSLListener):
                            listener = listener.transport_listener
                        task_status.started(listener.socket.getsockname()[1])
            finally:
                # Every write already queued (turns cancelled mid-commit
                # included) is committed before the writer leaves.
                self.storage.stop()

    async def _listen(
        self,
        conns: trio.Nursery,
        *,
        task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners: list[Any] = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        if len(listeners) > 1:
            # A name that resolves to several addresses gets one listener per
            # address, each with its own free port; we announce one URL, so
            # keep one listener.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        if self.config.ssl_context is not None:
            # The TLS handshake runs in each connection's own task, on its first
            # read, so it is bounded by HANDSHAKE_TIMEOUT like the HTTP upgrade.
            listeners = [
                trio.SSLListener(listener, self.config.ssl_context, https_compatible=True)
                for listener in listeners
            ]
        with self._accepting:
            await trio.serve_listeners(
                self._handle_stream, listeners, handler_nursery=conns, task_status=task_status
            )

    async def shutdown(self) -> None:
        """Stop accepting and close every connection with 1001."""
        self._accepting.cancel()
        closing = list(self.connections)
        for conn in closing:
            conn.closed = True
        with trio.move_on_after(CLOSE_TIMEOUT + 1):
            async with trio.open_nursery() as nursery:
                for conn in closing:
                    nursery.start_soon(self.closer.close, conn)

    # -- connections -------------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """One TCP connection, start to end. Nothing that goes wrong here may end the server."""
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._handle_websocket(stream, nursery)
                finally:
                    # Stops trio-websocket's reader task, which would otherwise
                    # wait for a client that keeps its socket after a 401.
                    nursery.cancel_scope.cancel()
                    await trio.aclose_forcefully(stream)
        except Exception:
            # One broken connection is logged and dropped; the server goes on.
            log.exception("connection failed")

    async def _handle_websocket(self, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        request: WebSocketRequest | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            request = await wrap_server_stream(
                nursery,
                stream,
                message_queue_size=WS_QUEUE,
                max_message_size=self.size_guard.max_message,
                receive_buffer_size=None,
            )
        if request is None:
            return  # no handshake in time (or the client left mid-handshake)
        try:
            principal = self.auth.admit(request.path, request.headers)
            if isinstance(principal, Refusal):
                await request.reject(principal.status, body=principal.body or None)
                return
            ws = await request.accept()
        except ConnectionClosed:
            return  # the client left during the handshake
        conn = Connection(
            self.hub.new_connection_id(principal.tenant, principal.user),
            principal.tenant,
            principal.user,
            ws,
        )
        self.connections.add(conn)
        try:
            conn.send(welcome_frame(conn.tenant, conn.user, conn.connection_id))
            async with trio.open_nursery() as requests:
                requests.start_soon(conn.serve_writer)
                await self._read_requests(conn, requests)
                if conn.closed:
                    # We chose to close (too_large): let the writer send the
                    # error frame and the close frame, in that order.
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await conn.wait_flushed()
                requests.cancel_scope.cancel()
        finally:
            conn.closed = True
            self.hub.drop(conn)
            self.connections.discard(conn)
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await ws.aclose()

    async def _read_requests(self, conn: Connection, requests: trio.Nursery) -> None:
        ws = conn.ws
        parse, refuse = self.parser.parse, self.size_guard.refuse
        while not conn.closed:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
            if conn.closed:
                return
            if refuse(conn, message):
                continue  # refused: the connection is closing, so the loop ends
            try:
                request = parse(message)
            except ProtocolError as exc:
                conn.send(error_frame(exc.code, exc.message, exc.re))
                continue
            limited = self.parser.over_limit(conn)
            if limited is not None:
                conn.send(error_frame(RATE_LIMITED, limited, request.id))
                continue
            await self._guarded(self._handlers[type(request)], conn, request, requests)

    async def _guarded(
        self,
        handler: Callable[..., Awaitable[None]],
        conn: Connection,
        request: Request,
        *args: Any,
    ) -> None:
        """Run a handler, turning its failures into the right `error` frame."""
        try:
            await handler(conn, request, *args)
        except ThreadNotFound as exc:
            conn.send(error_frame(NOT_FOUND, exc.message, request.id))
        except ProtocolError as exc:
            conn.send(error_frame(exc.code, exc.message, request.id))
        except Exception:
            log.exception("request %s failed", type(request).__name__)
            conn.send(
                error_frame(INTERNAL, "The server failed to handle this request.", request.id)
            )

    def _spawn(
        self,
        conn: Connection,
        requests: trio.Nursery,
        handler: Callable[..., Awaitable[None]],
        request: Request,
    ) -> None:
        """Run a slow request in its own task, counted as in flight until it replies."""
        conn.in_flight += 1

        async def run() -> None:
            try:
                await self._guarded(handler, conn, request)
            finally:
                conn.in_flight -= 1

        requests.start_soon(run)

    # -- requests ------------------------------------------------------------------

    async def _ping(self, conn: Connection, request: Ping, requests: trio.Nursery) -> None:
        conn.send(pong_frame(request.id))

    async def _find(self, conn: Connection, thread_id: str) -> ThreadRecord:
        return await self.storage.find_thread(conn.tenant, thread_id)

    async def _join(self, conn: Connection, request: JoinThread, requests: trio.Nursery) -> None:
        # Inline, not spawned: a client may pipeline join_thread and
        # user_message, and the join must take effect first.
        if not self.hub.has_joined(conn, request.thread_id):
            thread = await self._find(conn, request.thread_id)
            conn.threads[thread.thread_id] = thread
            self.hub.join(conn, thread.thread_id)
        conn.send(encode({"type": "joined", "re": request.id, "thread_id": request.thread_id}))

    async def _leave(self, conn: Connection, request: LeaveThread, requests: trio.Nursery) -> None:
        if not self.hub.has_joined(conn, request.thread_id):
            # Not joined: still `left`, but only for a thread of this tenant.
            await self._find(conn, request.thread_id)
            self._refuse_unjoined(request, "leave_thread")
        self.hub.leave(conn, request.thread_id)
        conn.send(encode({"type": "left", "re": request.id, "thread_id": request.thread_id}))

    async def _user_message(
        self, conn: Connection, request: UserMessage, requests: trio.Nursery
    ) -> None:
        thread = conn.threads.get(request.thread_id)
        if thread is not None and self.hub.has_joined(conn, request.thread_id):
            assert self._scheduler is not None
            # Queued synchronously, before the next frame is read: turns of a
            # thread run in the order their messages arrived.
            self._scheduler.submit(conn, request, thread)
            return
        self._spawn(conn, requests, self._not_joined, request)

    async def _not_joined(self, conn: Connection, request: UserMessage) -> None:
        await self._find(conn, request.thread_id)  # not_found first, for foreign threads
        self._refuse_unjoined(request, "user_message")

    def _refuse_unjoined(self, request: Request, request_type: str) -> None:
        """`bad_request` for a request on a thread of the tenant this connection has not joined,
        where the hub says that request needs a join."""
        if self.hub.needs_join(request_type):
            raise ProtocolError(
                BAD_REQUEST, "Join the thread (join_thread) before this request.", request.id
            )

    async def _start_agent(
        self, conn: Connection, request: StartAgent, requests: trio.Nursery
    ) -> None:
        self._spawn(conn, requests, self._start_agent_task, request)

    async def _start_agent_task(self, conn: Connection, request: StartAgent) -> None:
        began = trio.current_time()
        await self.agent.start()
        thread = await self.storage.create_thread(
            conn.tenant, conn.user, request.assistant, request.instructions
        )
        conn.threads[thread.thread_id] = thread
        self.hub.join(conn, thread.thread_id)
        conn.send(
            encode(
                {
                    "type": "agent_started",
                    "re": request.id,
                    "agent_id": thread.agent_id,
                    "assistant_id": thread.assistant_id,
                    "thread_id": thread.thread_id,
                    "startup_ms": round(self.agent.elapsed_ms(began), 3),
                }
            )
        )

    async def _history(self, conn: Connection, request: GetHistory, requests: trio.Nursery) -> None:
        self._spawn(conn, requests, self._history_task, request)

    async def _history_task(self, conn: Connection, request: GetHistory) -> None:
        thread = await self._find(conn, request.thread_id)
        if not self.hub.has_joined(conn, thread.thread_id):
            self._refuse_unjoined(request, "get_history")
        messages = await self.storage.history(thread, request.limit)
        conn.send(
            encode(
                {
                    "type": "history",
                    "re": request.id,
                    "thread_id": thread.thread_id,
                    "messages": [m.to_wire() for m in messages],
                }
            )
        )

    async def _list_threads(
        self, conn: Connection, request: ListThreads, requests: trio.Nursery
    ) -> None:
        self._spawn(conn, requests, self._list_threads_task, request)

    async def _list_threads_task(self, conn: Connection, request: ListThreads) -> None:
        threads = await self.storage.list_threads(conn.tenant)
        conn.send(
            encode(
                {
                    "type": "threads",
                    "re": request.id,
                    "threads": [
                        {
                            "thread_id": t.thread_id,
                            "assistant": t.assistant,
                            "created_at": t.created_at,
                            "message_count": t.message_count,
                        }
                        for t in threads
                    ],
                }
            )
        )
