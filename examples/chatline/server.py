#!/usr/bin/env python3
"""chatline: a small WebSocket chat-agent service, written as an example test target.

Each user of each organisation ("org") opens private conversations with a
canned agent. Saying something in a conversation stores the user's message in
SQLite, streams a reply back in parts, stores the reply, and mirrors the whole
turn to the user's other open connections (their other devices). The wire
protocol is described in PROTOCOL.md next to this file.

Run it with::

    CHATLINE_SECRET=s3cret python examples/chatline/server.py --port 0

It prints one line, ``listening on ws://HOST:PORT/chat``, once it accepts
connections. ``--fault NAME`` plants one of the realistic bugs listed in
FAULTS, so a test suite can show that it notices.

How the code is laid out, top to bottom:

* credentials: reading and checking ``cl1.`` tokens, and the session cookie;
* ``Store``: the SQLite tables for conversations and messages;
* ``Client``: one authenticated connection and the queue of frames it is sent;
* ``ChatServer``: handshakes, the request loop, the operations, turns and sync;
* the command line.

Only the standard library, trio and trio_websocket are used.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

log = logging.getLogger("chatline")

# -- limits and names of the protocol (see PROTOCOL.md) -------------------------

WS_PATH = "/chat"
COOKIE_NAME = "chatline_session"
TOKEN_VERSION = "cl1"

#: Seconds a connection without a cookie has to send its hello frame.
HELLO_TIMEOUT = 5.0
#: Close code after a failed hello (4000-4999 are free for applications).
DENIED_CLOSE_CODE = 4401

#: Largest request frame, in bytes of payload. Bigger frames get `fail too_big`
#: and the connection is closed with 1009.
MAX_FRAME_BYTES = 131_072
#: trio_websocket's own limit, counted in code points. If a message passes it,
#: the library closes with 1009 by itself, before we see the message and can
#: say why. So it is set well above MAX_FRAME_BYTES: everything up to 4 MiB
#: reaches our own check and gets the `too_big` frame first.
LIBRARY_MAX_MESSAGE = 4 * 1024 * 1024

MAX_IN_FLIGHT = 32
MAX_REF_CHARS = 64
MAX_PERSONA_CHARS = 40
MAX_TEXT_BYTES = 8000
#: The agent echoes at most this many code points of what it was told.
ECHO_CHARS = 200

#: Frames queued for a connection that does not read them before we drop it.
MAX_OUTBOX = 10_000
#: Seconds to wait for a peer's closing handshake.
CLOSE_TIMEOUT = 3.0

#: The planted faults, by name. Each one is enabled in exactly one place,
#: marked `if self.fault == "<name>":` with a comment on the bug it imitates.
FAULTS = {
    "org_wide_conversations": "the ownership check compares only the org, not the user",
    "sync_to_org": "multi-device sync goes to every connection of the org",
    "lost_part": "the streamed part n=2 never reaches the requester",
    "cookie_skips_signature": "a session cookie is accepted without checking its signature",
    "echo_to_sender": "multi-device sync also mirrors a turn to the connection that sent it",
}


def new_id(prefix: str) -> str:
    """A random, opaque, URL-safe id such as ``cv_Jd8x0qVbR2zT``; never sequential."""
    return f"{prefix}_{secrets.token_urlsafe(9)}"


def encode(event: dict[str, Any]) -> str:
    """One JSON text frame.

    ``ensure_ascii`` (the default) escapes every non-ASCII character, which also
    keeps a lone surrogate a client put in its ``ref`` from breaking the UTF-8
    encoding of the frame.
    """
    return json.dumps(event, separators=(",", ":"))


# -- credentials ---------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a connection belongs to, as a verified token says."""

    org: str
    user: str


_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def _decode_id(part: str) -> str | None:
    """Decode one base64url (unpadded) token part into a non-empty id, or None."""
    if not _BASE64URL.fullmatch(part) or len(part) % 4 == 1:
        return None
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text or None


def token_signature(secret: bytes, signed_text: str) -> str:
    """Hex HMAC-SHA256 of ``cl1.<org_b64>.<user_b64>.<exp>`` under the secret."""
    return hmac.new(secret, signed_text.encode("ascii"), hashlib.sha256).hexdigest()


