"""Who is joined to which thread: membership and fan-out targets.

Two maps kept in step: a connection's own view of what it has joined (used
to allow `user_message` and to clean up on disconnect) and each thread's
subscribers (used for fan-out). Everything runs on the event loop thread, so
no locking.
"""

from __future__ import annotations

from .connection import Connection


class Hub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Connection]] = {}
        self._joined: dict[Connection, set[str]] = {}

    def join(self, conn: Connection, thread_id: str) -> None:
        self._joined.setdefault(conn, set()).add(thread_id)
        self._subscribers.setdefault(thread_id, set()).add(conn)

    def leave(self, conn: Connection, thread_id: str) -> None:
        threads = self._joined.get(conn)
        if threads is not None:
            threads.discard(thread_id)
        self._unsubscribe(conn, thread_id)

    def _unsubscribe(self, conn: Connection, thread_id: str) -> None:
        subscribers = self._subscribers.get(thread_id)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self._subscribers[thread_id]

    def has_joined(self, conn: Connection, thread_id: str) -> bool:
        """Whether `conn` may post to the thread."""
        threads = self._joined.get(conn)
        return threads is not None and thread_id in threads

    def receives(self, conn: Connection, thread_id: str) -> bool:
        """Whether fan-out of the thread goes to `conn` right now."""
        subscribers = self._subscribers.get(thread_id)
        return subscribers is not None and conn in subscribers

    def subscribers(self, thread_id: str) -> list[Connection]:
        """A snapshot of the thread's subscribers (a turn takes one when it begins)."""
        return list(self._subscribers.get(thread_id, ()))

    def drop(self, conn: Connection) -> None:
        """Forget a closed connection everywhere."""
        for thread_id in self._joined.pop(conn, ()):
            self._unsubscribe(conn, thread_id)
