"""A tiny real server that follows the launch contract, for the harness tests.

It binds a TCP port (0 = any free one), accepts and closes connections, and
prints ``listening on ws://HOST:PORT/ws`` when ready, like `agentserver`.
Flags make it misbehave the ways a real server can: never ready, exit early,
flood stderr before the ready line (which deadlocks unless the reader drains
it), ignore SIGTERM. By default it speaks no WebSocket: the target tests only
need a listener. Run as a script or as the `agentserver` module of a fake
package.

With ``--ws`` it speaks a sliver of protocol v1 (PROTOCOL.md), for the driver
tests: the path must be ``/ws`` (else HTTP 404 with a short body), the token
(header or ``?token=``) must be an HS256 JWT signed with PARTYWALL_AUTH_SECRET
carrying ``tid`` and ``sub`` (else HTTP 401, empty body), then ``welcome``
(with the extra field ``server_pid``). Requests: ``ping`` gets ``pong`` (with field ``as``,
a pong whose ``re`` is ``as``, not the ping's id);
``user_message`` gets ``ack`` and never its reply (a turn that never ends);
``drop`` makes the server cut the connection without a close frame (field
``how``: ``fin``, a plain close, or ``rst``, a reset); every other request gets
no answer. A close frame is echoed. ``--ws-stall handshake`` accepts TCP and
never answers the upgrade; ``--ws-stall welcome`` completes the upgrade and
never sends ``welcome``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _serve(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        conn.close()


# -- the --ws mode --------------------------------------------------------------


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the peer closed")
        buf += chunk
    return buf


def _read_request(conn: socket.socket) -> tuple[str, dict[str, str]]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("the peer closed during the handshake")
        buf += chunk
    head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    target = head[0].split(" ")[1]
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return target, headers


def _refuse(conn: socket.socket, status: str, body: bytes) -> None:
    conn.sendall(
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    conn.close()


def _claims(token: str | None, secret: str) -> dict[str, Any] | None:
    import jwt  # partywall's own dependency; imported here so the default mode needs nothing

    if not token:
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return None
    if not isinstance(claims.get("tid"), str) or not isinstance(claims.get("sub"), str):
        return None
    return claims


def _send_frame(conn: socket.socket, opcode: int, payload: bytes) -> None:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    conn.sendall(head + payload)


def _send_json(conn: socket.socket, obj: dict[str, Any]) -> None:
    _send_frame(conn, 0x1, json.dumps(obj).encode())


def _recv_frame(conn: socket.socket) -> tuple[int, bytes]:
    b0, b1 = _recv_exact(conn, 2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", _recv_exact(conn, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
    mask = _recv_exact(conn, 4) if b1 & 0x80 else b"\0\0\0\0"
    data = _recv_exact(conn, n)
    return b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _cut(conn: socket.socket, how: str) -> None:
    if how == "rst":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _ws_session(conn: socket.socket, secret: str, stall: str) -> None:
    try:
        if stall == "handshake":
            while conn.recv(4096):  # hold the connection, answer nothing, until the peer leaves
                pass
            return
        target, headers = _read_request(conn)
        parts = urlsplit(target)
        if parts.path != "/ws":
            _refuse(conn, "404 Not Found", b"no such path\n")
            return
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        if token is None:
            token = (parse_qs(parts.query).get("token") or [None])[0]
        claims = _claims(token, secret)
        if claims is None:
            _refuse(conn, "401 Unauthorized", b"")
            return
        accept = base64.b64encode(
            hashlib.sha1((headers["sec-websocket-key"] + WS_GUID).encode()).digest()
        ).decode()
        conn.sendall(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        if stall == "welcome":
            while conn.recv(4096):
                pass
            return
        _send_json(conn, {
            "type": "welcome", "protocol": 1, "tenant": claims["tid"], "user": claims["sub"],
            "connection_id": uuid.uuid4().hex, "server_time": time.time(), "server_pid": os.getpid(),
        })
        while True:
            opcode, payload = _recv_frame(conn)
            if opcode == 0x8:  # close: echo it and hang up
                _send_frame(conn, 0x8, payload[:2])
                return
            if opcode == 0x9:
                _send_frame(conn, 0xA, payload)
                continue
            if opcode != 0x1:
                continue
            req = json.loads(payload)
            rid = req.get("id")
            if req.get("type") == "ping":
                _send_json(conn, {"type": "pong", "re": req.get("as", rid), "server_time": time.time()})
            elif req.get("type") == "user_message":
                _send_json(conn, {"type": "ack", "re": rid, "thread_id": req.get("thread_id"),
                                  "message_id": uuid.uuid4().hex})
            elif req.get("type") == "drop":
                _cut(conn, str(req.get("how", "fin")))
                return
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()


def _serve_ws(sock: socket.socket, secret: str, stall: str) -> None:
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_ws_session, args=(conn, secret, stall), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", default=None)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--exit-early", type=int, default=None, metavar="CODE")
    parser.add_argument("--stderr-mib", type=float, default=0.0)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--ready-delay", type=float, default=0.0)
    parser.add_argument("--announce-host", default=None)
    parser.add_argument("--ws", action="store_true", help="speak a sliver of protocol v1 (see the docstring)")
    parser.add_argument("--ws-stall", choices=("none", "handshake", "welcome"), default="none")
    args = parser.parse_args(argv)

    print(f"contract server starting, pid {os.getpid()}", flush=True)
    if os.environ.get("PARTYWALL_AUTH_SECRET"):
        print(f"secret of length {len(os.environ['PARTYWALL_AUTH_SECRET'])}", flush=True)
    if args.db:
        # One line per start, so a test can see that restarts reuse the database.
        with open(args.db, "a", encoding="utf-8") as db:
            db.write(f"start {os.getpid()}\n")
    if args.exit_early is not None:
        print("fatal: cannot open the database (planted)", file=sys.stderr, flush=True)
        return args.exit_early
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.stderr_mib:
        line = b"x" * 1023 + b"\n"
        for _ in range(int(args.stderr_mib * 1024)):
            sys.stderr.buffer.write(line)
        # A very long line with no newline until the end.
        sys.stderr.buffer.write(b"y" * 200_000 + b"\n")
        sys.stderr.buffer.flush()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(64)
    if args.ws:
        secret = os.environ.get("PARTYWALL_AUTH_SECRET", "")
        threading.Thread(target=_serve_ws, args=(sock, secret, args.ws_stall), daemon=True).start()
    else:
        threading.Thread(target=_serve, args=(sock,), daemon=True).start()
    time.sleep(args.ready_delay)
    if args.never_ready:
        print("warming up forever (planted)", flush=True)
    else:
        host = args.announce_host or args.host
        print(f"listening on ws://{host}:{sock.getsockname()[1]}/ws", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
