"""Test helpers: a launched agentserver process, tokens, and a draining trio-websocket client.

The server is always a real `python -m partywall_agentserver` process on 127.0.0.1
port 0 with its own SQLite file; nothing here reaches into its internals.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

SECRET = "test-secret-0123456789-abcdefghijklmnop"
#: Zero latency: most tests want fast, deterministic turns.
FAST = ["--startup-ms", "0:0", "--chunk-delay-ms", "0:0", "--chunks", "4"]
#: Each test's trio part runs under this limit (seconds).
TEST_TIME_LIMIT = 20.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(header: dict[str, Any], payload: dict[str, Any] | bytes, key: str = SECRET) -> str:
    """A JWS built by hand, so tests can send claims PyJWT would refuse to make."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(body)
    algorithm = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(
        header.get("alg", ""), hashlib.sha256
    )
    mac = hmac.new(key.encode(), signing_input.encode(), algorithm).digest()
    return signing_input + "." + b64url(mac)


def make_token(
    tenant: Any = "acme",
    user: Any = "alice",
    *,
    ttl: float = 300.0,
    key: str = SECRET,
    alg: str = "HS256",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"tid": tenant, "sub": user, "exp": time.time() + ttl}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not _OMIT}
    return sign({"alg": alg, "typ": "JWT"}, payload, key)


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


#: Pass as a claim to leave it out of the token.
OMIT: Any = _Omit()
_OMIT = OMIT


class ServerProcess:
    """One `python -m partywall_agentserver` process; restartable on the same database."""

    def __init__(self, db: Path, args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.db = db
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.port = 0
        self.start()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db", str(self.db),
                "--secret", SECRET, *self.args]  # fmt: skip

    def start(self) -> None:
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on ws://"):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"server did not start: stdout {line!r}, stderr {err!r}")
        self.url = line.strip().removeprefix("listening on ")
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ws_url(self, path: str = "/ws", query: str = "") -> str:
        base = self.url.removesuffix("/ws")
        return base + path + (("?" + query) if query else "")

    def kill(self) -> None:
        """SIGKILL: the crash the durability tests need."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.start()

    def stderr_text(self) -> str:
        """The server's stderr (only once it has exited)."""
        assert self.proc is not None and self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


class Client:
    """A connection whose reader task drains every frame into `frames`."""

    _ids = itertools.count()

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.times: list[float] = []
        """trio.current_time() at which each frame arrived."""
        self.close_code: int | None = None
        self._changed = trio.Event()
        self.patience = 5.0
        """Seconds any single wait of this client may take before the test fails."""

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                assert isinstance(message, str), "the server sent a binary frame"
                self.raw.append(message)
                self.times.append(trio.current_time())
                self.frames.append(json.loads(message))
                self._changed.set()
                self._changed = trio.Event()
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
            self._changed.set()

    @property
    def welcome(self) -> dict[str, Any]:
        return self.frames[0]

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send_message(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def request(self, kind: str, **fields: Any) -> str:
        """Send a request with a fresh id; returns the id."""
        request_id = fields.pop("id", None) or f"r{next(self._ids)}"
        await self.send({"type": kind, "id": request_id, **fields})
        return request_id

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], since: int = 0
    ) -> dict[str, Any]:
        """The first frame received at index `since` or later that satisfies `predicate`."""
        with trio.fail_after(self.patience):
            while True:
                for frame in self.frames[since:]:
                    if predicate(frame):
                        return frame
                if self.close_code is not None:
                    raise AssertionError(
                        f"connection closed ({self.close_code}) before the frame came"
                    )
                await self._changed.wait()

    def raw_of(self, frame: dict[str, Any]) -> str:
        """The exact text `frame` (this very object) arrived as."""
        return self.raw[next(i for i, f in enumerate(self.frames) if f is frame)]

    async def reply(self, re: str, kind: str | None = None) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: f.get("re") == re and (kind is None or f["type"] in (kind, "error"))
        )

    async def call(self, kind: str, expect: str | None = None, **fields: Any) -> dict[str, Any]:
        """Request and wait for its (final) reply of type `expect` (or an error)."""
        request_id = await self.request(kind, **fields)
        return await self.reply(request_id, expect)

    async def turn(self, thread_id: str, content: str) -> list[dict[str, Any]]:
        """A whole turn: every frame with this request's `re`, up to agent_response."""
        request_id = await self.request("user_message", thread_id=thread_id, content=content)
        await self.reply(request_id, "agent_response")
        return [f for f in self.frames if f.get("re") == request_id]

    async def wait_closed(self) -> int | None:
        with trio.fail_after(self.patience):
            while self.close_code is None:
                await self._changed.wait()
        return self.close_code

    def arrived(self, frame: dict[str, Any]) -> float:
        """When `frame` (this very object) arrived."""
        return self.times[next(i for i, f in enumerate(self.frames) if f is frame)]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]


@asynccontextmanager
async def open_client(
    server: ServerProcess,
    tenant: Any = "acme",
    user: Any = "alice",
    *,
    token: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: str = "/ws",
    query: str = "",
    wait_welcome: bool = True,
) -> AsyncIterator[Client]:
    """A connected client (welcome received) whose reader runs until the block ends."""
    if headers is None:
        headers = [(b"authorization", b"Bearer " + (token or make_token(tenant, user)).encode())]
    async with open_websocket_url(
        server.ws_url(path, query),
        extra_headers=headers,
        message_queue_size=64,
        max_message_size=16 * 2**20,
    ) as ws:
        client = Client(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            if wait_welcome:
                await client.wait_for(lambda f: f.get("type") == "welcome")
            yield client
            nursery.cancel_scope.cancel()


def run(async_fn: Callable[[], Any], limit: float = TEST_TIME_LIMIT) -> Any:
    """trio.run with a time bound on the whole test body."""

    async def bounded() -> Any:
        with trio.fail_after(limit):
            return await async_fn()

    return trio.run(bounded)


async def new_thread(client: Client, assistant: str = "helper") -> str:
    started = await client.call("start_agent", "agent_started", assistant=assistant)
    assert started["type"] == "agent_started", started
    return str(started["thread_id"])
