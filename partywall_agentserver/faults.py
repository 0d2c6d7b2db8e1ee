"""Planted faults: small named modifiers that each swap one server component.

Each modifier takes the server's `Components` and returns them with one
class replaced by a subclass carrying a realistic bug, the kind a tired
engineer writes. The request path never asks which fault is on: it just
calls the component it was given. ARCHITECTURE.md lists which invariant of
the suite must catch each fault; `tests/server/test_faults.py` shows each
bug directly.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from .agent import Agent
from .auth import Authenticator, Principal
from .connection import Connection
from .hub import Hub
from .protocol import TOO_LARGE, ProtocolError, RequestParser
from .server import Components
from .storage import MessageRecord, Storage, ThreadNotFound, ThreadRecord
from .turns import TurnScheduler

log = logging.getLogger("agentserver.faults")

Modifier = Callable[[Components], Components]


# -- isolation ---------------------------------------------------------------


class ForeignThreadLookupStorage(Storage):
    """Looks threads up by id alone: "ids are random, so who else could know one?"."""

    async def find_thread(self, tenant: str, thread_id: str) -> ThreadRecord:
        record = await self._load_thread(thread_id)
        if record is None:
            raise ThreadNotFound("No thread with that id exists for this tenant.")
        return record  # the tenant filter is missing


def foreign_thread_lookup(components: Components) -> Components:
    return attrs.evolve(components, storage=ForeignThreadLookupStorage)


class AssistantByNameStorage(Storage):
    """Finds an assistant by its name alone, as if names were global."""

    def _find_assistant(self, db: sqlite3.Connection, tenant: str, name: str) -> str | None:
        row = db.execute(
            "SELECT id FROM assistants WHERE name = ? ORDER BY rowid LIMIT 1", (name,)
        ).fetchone()
        return row[0] if row else None


def assistant_by_name(components: Components) -> Components:
    return attrs.evolve(components, storage=AssistantByNameStorage)


class NotFoundNamesOwnerStorage(Storage):
    """Tries to be helpful: says when a thread exists but belongs to someone else."""

    async def find_thread(self, tenant: str, thread_id: str) -> ThreadRecord:
        record = await self._load_thread(thread_id)
        if record is None:
            raise ThreadNotFound("No thread with that id exists for this tenant.")
        if record.tenant != tenant:
            raise ThreadNotFound("That thread belongs to another tenant.")
        return record


def not_found_names_owner(components: Components) -> Components:
    return attrs.evolve(components, storage=NotFoundNamesOwnerStorage)


class CaseInsensitiveUserAuthenticator(Authenticator):
    """Folds the case of user ids ("they are e-mail addresses, and people type them both ways")."""

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        principal = Authenticator.check_claims(claims, now)
        return None if principal is None else Principal(principal.tenant, principal.user.casefold())


def case_insensitive_user(components: Components) -> Components:
    return attrs.evolve(components, authenticator=CaseInsensitiveUserAuthenticator)


# -- routing -----------------------------------------------------------------


class StickySubscriptionHub(Hub):
    """`leave` updates the connection's own view but forgets the thread's subscriber set."""

    def leave(self, conn: Connection, thread_id: str) -> None:
        threads = self._joined.get(conn)
        if threads is not None:
            threads.discard(thread_id)


def sticky_subscription(components: Components) -> Components:
    return attrs.evolve(components, hub=StickySubscriptionHub)


# -- durability --------------------------------------------------------------

#: How often the lazy buffer is written.
LAZY_FLUSH_SECONDS: Final = 2.0


class LazyCommitStorage(Storage):
    """Buffers message writes and answers at once; a timer writes the buffer every 2 s.

    "Batching is faster", and it is, until SIGKILL takes the buffer along.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._buffer: list[Callable[[sqlite3.Connection], None]] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_every, LAZY_FLUSH_SECONDS)
            await super().serve(task_status=task_status)
            nursery.cancel_scope.cancel()  # the writer has stopped; so does the timer

    async def _flush_every(self, seconds: float) -> None:
        while True:
            await trio.sleep(seconds)
            buffered, self._buffer = self._buffer, []
            if buffered:

                def write_all(
                    db: sqlite3.Connection,
                    buffered: list[Callable[[sqlite3.Connection], None]] = buffered,
                ) -> None:
                    for insert in buffered:
                        insert(db)

                await self.write(write_all)

    async def _store_message(
        self, tenant: str, record: MessageRecord, reply_to: str | None
    ) -> None:
        self._buffer.append(self._message_writer(record, reply_to))


