"""Planted faults: small named modifiers that each swap one server component.

Each modifier takes the server's `Components` and returns them with one
class replaced by a subclass carrying a realistic bug, the kind a tired
engineer writes. The request path never asks which fault is on: it just
calls the component it was given. ARCHITECTURE.md lists which invariant of
the suite must catch each fault; `tests/server/test_faults.py` shows each
bug directly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import sqlite3
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import jwt
import trio

from .agent import Agent
from .auth import Authenticator, Principal, Refusal
from .connection import Connection
from .hub import Hub, Subscription
from .protocol import (
    BAD_REQUEST,
    MAX_CONTENT_BYTES,
    MAX_MESSAGE_BYTES,
    THREAD_NOT_FOUND_MESSAGE,
    TOO_LARGE,
    GetHistory,
    ProtocolError,
    Request,
    RequestParser,
    StartAgent,
    UserMessage,
    encode,
    error_frame,
    message_too_large,
)
from .server import TOO_LARGE_MESSAGE, Components, Shutdown, SizeGuard
from .storage import (
    MessageRecord,
    Storage,
    ThreadNotFound,
    ThreadRecord,
    ThreadSummary,
    new_id,
)
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


class AlgNoneAuthenticator(Authenticator):
    """Accepts unsigned tokens (`alg` "none"), a shortcut for local testing that shipped."""

    def verify(self, token: str) -> Principal | None:
        try:
            decoded = self._jws.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        if decoded["header"].get("alg") != "none":
            return super().verify(token)
        try:
            claims = json.loads(decoded["payload"])
        except (ValueError, RecursionError):
            return None
        return self.check_claims(claims, time.time()) if isinstance(claims, dict) else None


def alg_none(components: Components) -> Components:
    return attrs.evolve(components, authenticator=AlgNoneAuthenticator)


class ExpiredAcceptedAuthenticator(Authenticator):
    """Checks that `exp` is a number but never compares it with the clock."""

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        return Authenticator.check_claims(claims, -math.inf)


def expired_accepted(components: Components) -> Components:
    return attrs.evolve(components, authenticator=ExpiredAcceptedAuthenticator)


class AnyPathAuthenticator(Authenticator):
    """Leaves paths to the reverse proxy in front ("it only forwards /ws"), so every path of the server opens a connection."""

    @staticmethod
    def serves_path(target: str) -> bool:
        return True


def any_path_accepted(components: Components) -> Components:
    return attrs.evolve(components, authenticator=AnyPathAuthenticator)


class TokenBeforePathAuthenticator(Authenticator):
    """Authentication middleware runs before routing: a bad token on any path gets 401, so the
    status tells a caller without a token which paths exist behind the auth wall."""

    def admit(self, target: str, headers: Sequence[tuple[bytes, bytes]]) -> Principal | Refusal:
        token = self.token_from(headers, target)
        if token is None or self.verify(token) is None:
            return Refusal(401)
        return super().admit(target, headers)


def token_before_path(components: Components) -> Components:
    return attrs.evolve(components, authenticator=TokenBeforePathAuthenticator)


class RefusalSaysWhyAuthenticator(Authenticator):
    """A refused token's 401 says why in its body ("helpful for client developers"): which
    check failed tells an attacker how close a forged token came."""

    def admit(self, target: str, headers: Sequence[tuple[bytes, bytes]]) -> Principal | Refusal:
        admitted = super().admit(target, headers)
        if isinstance(admitted, Refusal) and admitted.status == 401:
            token = self.token_from(headers, target)
            why = "no bearer token" if token is None else "token rejected: signature, algorithm, exp or claims"
            return Refusal(401, why.encode() + b"\n")
        return admitted


def refusal_says_why(components: Components) -> Components:
    return attrs.evolve(components, authenticator=RefusalSaysWhyAuthenticator)


class ExpWholeSecondsAuthenticator(Authenticator):
    """Compares `exp` in whole seconds, as PyJWT does (``int(exp) <= now`` is expired): a token
    in the last fraction of its final second is refused while it is still valid."""

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        exp = claims.get("exp")
        if isinstance(exp, float) and math.isfinite(exp) and int(exp) <= now:
            return None
        return Authenticator.check_claims(claims, now)


def exp_whole_seconds(components: Components) -> Components:
    return attrs.evolve(components, authenticator=ExpWholeSecondsAuthenticator)


class QueryWinsAuthenticator(Authenticator):
    """Reads `?token=` first ("the browser client's way") and the Authorization header only when there is none."""

    @staticmethod
    def token_from(headers: Sequence[tuple[bytes, bytes]], target: str) -> str | None:
        from_query = Authenticator.token_from((), target)
        return from_query if from_query is not None else Authenticator.token_from(headers, "")


def query_wins(components: Components) -> Components:
    return attrs.evolve(components, authenticator=QueryWinsAuthenticator)


class BearerCaseSensitiveAuthenticator(Authenticator):
    """Takes the token only after exactly ``Bearer ``, as a prefix test does: the scheme name is
    case-insensitive, so ``bearer`` and ``BEARER`` are refused wrongly."""

    @staticmethod
    def token_from(headers: Sequence[tuple[bytes, bytes]], target: str) -> str | None:
        token = Authenticator.token_from(headers, target)
        auth = [value for name, value in headers if name.lower() == b"authorization"]
        if auth and not auth[0].startswith(b"Bearer "):
            return None
        return token


def bearer_case_sensitive(components: Components) -> Components:
    return attrs.evolve(components, authenticator=BearerCaseSensitiveAuthenticator)


class ExpOptionalAuthenticator(Authenticator):
    """Checks `exp` only when the token has one, as PyJWT does by default: a token without
    `exp` never expires, and the protocol requires the claim."""

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        if "exp" in claims:
            return Authenticator.check_claims(claims, now)
        return Authenticator.check_claims({**claims, "exp": now + 1.0}, now)  # as if still valid


def exp_optional(components: Components) -> Components:
    return attrs.evolve(components, authenticator=ExpOptionalAuthenticator)


class ClaimsCoercedAuthenticator(Authenticator):
    """Reads `tid` and `sub` with ``str()`` ("user ids come from the identity provider's table,
    which numbers them"): a user id sent as the number 1234567 is accepted as the string
    "1234567", though an id is a string and a claim that is not one is invalid."""

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        coerced = {key: str(value) if key in ("tid", "sub") and isinstance(value, (int, float)) else value
                   for key, value in claims.items()}
        return Authenticator.check_claims(coerced, now)


def claims_coerced(components: Components) -> Components:
    return attrs.evolve(components, authenticator=ClaimsCoercedAuthenticator)


class OtherClaimsCheckedAuthenticator(Authenticator):
    """Also checks the registered claims a JWT library checks by default (PyJWT's ``jwt.decode``
    with no options): a token naming an audience the server does not expect, or whose `nbf` or
    `iat` is still to come, is refused. Tokens from an identity provider carry all three; the
    protocol says other claims are ignored."""

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        if claims.get("aud"):
            return None  # "Invalid audience": none was configured
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > now:
                return None  # "The token is not yet valid"
        return Authenticator.check_claims(claims, now)


def other_claims_checked(components: Components) -> Components:
    return attrs.evolve(components, authenticator=OtherClaimsCheckedAuthenticator)


class QuerySkipsExpAuthenticator(Authenticator):
    """Checks a token from `?token=` without its expiry ("query tokens come from short-lived
    links"), where a header's is checked in full: an expired token opens through the query."""

    def admit(self, target: str, headers: Sequence[tuple[bytes, bytes]]) -> Principal | Refusal:
        admitted = super().admit(target, headers)
        from_query = not any(name.lower() == b"authorization" for name, _ in headers)
        if not isinstance(admitted, Refusal) or admitted.status != 401 or not from_query:
            return admitted
        token = self.token_from(headers, target)
        try:
            claims = jwt.decode(token or "", self._secret, algorithms=["HS256"], options={"verify_exp": False})
        except jwt.PyJWTError:
            return admitted
        principal = self.check_claims({**claims, "exp": time.time() + 1.0}, time.time())
        return admitted if principal is None else principal


def query_skips_exp(components: Components) -> Components:
    return attrs.evolve(components, authenticator=QuerySkipsExpAuthenticator)


class ClaimsAnyStringAuthenticator(Authenticator):
    """Takes any non-empty string as a tenant or user id: a claim with whitespace, a control
    character or more than 64 code points opens a connection under that id."""

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        tenant, user = claims.get("tid"), claims.get("sub")
        if not (isinstance(tenant, str) and tenant and isinstance(user, str) and user):
            return None
        checked = Authenticator.check_claims({**claims, "tid": "t", "sub": "u"}, now)  # exp as before
        return None if checked is None else Principal(tenant, user)


def claims_any_string(components: Components) -> Components:
    return attrs.evolve(components, authenticator=ClaimsAnyStringAuthenticator)


class ListAllTenantsStorage(Storage):
    """`list_threads` forgets its tenant filter and lists every thread on the server."""

    async def list_threads(self, tenant: str) -> list[ThreadSummary]:
        def load(db: sqlite3.Connection) -> list[ThreadSummary]:
            rows = db.execute(
                "SELECT t.id, a.name, t.created_at,"
                " (SELECT COUNT(*) FROM messages m WHERE m.thread_id = t.id)"
                " FROM threads t JOIN assistants a ON a.id = t.assistant_id"
                " ORDER BY t.rowid"
            ).fetchall()
            return [ThreadSummary(*row) for row in rows]

        return await self.read(load)


def list_all_tenants(components: Components) -> Components:
    return attrs.evolve(components, storage=ListAllTenantsStorage)


class CurrentTenantStorage(Storage):
    """Keeps the tenant of the request it serves on the storage object ("the current tenant"),
    set by every call that names one, as code written for one request at a time does.
    `list_threads` counts the tenant's threads first, then lists "the current tenant's": a
    request of another tenant that came in during the count has changed it."""

    current_tenant: str | None = None

    async def find_thread(self, tenant: str, thread_id: str) -> ThreadRecord:
        self.current_tenant = tenant
        return await super().find_thread(tenant, thread_id)

    async def create_thread(
        self, tenant: str, user: str, assistant: str, instructions: str | None
    ) -> ThreadRecord:
        self.current_tenant = tenant
        return await super().create_thread(tenant, user, assistant, instructions)

    async def list_threads(self, tenant: str) -> list[ThreadSummary]:
        self.current_tenant = tenant
        await self.read(lambda db: db.execute("SELECT COUNT(*) FROM threads WHERE tenant = ?", (tenant,)).fetchone())
        return await super().list_threads(self.current_tenant)


def current_tenant_race(components: Components) -> Components:
    return attrs.evolve(components, storage=CurrentTenantStorage)


class TenantNocaseStorage(Storage):
    """Compares tenant ids without case, as a column with a case-insensitive collation does
    (MySQL's default): tenants `acme` and `Acme` read each other's threads."""

    async def find_thread(self, tenant: str, thread_id: str) -> ThreadRecord:
        record = await self._load_thread(thread_id)
        if record is None or record.tenant.lower() != tenant.lower():
            raise ThreadNotFound(THREAD_NOT_FOUND_MESSAGE)
        return record

    async def list_threads(self, tenant: str) -> list[ThreadSummary]:
        alike = await self.read(lambda db: [row[0] for row in db.execute(
            "SELECT DISTINCT tenant FROM threads WHERE tenant = ? COLLATE NOCASE", (tenant,))])
        listed = []
        for one in alike or [tenant]:
            listed += await super().list_threads(one)
        return listed


def tenant_nocase(components: Components) -> Components:
    return attrs.evolve(components, storage=TenantNocaseStorage)


# -- routing -----------------------------------------------------------------


class StickySubscriptionHub(Hub):
    """`leave` updates the connection's own view but forgets the thread's subscriber set."""

    def leave(self, conn: Connection, thread_id: str) -> None:
        threads = self._joined.get(conn)
        if threads is not None:
            threads.discard(thread_id)


def sticky_subscription(components: Components) -> Components:
    return attrs.evolve(components, hub=StickySubscriptionHub)


class LeaveOnlyMutesHub(Hub):
    """`leave_thread` stops the thread's fan-out to the connection, but the connection may still post
    to it ("leaving mutes a thread")."""

    def leave(self, conn: Connection, thread_id: str) -> None:
        self._unsubscribe(conn, thread_id)


def leave_only_mutes(components: Components) -> Components:
    return attrs.evolve(components, hub=LeaveOnlyMutesHub)


class EchoToRequesterScheduler(TurnScheduler):
    """A turn fans out to every subscriber of the thread, the requester's own connection included."""

    def _watchers(self, conn: Connection, thread_id: str) -> list[Subscription]:
        return self._hub.subscribers(thread_id)  # "the client ignores its own echo"


def echo_to_requester(components: Components) -> Components:
    return attrs.evolve(components, scheduler=EchoToRequesterScheduler)


class StreamStopsUnheardScheduler(TurnScheduler):
    """Stops sending a turn once its requester's connection is gone ("nobody is listening"): the
    agent still runs and the reply is stored, but the thread's watchers get no more of the turn."""

    def _send_chunk(self, conn: Connection, others: list[Subscription], frame: dict[str, Any]) -> None:
        if not conn.closed:
            super()._send_chunk(conn, others, frame)

    def _deliver_response(
        self, conn: Connection, others: list[Subscription], reply: MessageRecord, re: str, waited: bool
    ) -> None:
        if not conn.closed:
            super()._deliver_response(conn, others, reply, re, waited)


def stream_stops_unheard(components: Components) -> Components:
    return attrs.evolve(components, scheduler=StreamStopsUnheardScheduler)


class RejoinUnsubscribedHub(Hub):
    """Subscribes a connection to a thread's fan-out at its first join only ("it is already on the
    list"), while leaving takes it off: a connection that leaves and joins again may post to the
    thread, but never receives another turn of it."""

    def __init__(self) -> None:
        super().__init__()
        self._ever: dict[Connection, set[str]] = {}

    def join(self, conn: Connection, thread_id: str) -> None:
        ever = self._ever.setdefault(conn, set())
        if thread_id in ever:
            self._joined.setdefault(conn, set()).add(thread_id)
            return
        ever.add(thread_id)
        super().join(conn, thread_id)

    def drop(self, conn: Connection) -> None:
        self._ever.pop(conn, None)
        super().drop(conn)


def rejoin_unsubscribed(components: Components) -> Components:
    return attrs.evolve(components, hub=RejoinUnsubscribedHub)


class FanoutSkipsOwnUserScheduler(TurnScheduler):
    """Leaves the requester's user out of the fan-out ("her other device already shows what she
    typed"): a second device of the same user, joined to the thread, never sees the turn."""

    def _watchers(self, conn: Connection, thread_id: str) -> list[Subscription]:
        return [s for s in super()._watchers(conn, thread_id) if (s[0].tenant, s[0].user) != (conn.tenant, conn.user)]


def fanout_skips_own_user(components: Components) -> Components:
    return attrs.evolve(components, scheduler=FanoutSkipsOwnUserScheduler)


class WatchersMissChunksScheduler(TurnScheduler):
    """Streams chunks to the requester only ("watchers only need the finished reply; streaming to
    every tab costs bandwidth"): the watchers get the thread_message and the agent_response, and
    none of the chunks between them."""

    def _send_chunk(self, conn: Connection, others: list[Subscription], frame: dict[str, Any]) -> None:
        conn.send(encode(frame))


def watchers_miss_chunks(components: Components) -> Components:
    return attrs.evolve(components, scheduler=WatchersMissChunksScheduler)


class LeaveStopsOwnTurnScheduler(TurnScheduler):
    """Sends a turn's frames to the requester only while it is joined ("a thread's frames go to its
    members"): a requester that leaves during its own turn never gets the rest of it."""

    def _send_chunk(self, conn: Connection, others: list[Subscription], frame: dict[str, Any]) -> None:
        if self._hub.has_joined(conn, frame["thread_id"]):
            super()._send_chunk(conn, others, frame)
        elif others:
            del frame["re"]
            self._fan_out(others, frame["thread_id"], encode(frame))

    def _deliver_response(
        self, conn: Connection, others: list[Subscription], reply: MessageRecord, re: str, waited: bool
    ) -> None:
        if self._hub.has_joined(conn, reply.thread_id):
            super()._deliver_response(conn, others, reply, re, waited)
        elif others:
            frame = {"type": "agent_response", "thread_id": reply.thread_id, "message_id": reply.message_id,
                     "content": reply.content}
            self._fan_out(others, reply.thread_id, encode(frame))


def leave_stops_own_turn(components: Components) -> Components:
    return attrs.evolve(components, scheduler=LeaveStopsOwnTurnScheduler)


class FanoutTrimsContentScheduler(TurnScheduler):
    """Trims the watchers' copy of a user's message ("tidy whitespace for display"): it no longer
    equals what the user sent and what history stores."""

    def _copy_of_message(self, conn: Connection, thread_id: str, message: MessageRecord) -> dict[str, Any]:
        copy = super()._copy_of_message(conn, thread_id, message)
        copy["content"] = copy["content"].strip()
        return copy


def fanout_trims_content(components: Components) -> Components:
    return attrs.evolve(components, scheduler=FanoutTrimsContentScheduler)


class ReplyToFirstDeviceScheduler(TurnScheduler):
    """Streams a turn to the user rather than to the connection that asked ("so a user who
    reconnects mid-turn still gets the reply"): the hub is asked for the user's connection by
    tenant and user, and answers with the one that joined a thread first, which is another
    device of the same user when the user has two."""

    async def _turn(
        self, conn: Connection, request: UserMessage, thread: ThreadRecord, waited: bool
    ) -> None:
        device = next(
            (
                other
                for other in self._hub.connections()
                if (other.tenant, other.user) == (conn.tenant, conn.user) and not other.closed
            ),
            conn,
        )
        await super()._turn(device, request, thread, waited)


def reply_to_first_device(components: Components) -> Components:
    return attrs.evolve(components, scheduler=ReplyToFirstDeviceScheduler)


class StreamByRequestIdScheduler(TurnScheduler):
    """Keeps the streams of turns in a server-wide table keyed by the request's id ("a client that
    reconnects sends the id again and picks its stream up"), and sends each chunk and the reply
    to the connection the table names, forgetting the entry when the reply has gone. Ids are the
    client's own, so a message that reuses one on another connection while the first one's turn
    waits or streams (most clients count from 1) takes the rest of that turn."""

    def __init__(self, storage: Storage, hub: Hub, agent: Agent, nursery: trio.Nursery) -> None:
        super().__init__(storage, hub, agent, nursery)
        self._streams: dict[str, Connection] = {}

    def submit(self, conn: Connection, request: UserMessage, thread: ThreadRecord) -> None:
        self._streams[request.id] = conn
        super().submit(conn, request, thread)

    def _send_chunk(self, conn: Connection, others: list[Subscription], frame: dict[str, Any]) -> None:
        super()._send_chunk(self._streams.get(frame["re"], conn), others, frame)

    def _deliver_response(
        self, conn: Connection, others: list[Subscription], reply: MessageRecord, re: str, waited: bool
    ) -> None:
        super()._deliver_response(self._streams.pop(re, conn), others, reply, re, waited)


def stream_by_request_id(components: Components) -> Components:
    return attrs.evolve(components, scheduler=StreamByRequestIdScheduler)


class _NobodyListening(Exception):
    """The requester's connection is gone: the turn is given up."""


class AbandonUnheardScheduler(TurnScheduler):
    """Stops a turn whose requester has disconnected ("nobody is listening, so stop paying for
    tokens"): the agent stops at its next chunk and no reply is stored, though the message was
    acked and the turn had begun."""

    def _send_chunk(self, conn: Connection, others: list[Subscription], frame: dict[str, Any]) -> None:
        if conn.closed:
            raise _NobodyListening(frame["thread_id"])
        super()._send_chunk(conn, others, frame)

    async def _turn(self, conn: Connection, request: UserMessage, thread: ThreadRecord, waited: bool) -> None:
        try:
            await super()._turn(conn, request, thread, waited)
        except _NobodyListening:
            log.info("turn on thread %s abandoned: its requester is gone", thread.thread_id)


def abandon_unheard(components: Components) -> Components:
    return attrs.evolve(components, scheduler=AbandonUnheardScheduler)


class ConnectionIdPerUserHub(Hub):
    """Names a connection after its user (a session key reused as the connection id): a user's
    second device is welcomed with the first one's id."""

    @staticmethod
    def new_connection_id(tenant: str, user: str) -> str:
        return hashlib.sha256(f"{tenant}\0{user}".encode("utf-8", "surrogatepass")).hexdigest()[:22]


def connection_id_per_user(components: Components) -> Components:
    return attrs.evolve(components, hub=ConnectionIdPerUserHub)


class LiveMembershipHub(Hub):
    """Fan-out checks only that a connection is joined now, not that it has been since the turn began."""

    def receives(self, subscription: Subscription, thread_id: str) -> bool:
        return subscription[0] in self._subscribers.get(thread_id, {})


def rejoin_mid_turn(components: Components) -> Components:
    return attrs.evolve(components, hub=LiveMembershipHub)


class SlotKeyedHub(Hub):
    """Keys a thread's subscriptions by the connection's slot, a small number handed out lowest
    free first, as file descriptors are ("the fd is the connection"), and frees the slot when
    the connection closes without clearing the subscriptions filed under it: the next
    connection given that slot, of any tenant, receives the fan-out of threads it never joined."""

    def __init__(self) -> None:
        super().__init__()
        self._by_slot: dict[str, dict[int, int]] = {}
        self._slot_of: dict[Connection, int] = {}
        self._holder: dict[int, Connection] = {}

    def _slot(self, conn: Connection) -> int:
        slot = self._slot_of.get(conn)
        if slot is None:
            slot = next(n for n in itertools.count() if n not in self._holder)
            self._slot_of[conn], self._holder[slot] = slot, conn
        return slot

    def join(self, conn: Connection, thread_id: str) -> None:
        self._joined.setdefault(conn, set()).add(thread_id)
        subscribers = self._by_slot.setdefault(thread_id, {})
        slot = self._slot(conn)
        if slot not in subscribers:
            subscribers[slot] = next(self._numbers)

    def _unsubscribe(self, conn: Connection, thread_id: str) -> None:
        self._by_slot.get(thread_id, {}).pop(self._slot_of.get(conn, -1), None)

    def receives(self, subscription: Subscription, thread_id: str) -> bool:
        conn, number = subscription
        return self._by_slot.get(thread_id, {}).get(self._slot_of.get(conn, -1)) == number

    def subscribers(self, thread_id: str) -> list[Subscription]:
        return [(self._holder[slot], number) for slot, number in self._by_slot.get(thread_id, {}).items()
                if slot in self._holder]

    def drop(self, conn: Connection) -> None:
        self._joined.pop(conn, None)
        slot = self._slot_of.pop(conn, None)
        if slot is not None:
            del self._holder[slot]


def slot_reuse(components: Components) -> Components:
    return attrs.evolve(components, hub=SlotKeyedHub)


# -- durability --------------------------------------------------------------


class FirstAuthorStorage(Storage):
    """History names the thread's first author as the author of every user message, as a
    query that reads a per-thread author instead of the message's own does."""

    async def history(self, thread: ThreadRecord, limit: int | None) -> list[MessageRecord]:
        messages = await super().history(thread, limit)
        everything = messages if limit is None else await super().history(thread, None)
        first = next((m.user for m in everything if m.role == "user"), None)
        return [attrs.evolve(m, user=first) if m.role == "user" else m for m in messages]


def history_first_author(components: Components) -> Components:
    return attrs.evolve(components, storage=FirstAuthorStorage)


class ListedAssistantIdStorage(Storage):
    """`list_threads` names each thread's assistant by its id, not by its name."""

    async def list_threads(self, tenant: str) -> list[ThreadSummary]:
        threads = await super().list_threads(tenant)
        ids = dict(await self.read(lambda db: db.execute(
            "SELECT id, assistant_id FROM threads WHERE tenant = ?", (tenant,)).fetchall()))
        return [attrs.evolve(t, assistant=ids.get(t.thread_id, t.assistant)) for t in threads]


def listed_assistant_id(components: Components) -> Components:
    return attrs.evolve(components, storage=ListedAssistantIdStorage)

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


class LimitKeepsOldestStorage(Storage):
    """Applies `limit` by slicing history from the front: the oldest `limit` messages, not the newest."""

    async def history(self, thread: ThreadRecord, limit: int | None) -> list[MessageRecord]:
        messages = await super().history(thread, None)
        return messages if limit is None else messages[:limit]


def limit_keeps_oldest(components: Components) -> Components:
    return attrs.evolve(components, storage=LimitKeepsOldestStorage)


class LimitPlusOneStorage(Storage):
    """Reads one message more than `limit` (to tell the client whether there is more) and
    forgets to drop it: the newest `limit` + 1."""

    async def history(self, thread: ThreadRecord, limit: int | None) -> list[MessageRecord]:
        return await super().history(thread, None if limit is None else limit + 1)


def limit_plus_one(components: Components) -> Components:
    return attrs.evolve(components, storage=LimitPlusOneStorage)


class HistoryByAssistantStorage(Storage):
    """Reads a thread's history by its assistant ("the assistant's memory"), not by the thread:
    every thread of that assistant in the tenant shows the others' messages."""

    async def history(self, thread: ThreadRecord, limit: int | None) -> list[MessageRecord]:
        rows = await self.read(lambda db: db.execute(
            "SELECT id, thread_id, role, user_id, content, created_at FROM messages WHERE thread_id IN"
            " (SELECT id FROM threads WHERE assistant_id = ?) ORDER BY pos", (thread.assistant_id,)).fetchall())
        messages = [MessageRecord(*row) for row in rows]
        return messages if limit is None else messages[-limit:]


def history_by_assistant(components: Components) -> Components:
    return attrs.evolve(components, storage=HistoryByAssistantStorage)


class CountUserMessagesOnlyStorage(Storage):
    """`list_threads`' `message_count` counts user messages only, not the replies."""

    MESSAGE_COUNT_SQL = "(SELECT COUNT(*) FROM messages m WHERE m.thread_id = t.id AND m.role = 'user')"


def count_user_messages_only(components: Components) -> Components:
    return attrs.evolve(components, storage=CountUserMessagesOnlyStorage)


class CountPerAssistantStorage(Storage):
    """`message_count` counts the messages of every thread of the thread's assistant (the count
    joined on the assistant instead of the thread): one thread's count includes its siblings'."""

    MESSAGE_COUNT_SQL = ("(SELECT COUNT(*) FROM messages m JOIN threads s ON s.id = m.thread_id"
                         " WHERE s.assistant_id = t.assistant_id)")


def count_per_assistant(components: Components) -> Components:
    return attrs.evolve(components, storage=CountPerAssistantStorage)


class ThreadsNewestFirstStorage(Storage):
    """Lists a tenant's threads newest first ("the sidebar shows the recent ones on top")."""

    async def list_threads(self, tenant: str) -> list[ThreadSummary]:
        return list(reversed(await super().list_threads(tenant)))


def threads_newest_first(components: Components) -> Components:
    return attrs.evolve(components, storage=ThreadsNewestFirstStorage)


class AssistantIdIsAgentIdStorage(Storage):
    """Hands back a new thread's agent id in the assistant id's place (two fields of one record,
    mixed up), so one assistant seems to get a new id with every thread."""

    async def create_thread(self, tenant: str, user: str, assistant: str, instructions: str | None) -> ThreadRecord:
        record = await super().create_thread(tenant, user, assistant, instructions)
        return attrs.evolve(record, assistant_id=record.agent_id)


def assistant_id_is_agent_id(components: Components) -> Components:
    return attrs.evolve(components, storage=AssistantIdIsAgentIdStorage)


class AssistantCreateRaceStorage(Storage):
    """Looks the tenant's assistant up, then creates it in a step of its own when it is
    missing (check, then act, across an await): two start-ups of one new name at once both
    miss it, and the second insert breaks the (tenant, name) constraint (`internal`)."""

    async def create_thread(
        self, tenant: str, user: str, assistant: str, instructions: str | None
    ) -> ThreadRecord:
        found = await self.read(lambda db: self._find_assistant(db, tenant, assistant))
        if found is None:
            await self.write(lambda db: db.execute(
                "INSERT INTO assistants (id, tenant, name, instructions, created_at) VALUES (?, ?, ?, ?, ?)",
                (new_id(), tenant, assistant, instructions, self._clock())))
        return await super().create_thread(tenant, user, assistant, instructions)


def assistant_create_race(components: Components) -> Components:
    return attrs.evolve(components, storage=AssistantCreateRaceStorage)


class CreatedAtMillisStorage(Storage):
    """Stamps stored records in milliseconds since the epoch (`Date.now()`, as the web client does)."""

    def _clock(self) -> float:
        return time.time() * 1000.0


def created_at_millis(components: Components) -> Components:
    return attrs.evolve(components, storage=CreatedAtMillisStorage)


class CounterThreadIdsStorage(Storage):
    """Numbers threads from a server-wide counter ("short ids for the URLs"), carried on from the
    threads already stored: unique, but anyone can count another tenant's threads."""

    def open(self) -> None:
        super().open()
        db = sqlite3.connect(self.path)
        try:
            (stored,) = db.execute("SELECT COUNT(*) FROM threads").fetchone()
        finally:
            db.close()
        self._counter = itertools.count(int(stored) + 1)

    def _new_id(self, kind: str) -> str:
        return f"thread-{next(self._counter)}" if kind == "thread" else super()._new_id(kind)


def counter_thread_ids(components: Components) -> Components:
    return attrs.evolve(components, storage=CounterThreadIdsStorage)


class RecoveryUncommittedStorage(Storage):
    """Writes the replies a crash left owed in one transaction at start-up, but never commits it:
    the server's writer commits in `_commit`, and this start-up path was written without one, so
    closing the database rolls every recovery reply back (the log still says they were answered)."""

    def _end_recovery(self, db: sqlite3.Connection) -> None:
        pass  # no COMMIT: closing the connection rolls the replies back


def recovery_uncommitted(components: Components) -> Components:
    return attrs.evolve(components, storage=RecoveryUncommittedStorage)


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


class FinalReplyTrimmedAgent(Agent):
    """Tidies the finished reply (surrounding whitespace stripped) after its chunks went out
    as they were: the chunks' deltas no longer add up to the `agent_response` content."""

    async def stream(self, content: str, emit: Callable[[str], None]) -> str:
        return (await super().stream(content, emit)).strip()


def final_reply_trimmed(components: Components) -> Components:
    return attrs.evolve(components, agent=FinalReplyTrimmedAgent)


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


#: Upper bound of the per-chunk work each chunk task of `chunks_race` does before sending.
CHUNK_TASK_SECONDS: Final = 0.02


class ChunksRaceScheduler(TurnScheduler):
    """Sends each chunk from a task of its own ("a slow chunk must not hold up the stream"), so chunks overtake each other.

    Each chunk task does a little work of varying length before it sends (a
    moderation call, say; here up to 20 ms); the reply still goes last, once
    every chunk task of the turn has finished.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk_tasks: dict[str, trio.Nursery] = {}
        """The running turn's chunk tasks, by thread (a thread runs one turn at a time)."""

    async def _stream(
        self, conn: Connection, others: list[Subscription], request: UserMessage, thread_id: str
    ) -> str:
        async with trio.open_nursery() as chunk_tasks:
            self._chunk_tasks[thread_id] = chunk_tasks
            try:
                return await super()._stream(conn, others, request, thread_id)
            finally:
                del self._chunk_tasks[thread_id]

    def _send_chunk(
        self, conn: Connection, others: list[Subscription], frame: dict[str, Any]
    ) -> None:
        self._chunk_tasks[frame["thread_id"]].start_soon(self._send_later, conn, others, frame)

    async def _send_later(
        self, conn: Connection, others: list[Subscription], frame: dict[str, Any]
    ) -> None:
        await trio.sleep(random.uniform(0.0, CHUNK_TASK_SECONDS))
        super()._send_chunk(conn, others, frame)


def chunks_race(components: Components) -> Components:
    return attrs.evolve(components, scheduler=ChunksRaceScheduler)


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


class StartupInMicrosecondsAgent(Agent):
    """Converts the start-up's seconds with the factor for microseconds, so `startup_ms` says
    a thousand times what the start took."""

    @staticmethod
    def elapsed_ms(began: float) -> float:
        return (trio.current_time() - began) * 1_000_000.0


def startup_in_microseconds(components: Components) -> Components:
    return attrs.evolve(components, agent=StartupInMicrosecondsAgent)


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


class BlankContentRefusedParser(RequestParser):
    """Refuses a message that is empty or only whitespace ("nothing to answer"); the protocol
    says `content` may be empty."""

    def check_content(self, content: str, request_id: str) -> None:
        if not content.strip():
            raise ProtocolError(BAD_REQUEST, "`content` must not be blank.", request_id)
        super().check_content(content, request_id)


def blank_content_refused(components: Components) -> Components:
    return attrs.evolve(components, parser=BlankContentRefusedParser)


class UnknownTypeWithoutReParser(RequestParser):
    """Refuses an unknown `type` before it reads `id`: that `bad_request` carries no `re`."""

    def parse(self, message: str | bytes) -> Request:
        try:
            return super().parse(message)
        except ProtocolError as exc:
            if exc.message.startswith("Unknown request type"):
                raise ProtocolError(exc.code, exc.message) from None
            raise


def unknown_type_without_re(components: Components) -> Components:
    return attrs.evolve(components, parser=UnknownTypeWithoutReParser)


class ContentLimitInCharsParser(RequestParser):
    """Measures `content` in characters (`len`), not bytes of UTF-8: content of multi-byte
    characters over 16,384 bytes is accepted."""

    def check_content(self, content: str, request_id: str) -> None:
        if len(content) > MAX_CONTENT_BYTES:
            raise ProtocolError(BAD_REQUEST, f"`content` must be at most {MAX_CONTENT_BYTES} characters.", request_id)


def content_limit_in_chars(components: Components) -> Components:
    return attrs.evolve(components, parser=ContentLimitInCharsParser)


class AssistantNameTrimmedParser(RequestParser):
    """Trims the assistant's name before checking it ("users paste names with a newline"): a
    name with surrounding whitespace is accepted, and stored as another name than was sent."""

    def _start_agent(self, request_id: str, obj: dict[str, Any]) -> StartAgent:
        name = obj.get("assistant")
        return super()._start_agent(request_id, {**obj, "assistant": name.strip()} if isinstance(name, str) else obj)


def assistant_name_trimmed(components: Components) -> Components:
    return attrs.evolve(components, parser=AssistantNameTrimmedParser)


class NameLimitInBytesParser(RequestParser):
    """Measures the assistant's name in bytes of UTF-8 (a VARCHAR(64) column's limit): a name of
    64 code points, or fewer, that takes more than 64 bytes is refused."""

    def _start_agent(self, request_id: str, obj: dict[str, Any]) -> StartAgent:
        name = obj.get("assistant")
        if isinstance(name, str) and len(name.encode("utf-8", "surrogatepass")) > 64:
            raise ProtocolError(BAD_REQUEST, "`assistant` must be at most 64 bytes.", request_id)
        return super()._start_agent(request_id, obj)


def name_limit_in_bytes(components: Components) -> Components:
    return attrs.evolve(components, parser=NameLimitInBytesParser)


class RequestIdLimitInBytesParser(RequestParser):
    """Measures a request's `id` in bytes of UTF-8, as Go's ``len`` of a string does: an id of
    64 characters, or fewer, that takes more than 64 bytes is refused."""

    def check_id(self, request_id: str) -> None:
        if len(request_id.encode("utf-8", "surrogatepass")) > 64:
            raise ProtocolError(BAD_REQUEST, "`id` must be at most 64 bytes.", request_id)


def request_id_limit_in_bytes(components: Components) -> Components:
    return attrs.evolve(components, parser=RequestIdLimitInBytesParser)


class HistoryNeedsJoinHub(Hub):
    """Serves a thread's history only to connections that joined it ("members only"), a
    check the protocol does not make: `get_history` needs no join."""

    NEEDS_JOIN = frozenset({"user_message", "get_history"})


def history_needs_join(components: Components) -> Components:
    return attrs.evolve(components, hub=HistoryNeedsJoinHub)


class LeaveNeedsJoinHub(Hub):
    """Refuses to leave a thread the connection has not joined, as if that were a mistake;
    the protocol answers `left` all the same."""

    NEEDS_JOIN = frozenset({"user_message", "leave_thread"})


def leave_needs_join(components: Components) -> Components:
    return attrs.evolve(components, hub=LeaveNeedsJoinHub)


class VerboseErrorsParser(RequestParser):
    """Appends the exception's own text to `bad_request` messages ("more detail helps clients")."""

    def parse(self, message: str | bytes) -> Request:
        try:
            return super().parse(message)
        except ProtocolError as exc:
            cause = exc.__context__  # the JSON error, kept although raised `from None`
            if cause is None:
                raise
            detail = f"{exc.message} ({type(cause).__name__}: {cause})"
            raise ProtocolError(exc.code, detail, exc.re) from None


def verbose_errors(components: Components) -> Components:
    return attrs.evolve(components, parser=VerboseErrorsParser)


def _request_id(message: str | bytes) -> str | None:
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        return None
    request_id = obj.get("id") if isinstance(obj, dict) else None
    return request_id if isinstance(request_id, str) else None


class ParseBeforeSizeGuard(SizeGuard):
    """Reads the request's id before the size check (for the log line) and echoes it on `too_large`."""

    def refuse(self, conn: Connection, message: str | bytes) -> bool:
        request_id = _request_id(message)
        if not message_too_large(message):
            return False
        log.info("request %r is too large", request_id)
        conn.send(error_frame(TOO_LARGE, TOO_LARGE_MESSAGE, request_id))
        conn.close(1009, "message too big")
        return True


def parse_before_size(components: Components) -> Components:
    return attrs.evolve(components, size_guard=ParseBeforeSizeGuard)


class OversizeStaysOpenGuard(SizeGuard):
    """Sends `too_large` for an oversized message but keeps the connection open ("the client can go on")."""

    def refuse(self, conn: Connection, message: str | bytes) -> bool:
        if not message_too_large(message):
            return False
        conn.send(error_frame(TOO_LARGE, TOO_LARGE_MESSAGE))
        return True


def oversize_stays_open(components: Components) -> Components:
    return attrs.evolve(components, size_guard=OversizeStaysOpenGuard)


class UnparsableIgnoredGuard(SizeGuard):
    """Drops a text frame that is not JSON without a word ("a half-sent frame from a flaky
    client: there is nothing to answer"), where it gets `bad_request`."""

    def refuse(self, conn: Connection, message: str | bytes) -> bool:
        if isinstance(message, str) and not message_too_large(message):
            try:
                json.loads(message)
            except ValueError:
                return True  # skipped
        return super().refuse(conn, message)


def unparsable_ignored(components: Components) -> Components:
    return attrs.evolve(components, size_guard=UnparsableIgnoredGuard)


class BinaryCloses1003Guard(SizeGuard):
    """Answers a binary frame with `bad_request`, then closes with 1003 ("unsupported data", as
    RFC 6455 allows a server to), where the protocol keeps the connection open."""

    def refuse(self, conn: Connection, message: str | bytes) -> bool:
        if not isinstance(message, bytes):
            return super().refuse(conn, message)
        conn.send(error_frame(BAD_REQUEST, "Binary frames are not supported; send JSON text."))
        conn.close(1003, "binary frames are not supported")
        return True


def binary_closes_1003(components: Components) -> Components:
    return attrs.evolve(components, size_guard=BinaryCloses1003Guard)


class TransportCut1MibGuard(SizeGuard):
    """Leaves trio-websocket's message cap at its default 1 MiB, which closes bigger messages with 1009 before our `too_large`."""

    max_message = 1 << 20


def transport_cut_1mib(components: Components) -> Components:
    return attrs.evolve(components, size_guard=TransportCut1MibGuard)


class FrameLimitInCharsGuard(SizeGuard):
    """Measures a text message by its characters (`len` of the str the transport gives), not its
    bytes of UTF-8: a message of two-byte characters over 64 KiB is parsed and answered."""

    def refuse(self, conn: Connection, message: str | bytes) -> bool:
        if len(message) <= MAX_MESSAGE_BYTES:
            return False
        conn.send(error_frame(TOO_LARGE, TOO_LARGE_MESSAGE))
        conn.close(1009, "message too big")
        return True


def frame_limit_in_chars(components: Components) -> Components:
    return attrs.evolve(components, size_guard=FrameLimitInCharsGuard)


class BoolIsIntLimitParser(RequestParser):
    """Checks `limit` with `isinstance(limit, int)`, so JSON `true` passes as 1."""

    def _history(self, request_id: str, obj: dict[str, Any]) -> GetHistory:
        thread_id = self._string(obj, "thread_id", request_id)
        limit = obj.get("limit")
        if "limit" in obj and (not isinstance(limit, int) or limit < 1):
            raise ProtocolError(
                BAD_REQUEST, "`limit` must be an integer of at least 1 when given.", request_id
            )
        return GetHistory(request_id, thread_id, limit)


def bool_is_int_limit(components: Components) -> Components:
    return attrs.evolve(components, parser=BoolIsIntLimitParser)


class SurrogatesPassParser(RequestParser):
    """Re-serialises each frame before parsing (for the audit log), so an escaped lone surrogate arrives raw, where the `\\u`-only check never looks."""

    def parse(self, message: str | bytes) -> Request:
        if isinstance(message, str):
            try:
                message = encode(json.loads(message))
            except (ValueError, RecursionError):
                pass  # the real parse says what is wrong with it
        return super().parse(message)


def surrogates_pass(components: Components) -> Components:
    return attrs.evolve(components, parser=SurrogatesPassParser)


class RateLimitBucketParser(RequestParser):
    """A per-connection token bucket (8 at once, then 10 a second), as a gateway's `limit_req`
    would be set: a quick burst is refused however few requests are still in flight, where the
    protocol allows `rate_limited` only past the server's in-flight limit (at least 64)."""

    burst, per_second = 8, 10.0

    def __init__(self) -> None:
        self._buckets: weakref.WeakKeyDictionary[Any, tuple[float, float]] = weakref.WeakKeyDictionary()

    def over_limit(self, conn: Any) -> str | None:
        now = time.monotonic()
        tokens, then = self._buckets.get(conn, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
        if tokens < 1.0:
            self._buckets[conn] = (tokens, now)
            return f"Slow down: at most {self.burst} requests at once and {self.per_second:g} a second."
        self._buckets[conn] = (tokens - 1.0, now)
        return super().over_limit(conn)


def rate_limit_bucket(components: Components) -> Components:
    return attrs.evolve(components, parser=RateLimitBucketParser)


class NormalClosureShutdown(Shutdown):
    """The shutdown hook closes each connection with the library's default code, 1000 (normal
    closure), not 1001: clients take it for a deliberate end and do not reconnect."""

    code = 1000
    reason = ""


def shutdown_closes_1000(components: Components) -> Components:
    return attrs.evolve(components, shutdown=NormalClosureShutdown)


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
    "alg_none": alg_none,
    "expired_accepted": expired_accepted,
    "any_path_accepted": any_path_accepted,
    "query_wins": query_wins,
    "token_before_path": token_before_path,
    "refusal_says_why": refusal_says_why,
    "exp_whole_seconds": exp_whole_seconds,
    "list_all_tenants": list_all_tenants,
    "echo_to_requester": echo_to_requester,
    "reply_to_first_device": reply_to_first_device,
    "stream_by_request_id": stream_by_request_id,
    "slot_reuse": slot_reuse,
    "abandon_unheard": abandon_unheard,
    "request_id_limit_in_bytes": request_id_limit_in_bytes,
    "rejoin_mid_turn": rejoin_mid_turn,
    "limit_keeps_oldest": limit_keeps_oldest,
    "count_user_messages_only": count_user_messages_only,
    "count_per_assistant": count_per_assistant,
    "recovery_uncommitted": recovery_uncommitted,
    "chunks_race": chunks_race,
    "verbose_errors": verbose_errors,
    "parse_before_size": parse_before_size,
    "oversize_stays_open": oversize_stays_open,
    "transport_cut_1mib": transport_cut_1mib,
    "bool_is_int_limit": bool_is_int_limit,
    "surrogates_pass": surrogates_pass,
    "threads_newest_first": threads_newest_first,
    "created_at_millis": created_at_millis,
    "counter_thread_ids": counter_thread_ids,
    "startup_in_microseconds": startup_in_microseconds,
    "binary_closes_1003": binary_closes_1003,
    "leave_only_mutes": leave_only_mutes,
    "leave_stops_own_turn": leave_stops_own_turn,
    "fanout_trims_content": fanout_trims_content,
    "assistant_id_is_agent_id": assistant_id_is_agent_id,
    "rate_limit_bucket": rate_limit_bucket,
    "shutdown_closes_1000": shutdown_closes_1000,
    "bearer_case_sensitive": bearer_case_sensitive,
    "exp_optional": exp_optional,
    "final_reply_trimmed": final_reply_trimmed,
    "history_first_author": history_first_author,
    "listed_assistant_id": listed_assistant_id,
    "blank_content_refused": blank_content_refused,
    "history_needs_join": history_needs_join,
    "leave_needs_join": leave_needs_join,
    "current_tenant_race": current_tenant_race,
    "assistant_create_race": assistant_create_race,
    "limit_plus_one": limit_plus_one,
    "tenant_nocase": tenant_nocase,
    "content_limit_in_chars": content_limit_in_chars,
    "frame_limit_in_chars": frame_limit_in_chars,
    "connection_id_per_user": connection_id_per_user,
    "query_skips_exp": query_skips_exp,
    "unknown_type_without_re": unknown_type_without_re,
    "history_by_assistant": history_by_assistant,
    "claims_any_string": claims_any_string,
    "assistant_name_trimmed": assistant_name_trimmed,
    "name_limit_in_bytes": name_limit_in_bytes,
    "rejoin_unsubscribed": rejoin_unsubscribed,
    "fanout_skips_own_user": fanout_skips_own_user,
    "watchers_miss_chunks": watchers_miss_chunks,
    "other_claims_checked": other_claims_checked,
    "claims_coerced": claims_coerced,
    "stream_stops_unheard": stream_stops_unheard,
    "unparsable_ignored": unparsable_ignored,
}


def install(name: str | None, components: Components | None = None) -> Components:
    """Components with the named fault installed (none for None); KeyError if unknown."""
    components = components or Components()
    if name is None:
        return components
    return FAULTS[name](components)
