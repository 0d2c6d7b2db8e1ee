"""Turns: one at a time per thread, in arrival order, owned by the server.

A turn is: commit the user message, `ack`, fan out `thread_message`, stream
the agent's chunks, commit the reply, send `agent_response`. A message that
arrives while its thread's previous turn is still running waits for it, so
it is committed (and acked) only after the previous reply is committed and
history alternates user message, reply.

Turns run in the server's nursery, not the connection's: a requester that
disconnects does not cancel its turn, and the reply is stored regardless.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import attrs
import trio

from .agent import Agent
from .connection import Connection
from .hub import Hub, Subscription
from .protocol import INTERNAL, UserMessage, encode, error_frame
from .storage import MessageRecord, Storage, ThreadRecord, Unanswered

log = logging.getLogger("agentserver.turns")


@attrs.define(eq=False)
class _ThreadTurns:
    busy: bool = False
    """A turn of this thread is running (or has been handed to a waiter)."""
    waiters: deque[trio.Event] = attrs.field(factory=deque)
    """Turns waiting, oldest first; setting one hands it the thread."""


class TurnScheduler:
    def __init__(self, storage: Storage, hub: Hub, agent: Agent, nursery: trio.Nursery) -> None:
        self._storage = storage
        self._hub = hub
        self._agent = agent
        self._nursery = nursery
        self._threads: dict[str, _ThreadTurns] = {}

    # -- queueing ----------------------------------------------------------

    def submit(self, conn: Connection, request: UserMessage, thread: ThreadRecord) -> None:
        """Queue a turn; called synchronously on arrival, so arrival order is turn order."""
        ticket = self._enqueue(thread.thread_id)
        conn.in_flight += 1
        self._nursery.start_soon(self._run, conn, request, thread, ticket)

    def _enqueue(self, thread_id: str) -> trio.Event | None:
        """None when the thread is free (and now ours), else the event that hands it over."""
        state = self._threads.get(thread_id)
        if state is None:
            state = self._threads[thread_id] = _ThreadTurns()
        if not state.busy:
            state.busy = True
            return None
        ticket = trio.Event()
        state.waiters.append(ticket)
        return ticket

    async def _wait_turn(self, thread_id: str, ticket: trio.Event) -> None:
        try:
            await ticket.wait()
        except BaseException:
            # Cancelled (server shutting down) while waiting: if the thread
            # was just handed to us, pass it on, else just leave the queue.
            if ticket.is_set():
                self._release(thread_id)
            else:
                self._threads[thread_id].waiters.remove(ticket)
            raise

    def _release(self, thread_id: str) -> None:
        state = self._threads[thread_id]
        if state.waiters:
            # Hand over directly (busy stays set), so a message arriving right
            # now cannot overtake the ones already waiting.
            state.waiters.popleft().set()
        else:
            del self._threads[thread_id]

    # -- running -----------------------------------------------------------

    async def _run(
        self,
        conn: Connection,
        request: UserMessage,
        thread: ThreadRecord,
        ticket: trio.Event | None,
    ) -> None:
        try:
            if ticket is not None:
                await self._wait_turn(thread.thread_id, ticket)
            try:
                await self._turn(conn, request, thread, waited=ticket is not None)
            finally:
                self._release(thread.thread_id)
        except Exception:
            log.exception("turn on thread %s failed", thread.thread_id)
            conn.send(error_frame(INTERNAL, "The server failed to complete this turn.", request.id))
        finally:
            conn.in_flight -= 1

    async def _turn(
        self, conn: Connection, request: UserMessage, thread: ThreadRecord, waited: bool
    ) -> None:
        thread_id, re = thread.thread_id, request.id
        message = await self._storage.add_user_message(thread, conn.user, request.content)
        conn.send(
            encode(
                {"type": "ack", "re": re, "thread_id": thread_id, "message_id": message.message_id}
            )
        )
        others = self._watchers(conn, thread_id)
        self._fan_out(others, thread_id, encode(self._copy_of_message(conn, thread_id, message)))
        text = await self._stream(conn, others, request, thread_id)
        reply = await self._storage.add_reply(thread, message.message_id, text)
        self._deliver_response(conn, others, reply, re, waited)

    def _copy_of_message(
        self, conn: Connection, thread_id: str, message: MessageRecord
    ) -> dict[str, Any]:
        """The watchers' copy of the user's message (`thread_message`)."""
        return {
            "type": "thread_message",
            "thread_id": thread_id,
            "message_id": message.message_id,
            "role": "user",
            "user": conn.user,
            "content": message.content,
        }

    def _watchers(self, conn: Connection, thread_id: str) -> list[Subscription]:
        """Who receives the turn's fan-out: the thread's subscriptions when the turn begins, but
        the requester's own. Each frame then goes to those still joined without a break
        (`_fan_out`)."""
        return [s for s in self._hub.subscribers(thread_id) if s[0] is not conn]

    async def _stream(
        self, conn: Connection, others: list[Subscription], request: UserMessage, thread_id: str
    ) -> str:
        """Run the agent, sending each chunk as it comes (`_send_chunk`); returns the reply's text."""
        seq = 0

        def emit(delta: str) -> None:
            nonlocal seq
            self._send_chunk(
                conn,
                others,
                {
                    "type": "agent_chunk",
                    "re": request.id,
                    "thread_id": thread_id,
                    "seq": seq,
                    "delta": delta,
                },
            )
            seq += 1

        return await self._agent.stream(request.content, emit)

    def _send_chunk(
        self, conn: Connection, others: list[Subscription], frame: dict[str, Any]
    ) -> None:
        """One chunk: to the requester with `re`, and to the watchers without."""
        conn.send(encode(frame))
        if others:
            del frame["re"]
            self._fan_out(others, frame["thread_id"], encode(frame))

    def _fan_out(self, others: list[Subscription], thread_id: str, frame: str) -> None:
        receives = self._hub.receives
        for other in others:
            if receives(other, thread_id):
                other[0].send(frame)

    def _deliver_response(
        self,
        conn: Connection,
        others: list[Subscription],
        reply: MessageRecord,
        re: str,
        waited: bool,
    ) -> None:
        frame = {
            "type": "agent_response",
            "re": re,
            "thread_id": reply.thread_id,
            "message_id": reply.message_id,
            "content": reply.content,
        }
        conn.send(encode(frame))
        if others:
            del frame["re"]
            self._fan_out(others, reply.thread_id, encode(frame))


def answer_unanswered(storage: Storage, agent: Agent) -> int:
    """Store a reply for every user message left without one (start-up, before serving).

    Nobody is connected yet, so the reply is written directly rather than
    streamed; one-turn-at-a-time means only a thread's last message can be
    unanswered, so the reply still lands right after its message.
    """
    pending: list[Unanswered] = storage.unanswered()
    if pending:
        storage.store_replies([(item, agent.reply_text(item.message.content)) for item in pending])
        log.warning("answered %d user messages left without a reply", len(pending))
    return len(pending)