def read_token(token: str, secret: bytes, *, verify: bool = True) -> Identity | None:
    """Return the identity in a ``cl1.<org_b64>.<user_b64>.<exp>.<sig>`` token, or None.

    None for anything malformed, and, when ``verify`` is true (always, unless a
    fault is planted), for a token not signed with ``secret`` or expired.
    ``verify=False`` only parses, like ``jwt.decode`` of PyJWT without signature
    verification, which skips the expiry check along with the signature.
    """
    if not token.isascii():
        return None
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != TOKEN_VERSION:
        return None
    _, org_b64, user_b64, exp_text, signature = parts
    org, user = _decode_id(org_b64), _decode_id(user_b64)
    # (int() refuses more than 4300 digits; a real expiry has 10.)
    if org is None or user is None or not exp_text.isdigit() or len(exp_text) > 18 or not signature:
        return None
    if not verify:
        return Identity(org, user)
    expected = token_signature(secret, token.rpartition(".")[0])
    # Constant-time comparison, so the time taken says nothing about how much
    # of a forged signature was right.
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
        return None
    if int(exp_text) <= time.time():
        return None
    return Identity(org, user)


def session_cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The value of the ``chatline_session`` cookie in the upgrade request, or None.

    Parsed by hand rather than with ``http.cookies``, which gives up on the
    whole header when one unrelated cookie is not to its liking. Several Cookie
    headers are allowed; the first ``chatline_session`` wins.
    """
    for name, value in headers:
        if name.lower() != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            key, has_value, cookie = pair.partition("=")
            if has_value and key.strip() == COOKIE_NAME:
                cookie = cookie.strip()
                if len(cookie) >= 2 and cookie[0] == cookie[-1] == '"':
                    cookie = cookie[1:-1]
                return cookie
    return None


# -- storage -------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    id: str
    org: str
    user: str
    persona: str
    agent: str


class Store:
    """Conversations and messages in one SQLite file.

    Every write is committed before the method returns, so whatever the server
    acknowledges survives a SIGKILL. WAL mode with ``synchronous=NORMAL`` makes a
    commit a plain write() (no fsync): safe against the process dying, not
    against the machine losing power, and cheap enough to call directly from the
    trio event loop. Calling it directly has a second benefit the turn code
    relies on: nothing else runs between a commit and the next line of code.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS conversations (
            id         TEXT PRIMARY KEY,
            org        TEXT NOT NULL,
            owner      TEXT NOT NULL,
            persona    TEXT NOT NULL,
            agent      TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE IF NOT EXISTS messages (
            seq  INTEGER PRIMARY KEY AUTOINCREMENT,  -- commit order
            id   TEXT NOT NULL UNIQUE,
            conv TEXT NOT NULL REFERENCES conversations (id),
            kind TEXT NOT NULL CHECK (kind IN ('me', 'bot')),
            who  TEXT,                               -- the user, for kind 'me'
            text TEXT NOT NULL,
            at   REAL NOT NULL
        );
        CREATE INDEX IF NOT EXISTS messages_by_conv ON messages (conv, seq);
    """

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(self.SCHEMA)

    def close(self) -> None:
        self._db.close()

    def create_conversation(self, org: str, user: str, persona: str) -> Conversation:
        conv = Conversation(new_id("cv"), org, user, persona, new_id("ag"))
        with self._db:  # commits, or rolls back on an exception
            self._db.execute(
                "INSERT INTO conversations (id, org, owner, persona, agent, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (conv.id, org, user, persona, conv.agent, time.time()),
            )
        return conv

    def conversation(self, conv_id: str) -> Conversation | None:
        # Our ids are ASCII. Anything else cannot name a conversation, and a
        # lone surrogate from a client's JSON could not even be bound as text.
        if not conv_id.isascii():
            return None
        row = self._db.execute(
            "SELECT id, org, owner, persona, agent FROM conversations WHERE id = ?", (conv_id,)
        ).fetchone()
        return Conversation(*row) if row else None

    def add_message(self, conv_id: str, kind: str, who: str | None, text: str) -> str:
        """Store and commit one message; returns its id."""
        msg_id = new_id("m")
        with self._db:
            self._db.execute(
                "INSERT INTO messages (id, conv, kind, who, text, at) VALUES (?, ?, ?, ?, ?, ?)",
                (msg_id, conv_id, kind, who, text, time.time()),
            )
        return msg_id

    def unanswered(self) -> list[tuple[str, str]]:
        """(conversation id, text) of each conversation whose last message is a user's: a turn
        a crash cut short. Turns of one conversation run one at a time, so only the last can be."""
        rows = self._db.execute(
            "SELECT m.conv, m.text FROM messages m"
            " WHERE m.seq = (SELECT MAX(seq) FROM messages WHERE conv = m.conv) AND m.kind = 'me'"
        )
        return list(rows)

    def log(self, conv_id: str) -> list[dict[str, Any]]:
        """A conversation's messages in commit order, as `log` items."""
        items = []
        rows = self._db.execute(
            "SELECT id, kind, who, text, at FROM messages WHERE conv = ? ORDER BY seq", (conv_id,)
        )
        for msg_id, kind, who, text, at in rows:
            if kind == "me":
                items.append({"msg": msg_id, "by": "me", "who": who, "text": text, "at": at})
            else:
                items.append({"msg": msg_id, "by": "bot", "text": text, "at": at})
        return items


# -- connections ---------------------------------------------------------------


@dataclass(frozen=True)
class _Close:
    """Outbox item: close the WebSocket with this code once earlier frames are sent."""

    code: int
    reason: str


class Client:
    """One authenticated connection, with an outbox drained by its own writer task.

    ``send`` never blocks: a turn that streams to several connections must not
    wait for the slowest of them, and one writer per connection keeps that
    connection's frames in the order they were queued.
    """

    def __init__(self, ws: WebSocketConnection, identity: Identity) -> None:
        self.ws = ws
        self.org = identity.org
        self.user = identity.user
        self.session = new_id("s")
        #: Requests received whose final answer is not queued yet.
        self.in_flight = 0
        #: Set once nothing more may be queued (we are closing, or the peer left).
        self.closing = False
        #: Set when *we* queued a close frame (too_big, shutdown).
        self.close_queued = False
        self.writer_done = trio.Event()
        #: Wraps the connection's reader and writer; cancelled to drop it outright.
        self.scope = trio.CancelScope()
        self._outbox: deque[str | _Close] = deque()
        self._wakeup = trio.Event()

    def send(self, event: dict[str, Any]) -> None:
        """Queue one event; events for a closing connection are dropped."""
        if self.closing:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            log.warning("session %s does not read its frames; dropping it", self.session)
            self.closing = True
            self.scope.cancel()
            return
        self._outbox.append(encode(event))
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        """Close the connection after the frames already queued."""
        if self.closing:
            return
        self.closing = self.close_queued = True
        self._outbox.append(_Close(code, reason))
        self._wakeup.set()

    async def write_loop(self) -> None:
        """Send queued frames in order, until a close is queued or the peer leaves."""
        try:
            while True:
                if not self._outbox:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                item = self._outbox.popleft()
                if isinstance(item, _Close):
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self.ws.aclose(item.code, item.reason)
                    return
                await self.ws.send_message(item)
        except ConnectionClosed:
            self.closing = True  # the peer left; its reader notices too
        finally:
            self.writer_done.set()


# -- requests ------------------------------------------------------------------


class Fail(Exception):
    """A request is refused; becomes a `fail` event with this reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def fail_event(ref: str | None, reason: str, detail: str) -> dict[str, Any]:
    return {"ev": "fail", "ref": ref, "reason": reason, "detail": detail}


def with_ref(ref: str, event: dict[str, Any]) -> dict[str, Any]:
    """The event with ``ref`` added right after ``ev`` (dicts keep insertion order)."""
    return {"ev": event["ev"], "ref": ref, **event}


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def decode_request(message: str | bytes) -> dict[str, Any]:
    """Parse one request frame into a JSON object, or raise Fail(malformed)."""
    if isinstance(message, bytes):
        raise Fail("malformed", "Binary frames are not accepted; send JSON text frames.")
    try:
        # Python's json accepts NaN and Infinity unless told otherwise; a deep
        # nesting of brackets raises RecursionError rather than ValueError.
        request = json.loads(message, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise Fail("malformed", "The frame is not valid JSON.") from None
    if not isinstance(request, dict):
        raise Fail("malformed", "A request must be a JSON object.")
    return request


def request_ref(request: dict[str, Any]) -> str | None:
    ref = request.get("ref")
    if isinstance(ref, str) and 1 <= len(ref) <= MAX_REF_CHARS:
        return ref
    return None


def valid_persona(persona: object) -> bool:
    """1 to 40 code points, none of them whitespace, a control character or a surrogate."""
    return (
        isinstance(persona, str)
        and 1 <= len(persona) <= MAX_PERSONA_CHARS
        and not any(c.isspace() or unicodedata.category(c) in ("Cc", "Cs") for c in persona)
    )


def text_field(request: dict[str, Any]) -> str:
    text = request.get("text")
    if not isinstance(text, str):
        raise Fail("malformed", '"text" must be a string.')
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, written as \\udXXX in the JSON
        raise Fail("malformed", '"text" must be valid Unicode.') from None
    if size > MAX_TEXT_BYTES:
        raise Fail("malformed", f'"text" may be at most {MAX_TEXT_BYTES} bytes of UTF-8.')
    return text


def conv_field(request: dict[str, Any]) -> str:
    conv_id = request.get("conv")
    if not isinstance(conv_id, str):
        raise Fail("malformed", '"conv" must be a conversation id (a string).')
    return conv_id


def reply_text(text: str) -> str:
    """The agent's whole reply to a user message."""
    return "You said: " + text[:ECHO_CHARS]


def split_evenly(text: str, parts: int) -> list[str]:
    """Cut text into `parts` pieces whose lengths differ by at most one (some may be empty)."""
    size, longer = divmod(len(text), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < longer else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def random_seconds(range_ms: tuple[float, float]) -> float:
    return random.uniform(*range_ms) / 1000.0


@contextmanager
def answer_failures(client: Client, ref: str | None) -> Iterator[None]:
    """Turn whatever goes wrong while handling a request into a `fail` for it.

    Client input must never crash the server: an unexpected exception is logged
    with its traceback, and the client only learns that the request failed.
    """
    try:
        yield
    except Fail as failure:
        client.send(fail_event(ref, failure.reason, failure.detail))
    except Exception:
        log.exception("session %s: a request failed unexpectedly", client.session)
        client.send(fail_event(ref, "malformed", "the request could not be handled"))


class ConversationLocks:
    """One trio.Lock per conversation, forgotten again when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, trio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, conv_id: str) -> AsyncIterator[None]:
        lock = self._locks.get(conv_id)
        if lock is None:
            lock = self._locks[conv_id] = trio.Lock()
        self._users[conv_id] = self._users.get(conv_id, 0) + 1
        try:
            async with lock:  # trio.Lock is fair: waiters get it in arrival order
                yield
        finally:
            self._users[conv_id] -= 1
            if not self._users[conv_id]:
                del self._users[conv_id], self._locks[conv_id]


# -- the server ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    secret: bytes
    fault: str | None = None
    parts: int = 3
    reply_delay_ms: tuple[float, float] = (0.0, 3.0)
    warmup_ms: tuple[float, float] = (0.0, 5.0)


class ChatServer:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.fault = settings.fault
        #: Authenticated connections, by org (sync looks for a user's other devices here).
        self._clients: dict[str, set[Client]] = {}
        self._locks = ConversationLocks()
        #: Opens and turns run here, not in the connection's own tasks: a turn
        #: the requester walked away from still finishes, is stored, and reaches
        #: the user's other devices.
        self._work: trio.Nursery | None = None
        self._ops: dict[str, Callable[[Client, str, dict[str, Any]], Awaitable[None]]] = {
            "open": self._op_open,
            "say": self._op_say,
            "fetch": self._op_fetch,
        }

    async def serve(
        self, listener: trio.SocketListener, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve connections until cancelled; ``task_status.started`` gets the port."""
        async with trio.open_nursery() as nursery:
            self._work = nursery
            ws_server = WebSocketServer(
                self._handle_request, [listener], max_message_size=LIBRARY_MAX_MESSAGE
            )
            await nursery.start(ws_server.run)
            task_status.started(ws_server.port)

    async def close_all(self) -> None:
        """Close every connection with 1001 (going away), waiting a little for each."""
        clients = [c for org_clients in self._clients.values() for c in org_clients]
        for client in clients:
            client.close(1001, "server shutting down")
        with trio.move_on_after(CLOSE_TIMEOUT):
            for client in clients:
                await client.writer_done.wait()

    # -- handshake ---------------------------------------------------------------

    async def _handle_request(self, request: WebSocketRequest) -> None:
        """One connection, start to end. Nothing that goes wrong here may stop the server."""
        try:
            await self._connection(request)
        except ConnectionClosed:
            pass  # the client left during the handshake or the hello
        except Exception:
            log.exception("a connection failed")

    async def _connection(self, request: WebSocketRequest) -> None:
        if request.path.partition("?")[0] != WS_PATH:
            await request.reject(404, body=b"not found\n")
            return
        cookie = session_cookie(request.headers)
        if cookie is not None:
            identity = self._check_cookie(cookie)
            if identity is None:
                await request.reject(401, body=b"invalid session cookie\n")
                return
            ws = await request.accept()
        else:
            ws = await request.accept()
            identity = await self._hello(ws)
            if identity is None:
                return
        await self._session(ws, identity)

    def _check_cookie(self, token: str) -> Identity | None:
        verify = True
        if self.fault == "cookie_skips_signature":
            # Planted bug: "the gateway already checked the cookie", so it is only
            # parsed, not verified (and, as with an unverified JWT, its expiry is
            # skipped too). Anyone can forge a cookie for any org and user.
            verify = False
        return read_token(token, self.settings.secret, verify=verify)

    async def _hello(self, ws: WebSocketConnection) -> Identity | None:
        """Wait for ``{"op":"hello","key":TOKEN}``; deny and close with 4401 on anything else."""
        message: str | bytes | None = None
        with trio.move_on_after(HELLO_TIMEOUT):
            message = await ws.get_message()
        if message is None:
            why = f"no hello within {HELLO_TIMEOUT:g} seconds"
        else:
            identity, why = self._check_hello(message)
            if identity is not None:
                return identity
        await ws.send_message(encode({"ev": "denied", "why": why}))
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose(DENIED_CLOSE_CODE, "unauthorized")
        return None

    def _check_hello(self, message: str | bytes) -> tuple[Identity | None, str]:
        try:
            hello = decode_request(message)
        except Fail:
            hello = None
        if hello is None or hello.get("op") != "hello":
            return None, 'the first message must be {"op":"hello","key":...}'
        key = hello.get("key")
        if not isinstance(key, str):
            return None, "hello needs a key"
        identity = read_token(key, self.settings.secret)
        if identity is None:
            return None, "the key is invalid or expired"
        return identity, ""

    # -- an authenticated session --------------------------------------------------

    async def _session(self, ws: WebSocketConnection, identity: Identity) -> None:
        client = Client(ws, identity)
        self._clients.setdefault(client.org, set()).add(client)
        client.send({"ev": "ready", "org": client.org, "user": client.user, "session": client.session})
        try:
            with client.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.write_loop)
                    await self._read_loop(client)
                    if client.close_queued:
                        # We chose to close: let the writer send what is queued, then the close frame.
                        with trio.move_on_after(CLOSE_TIMEOUT):
                            await client.writer_done.wait()
                    nursery.cancel_scope.cancel()
        finally:
            client.closing = True
            org_clients = self._clients[client.org]
            org_clients.discard(client)
            if not org_clients:
                del self._clients[client.org]

    async def _read_loop(self, client: Client) -> None:
        while not client.closing:
            try:
                message = await client.ws.get_message()
            except ConnectionClosed:
                return
            await self._on_frame(client, message)

    async def _on_frame(self, client: Client, message: str | bytes) -> None:
        size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8"))
        if size > MAX_FRAME_BYTES:
            detail = f"A frame may be at most {MAX_FRAME_BYTES} bytes; closing the connection."
            client.send(fail_event(None, "too_big", detail))
            client.close(1009, "message too big")
            return
        try:
            request = decode_request(message)
            ref = request_ref(request)
            if ref is None:
                raise Fail("malformed", 'Every request needs a "ref": a string of 1 to 64 characters.')
        except Fail as failure:
            # Not even a ref to answer to: the fail carries "ref": null.
            client.send(fail_event(None, failure.reason, failure.detail))
            return
        with answer_failures(client, ref):
            if client.in_flight >= MAX_IN_FLIGHT:
                raise Fail("busy", f"At most {MAX_IN_FLIGHT} requests may be in flight; wait for answers.")
            op = request.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Fail("malformed", 'Unknown "op"; expected open, say or fetch.')
            await handler(client, ref, request)

    def _owned_conversation(self, client: Client, conv_id: str) -> Conversation:
        """The conversation, if it belongs to this org and this user; else Fail.

        Someone else's conversation is refused exactly like one that does not
        exist, so ids cannot be probed.
        """
        conv = self.store.conversation(conv_id)
        owned = conv is not None and conv.org == client.org and conv.user == client.user
        if self.fault == "org_wide_conversations":
            # Planted bug: "conversations are shared within a team", the
            # developer thought, and dropped the user from the check.
            owned = conv is not None and conv.org == client.org
        if not owned:
            raise Fail("unknown_conversation", "There is no such conversation.")
        assert conv is not None
        return conv

    def _sync_targets(self, requester: Client) -> list[Client]:
        """The requester's other open connections, which receive copies of its turn."""
        same_org = self._clients.get(requester.org, ())
        if self.fault == "sync_to_org":
            # Planted bug: the user filter got lost in a refactoring, so a turn
            # is mirrored to every connection of the org, other users included.
            return [c for c in same_org if c is not requester and not c.closing]
        if self.fault == "echo_to_sender":
            # Planted bug: "every connection of the user" was taken literally, so the
            # sender also gets the synced copies of its own turn beside its replies.
            return [c for c in same_org if not c.closing and c.user == requester.user]
        return [c for c in same_org if c is not requester and not c.closing and c.user == requester.user]

    # -- operations ------------------------------------------------------------------

    async def _op_open(self, client: Client, ref: str, request: dict[str, Any]) -> None:
        persona = request.get("persona")
        if not valid_persona(persona):
            raise Fail(
                "malformed",
                '"persona" must be 1 to 40 characters, without spaces or control characters.',
            )
        assert self._work is not None
        client.in_flight += 1
        self._work.start_soon(self._open_conversation, client, ref, persona)

    async def _open_conversation(self, client: Client, ref: str, persona: str) -> None:
        try:
            with answer_failures(client, ref):
                began = trio.current_time()
                await trio.sleep(random_seconds(self.settings.warmup_ms))  # "starting the agent"
                conv = self.store.create_conversation(client.org, client.user, persona)
                warmup_ms = round((trio.current_time() - began) * 1000.0, 3)
                client.send(
                    {
                        "ev": "opened",
                        "ref": ref,
                        "conv": conv.id,
                        "persona": persona,
                        "agent": conv.agent,
                        "warmup_ms": warmup_ms,
                    }
                )
        finally:
            client.in_flight -= 1

    async def _op_say(self, client: Client, ref: str, request: dict[str, Any]) -> None:
        conv_id = conv_field(request)
        text = text_field(request)
        conv = self._owned_conversation(client, conv_id)
        assert self._work is not None
        client.in_flight += 1
        # start(), not start_soon(): the turn task queues on the conversation's
        # lock before this connection's next frame is read, so two turns sent
        # back to back run in the order they were sent.
        await self._work.start(self._take_turn, client, ref, conv, text)

    async def _take_turn(
        self,
        client: Client,
        ref: str,
        conv: Conversation,
        text: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        try:
            with answer_failures(client, ref):
                # Held from before the user message is committed until the reply is
                # committed and queued: turns of one conversation never interleave.
                async with self._locks.hold(conv.id):
                    await self._turn(client, ref, conv, text)
        finally:
            client.in_flight -= 1

    async def _turn(self, client: Client, ref: str, conv: Conversation, text: str) -> None:
        msg_id = self.store.add_message(conv.id, "me", client.user, text)
        # No checkpoint since the commit: these are exactly the connections that
        # were open when the message was stored. Later ones get nothing of it.
        others = self._sync_targets(client)

        def to_others(event: dict[str, Any]) -> None:
            for other in others:
                other.send(event)

        client.send({"ev": "got", "ref": ref, "conv": conv.id, "msg": msg_id})
        to_others({"ev": "echo", "conv": conv.id, "msg": msg_id, "who": client.user, "text": text})

        reply = reply_text(text)
        for n, piece in enumerate(split_evenly(reply, self.settings.parts), start=1):
            await trio.sleep(random_seconds(self.settings.reply_delay_ms))  # "the model is typing"
            part = {"ev": "part", "conv": conv.id, "n": n, "text": piece}
            lost = False
            if self.fault == "lost_part":
                # Planted bug: an off-by-one in a "skip the empty keep-alive part"
                # optimisation drops the second part on the requester's stream.
                lost = n == 2
            if not lost:
                client.send(with_ref(ref, part))
            to_others(part)

        reply_id = self.store.add_message(conv.id, "bot", None, reply)
        done = {"ev": "reply", "conv": conv.id, "msg": reply_id, "text": reply}
        client.send(with_ref(ref, done))
        to_others(done)

    async def _op_fetch(self, client: Client, ref: str, request: dict[str, Any]) -> None:
        conv = self._owned_conversation(client, conv_field(request))
        # Answered inline: it sees every message committed before it was read.
        client.send({"ev": "log", "ref": ref, "conv": conv.id, "items": self.store.log(conv.id)})


# -- command line ----------------------------------------------------------------


def _ms_range(text: str) -> tuple[float, float]:
    """Parse ``A:B`` milliseconds, 0 <= A <= B, for argparse."""
    low, colon, high = text.partition(":")
    try:
        bounds = (float(low), float(high)) if colon else None
    except ValueError:
        bounds = None
    if bounds is None or not all(math.isfinite(b) for b in bounds) or not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected A:B milliseconds with 0 <= A <= B, not {text!r}")
    return bounds


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, not {text!r}")
    return port


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatline", description="A small WebSocket chat-agent service.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=0, help="port; 0 picks a free one (default)")
    parser.add_argument("--db", metavar="PATH", help="SQLite file (default: a fresh temporary file)")
    parser.add_argument("--secret", help="token signing secret (default: $CHATLINE_SECRET)")
    parser.add_argument("--fault", choices=sorted(FAULTS), help="plant one known bug")
    parser.add_argument(
        "--reply-delay-ms", type=_ms_range, default=(0.0, 3.0), metavar="A:B",
        help="random delay before each streamed part (default 0:3)",
    )
    parser.add_argument("--parts", type=_positive_int, default=3, help="parts per reply (default 3)")
    parser.add_argument(
        "--warmup-ms", type=_ms_range, default=(0.0, 5.0), metavar="A:B",
        help="random delay before a conversation opens (default 0:5)",
    )
    return parser


async def _run(server: ChatServer, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listeners = await trio.open_tcp_listeners(port, host=host)
        # A name such as "localhost" may give one listener per address, each on
        # its own free port. We announce one URL, so we keep one listener.
        for extra in listeners[1:]:
            await extra.aclose()
        async with trio.open_nursery() as nursery:
            bound_port = await nursery.start(server.serve, listeners[0])
            url_host = f"[{host}]" if ":" in host else host
            print(f"listening on ws://{url_host}:{bound_port}{WS_PATH}", flush=True)
            async for _ in signals:
                break
            await server.close_all()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="chatline: %(levelname)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)  # exits 2 on a bad option or an unknown fault

    secret = args.secret if args.secret is not None else os.environ.get("CHATLINE_SECRET", "")
    if not secret:
        print("chatline: no secret: pass --secret or set CHATLINE_SECRET", file=sys.stderr)
        return 2

    temp_dir = None
    db_path = args.db
    if db_path is None:
        temp_dir = tempfile.mkdtemp(prefix="chatline-")
        db_path = os.path.join(temp_dir, "chatline.sqlite3")
    try:
        try:
            store = Store(db_path)
        except sqlite3.Error as exc:
            print(f"chatline: cannot use database {db_path}: {exc}", file=sys.stderr)
            return 1
        settings = Settings(
            # surrogateescape gives back the exact bytes of a secret that is not valid UTF-8
            secret=secret.encode("utf-8", "surrogateescape"),
            fault=args.fault,
            parts=args.parts,
            reply_delay_ms=args.reply_delay_ms,
            warmup_ms=args.warmup_ms,
        )
        for conv_id, text in store.unanswered():
            # Finish what a crash interrupted before taking new work: the reply is stored only.
            store.add_message(conv_id, "bot", None, reply_text(text))
        try:
            trio.run(_run, ChatServer(store, settings), args.host, args.port)
        except OSError as exc:  # the address is in use, or the host does not resolve
            print(f"chatline: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        finally:
            store.close()
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        return 130
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
