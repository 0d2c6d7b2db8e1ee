"""A tiny real server that follows the launch contract, for the target tests.

It binds a TCP port (0 = any free one), accepts and closes connections, and
prints ``listening on ws://HOST:PORT/ws`` when ready, like `agentserver`.
Flags make it misbehave the ways a real server can: never ready, exit early,
flood stderr before the ready line (which deadlocks unless the reader drains
it), ignore SIGTERM. It speaks no WebSocket: the target tests only need a
listener. Run as a script or as the `agentserver` module of a fake package.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time


def _serve(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        conn.close()


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
