"""One client connection: identity, in-flight count, and an outbox drained by a writer task.

Frames are queued without blocking, so a turn that streams to many
connections never waits for the slowest of them, and one writer task per
connection keeps frames in the order they were queued.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .storage import ThreadRecord

log = logging.getLogger("agentserver.connection")

#: Frames queued for a client that is not reading before we give up on it.
#: Generous, since one history can be one frame; a client this far behind is
#: closed (1008) rather than allowed to grow the server's memory without end.
MAX_OUTBOX: Final = 10_000


@attrs.frozen
class _Close:
    code: int
    reason: str


@attrs.define(eq=False)
class Connection:
    connection_id: str
    """Opaque random id, sent in `welcome`."""
    tenant: str
    user: str
    ws: WebSocketConnection
    threads: dict[str, ThreadRecord] = attrs.field(factory=dict)
    """Records of the threads this connection joined (membership itself is the hub's)."""
    in_flight: int = 0
    """Requests received whose final reply is not yet queued."""
    closed: bool = False
    """Set once the connection is closing: nothing more is queued for it."""
    _outbox: deque[str | _Close] = attrs.field(factory=deque)
    _waiting: trio.Event | None = None
    _writer_done: trio.Event = attrs.field(factory=trio.Event)

    def send(self, frame: str) -> None:
        """Queue a frame; frames for a closed connection are dropped, never rerouted."""
        if self.closed:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            log.warning("connection %s is not reading; closing it", self.connection_id)
            self._outbox.clear()
            self.close(1008, "client is not reading its frames")
            return
        self._outbox.append(frame)
        if self._waiting is not None:
            self._waiting.set()

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already queued are sent."""
        if self.closed:
            return
        self._outbox.append(_Close(code, reason))
        self.closed = True
        if self._waiting is not None:
            self._waiting.set()

    async def wait_flushed(self) -> None:
        await self._writer_done.wait()

    async def serve_writer(self) -> None:
        """Send queued frames in order until closed."""
        try:
            while True:
                while not self._outbox:
                    self._waiting = trio.Event()
                    await self._waiting.wait()
                    self._waiting = None
                item = self._outbox.popleft()
                if isinstance(item, _Close):
                    await self.ws.aclose(item.code, item.reason)
                    return
                await self.ws.send_message(item)
        except ConnectionClosed:
            # The peer went away; its reader sees the same close and tears the
            # connection down. Nothing queued may go anywhere else.
            self.closed = True
        finally:
            self._writer_done.set()