def lazy_commit(components: Components) -> Components:
    return attrs.evolve(components, storage=LazyCommitStorage)


# -- exactly once --------------------------------------------------------------


class QueuedTurnDoubleReplyScheduler(TurnScheduler):
    """A queued turn is delivered by the normal path and again by the queue's own path."""

    def _deliver_response(
        self,
        conn: Connection,
        others: list[Connection],
        reply: MessageRecord,
        re: str,
        waited: bool,
    ) -> None:
        super()._deliver_response(conn, others, reply, re, waited)
        if waited:
            super()._deliver_response(conn, others, reply, re, waited)


def queued_turn_double_reply(components: Components) -> Components:
    return attrs.evolve(components, scheduler=QueuedTurnDoubleReplyScheduler)


# -- ordering ----------------------------------------------------------------


class HistoryByIdStorage(Storage):
    """Orders history by message id, which looks sequential but is random."""

    _HISTORY_SQL = (
        "SELECT id, thread_id, role, user_id, content, created_at FROM messages"
        " WHERE thread_id = ? ORDER BY id"
    )
    _HISTORY_TAIL_SQL = (
        "SELECT id, thread_id, role, user_id, content, created_at FROM messages"
        " WHERE thread_id = ? ORDER BY id DESC LIMIT ?"
    )


def history_by_id(components: Components) -> Components:
    return attrs.evolve(components, storage=HistoryByIdStorage)


# -- liveness ----------------------------------------------------------------


class LostWakeupScheduler(TurnScheduler):
    """Marks the thread free when a turn ends but never wakes the turn waiting behind it."""

    def _release(self, thread_id: str) -> None:
        state = self._threads[thread_id]
        state.busy = False
        if not state.waiters:
            del self._threads[thread_id]


def lost_wakeup(components: Components) -> Components:
    return attrs.evolve(components, scheduler=LostWakeupScheduler)


# -- timing --------------------------------------------------------------------


class SerialStartupAgent(Agent):
    """Start-ups share one global lock ("the model loader is not thread-safe")."""

    _lock: trio.Lock | None = None

    async def start(self) -> float:
        if self._lock is None:
            self._lock = trio.Lock()
        began = trio.current_time()
        async with self._lock:
            await super().start()
        return (trio.current_time() - began) * 1000.0


def serial_startup(components: Components) -> Components:
    return attrs.evolve(components, agent=SerialStartupAgent)


# -- protocol --------------------------------------------------------------------


class ContentLimitCodeParser(RequestParser):
    """Reports over-long content as `too_large`, the code meant for whole messages."""

    def check_content(self, content: str, request_id: str) -> None:
        try:
            super().check_content(content, request_id)
        except ProtocolError as exc:
            raise ProtocolError(TOO_LARGE, exc.message, exc.re) from None


def content_limit_code(components: Components) -> Components:
    return attrs.evolve(components, parser=ContentLimitCodeParser)


FAULTS: Final[dict[str, Modifier]] = {
    "foreign_thread_lookup": foreign_thread_lookup,
    "assistant_by_name": assistant_by_name,
    "not_found_names_owner": not_found_names_owner,
    "case_insensitive_user": case_insensitive_user,
    "sticky_subscription": sticky_subscription,
    "lazy_commit": lazy_commit,
    "queued_turn_double_reply": queued_turn_double_reply,
    "history_by_id": history_by_id,
    "lost_wakeup": lost_wakeup,
    "serial_startup": serial_startup,
    "content_limit_code": content_limit_code,
}


def install(name: str | None, components: Components | None = None) -> Components:
    """Components with the named fault installed (none for None); KeyError if unknown."""
    components = components or Components()
    if name is None:
        return components
    return FAULTS[name](components)
