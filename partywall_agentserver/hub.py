"""Who is joined to which thread: membership and fan-out targets.

Two maps kept in step: a connection's own view of what it has joined (used
to allow `user_message` and to clean up on disconnect) and each thread's
subscribers (used for fan-out). Everything runs on the event loop thread, so
no locking.

Each subscription carries a number of its own, new at every join: a turn
snapshots the (connection, number) pairs when it begins and sends each frame
only to those whose number is still current, so a connection that leaves and
joins again while a turn streams gets that turn's frames from the next turn
on (PROTOCOL.md: "joined without a break since").
"""

from __future__ import annotations

import itertools

from .connection import Connection
from .storage import new_id

#: A subscription as a turn snapshots it: the connection and its join's number.
Subscription = tuple[Connection, int]


class Hub:
    def __init__(self) -> None:
        self._subscribers: dict[str, dict[Connection, int]] = {}
        self._joined: dict[Connection, set[str]] = {}
        self._numbers = itertools.count()

    def join(self, conn: Connection, thread_id: str) -> None:
        self._joined.setdefault(conn, set()).add(thread_id)
        subscribers = self._subscribers.setdefault(thread_id, {})
        if conn not in subscribers:  # joining again while joined is no break
            subscribers[conn] = next(self._numbers)

    def leave(self, conn: Connection, thread_id: str) -> None:
        threads = self._joined.get(conn)
        if threads is not None:
            threads.discard(thread_id)
        self._unsubscribe(conn, thread_id)

    def _unsubscribe(self, conn: Connection, thread_id: str) -> None:
        subscribers = self._subscribers.get(thread_id)
        if subscribers is not None:
            subscribers.pop(conn, None)
            if not subscribers:
                del self._subscribers[thread_id]

    #: Requests that need the connection to have joined the thread they name (PROTOCOL.md:
    #: `user_message` does; `get_history` and `leave_thread` do not).
    NEEDS_JOIN: frozenset[str] = frozenset({"user_message"})

    def needs_join(self, request_type: str) -> bool:
        """Whether a request of this type is refused (`bad_request`) on a thread not joined."""
        return request_type in self.NEEDS_JOIN

    @staticmethod
    def new_connection_id(tenant: str, user: str) -> str:
        """The id of a new connection of ``user`` of ``tenant``: opaque, random, never reused."""
        return new_id()

    def has_joined(self, conn: Connection, thread_id: str) -> bool:
        """Whether `conn` may post to the thread."""
        threads = self._joined.get(conn)
        return threads is not None and thread_id in threads

    def receives(self, subscription: Subscription, thread_id: str) -> bool:
        """Whether fan-out of the thread still goes to a subscription a turn snapshotted."""
        conn, number = subscription
        return self._subscribers.get(thread_id, {}).get(conn) == number

    def subscribers(self, thread_id: str) -> list[Subscription]:
        """A snapshot of the thread's subscriptions (a turn takes one when it begins)."""
        return list(self._subscribers.get(thread_id, {}).items())

    def connections(self) -> list[Connection]:
        """Every open connection that has joined a thread, in the order each first joined one."""
        return list(self._joined)

    def drop(self, conn: Connection) -> None:
        """Forget a closed connection everywhere."""
        for thread_id in self._joined.pop(conn, ()):
            self._unsubscribe(conn, thread_id)
