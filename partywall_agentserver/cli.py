"""`python -m partywall_agentserver`: the command line of the reference agent server.

Exit codes: 0 after SIGTERM (or SIGINT), 1 when the server cannot run
(unusable or too new database, port in use), 2 for a usage error (bad
option, unknown fault, no secret, only one of --tls-cert and --tls-key, or
a certificate or key that cannot be loaded).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import ssl
import sys
from collections.abc import Sequence

import trio

from .agent import AgentConfig
from .faults import FAULTS, install
from .server import AgentServer, ServerConfig
from .storage import StorageError

log = logging.getLogger("agentserver")

SECRET_ENV = "PARTYWALL_AUTH_SECRET"
FAULT_ENV = "AGENTSERVER_FAULT"
DEFAULT_DB = "agentserver.db"


class UsageError(Exception):
    """A problem with how the server was invoked; exit status 2."""


def _ms_range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        bounds = (float(low), float(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN:MAX in milliseconds (got {text!r})"
        ) from None
    if not all(0 <= b < float("inf") for b in bounds) or bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(
            f"expected 0 <= MIN <= MAX, finite, in milliseconds (got {text!r})"
        )
    return bounds


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (got {text!r})") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535 (got {port})")
    return port


def _chunks(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (got {text!r})") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more chunks (got {count})")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="partywall serve",
        description="The partywall reference agent server (PROTOCOL.md version 1).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--db", default=DEFAULT_DB, metavar="PATH", help=f"SQLite database (default {DEFAULT_DB})"
    )
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--secret", metavar="S", help=f"HS256 secret (or set {SECRET_ENV})")
    secret.add_argument("--secret-file", metavar="F", help="read the HS256 secret from a file")
    parser.add_argument(
        "--startup-ms",
        type=_ms_range,
        default=(50.0, 150.0),
        metavar="MIN:MAX",
        help="agent start-up delay, uniform, in ms (default 50:150)",
    )
    parser.add_argument(
        "--chunks",
        type=_chunks,
        default=4,
        metavar="N",
        help="chunks per reply (default 4)",
    )
    parser.add_argument(
        "--chunk-delay-ms",
        type=_ms_range,
        default=(10.0, 30.0),
        metavar="MIN:MAX",
        help="delay before each chunk, uniform, in ms (default 10:30)",
    )
    parser.add_argument(
        "--fault",
        metavar="NAME",
        choices=sorted(FAULTS),
        default=None,
        help=f"install a planted fault (or set {FAULT_ENV}): {', '.join(sorted(FAULTS))}",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PATH",
        default=None,
        help="serve wss:// with this PEM certificate chain (needs --tls-key)",
    )
    parser.add_argument(
        "--tls-key",
        metavar="PATH",
        default=None,
        help="the PEM private key of --tls-cert (needs --tls-cert)",
    )
    return parser


def _secret(args: argparse.Namespace) -> str:
    if args.secret is not None:
        secret: str = args.secret
    elif args.secret_file is not None:
        try:
            with open(args.secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --secret-file {args.secret_file!r}: {exc}") from None
    else:
        secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise UsageError(
            f"no secret: pass --secret S or --secret-file F, or set {SECRET_ENV}; refusing to "
            "start a server that anyone could mint tokens for"
        )
    return secret


def _fault(args: argparse.Namespace) -> str | None:
    name: str | None = args.fault
    if name is None:
        name = os.environ.get(FAULT_ENV) or None
        if name is not None and name not in FAULTS:
            raise UsageError(
                f"unknown fault {name!r} in {FAULT_ENV}; known faults: {', '.join(sorted(FAULTS))}"
            )
    return name


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from --tls-cert and --tls-key (both or neither), or None."""
    cert: str | None = args.tls_cert
    key: str | None = args.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise UsageError(
            f"{given} needs {missing}: pass both (the PEM certificate chain and its private key) "
            "to serve wss://, or neither to serve ws://"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise UsageError(
            f"cannot load --tls-cert {cert!r} with --tls-key {key!r}: {reason}"
        ) from None
    return context


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return soft


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _run(server: AgentServer) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            scheme = "ws" if server.config.ssl_context is None else "wss"
            print(f"listening on {scheme}://{_url_host(server.config.host)}:{port}/ws", flush=True)
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                break
            await server.shutdown()
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; returns the exit status (see the module docstring)."""
    level = logging.getLevelName(os.environ.get("AGENTSERVER_LOG_LEVEL", "WARNING").upper())
    logging.basicConfig(
        # An unknown level name is not worth refusing to start over.
        level=level if isinstance(level, int) else logging.WARNING,
        format="agentserver: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a bad option
    try:
        secret = _secret(args)
        fault = _fault(args)
        ssl_context = _tls_context(args)
    except UsageError as exc:
        print(f"agentserver: {exc}", file=sys.stderr, flush=True)
        return 2
    if len(secret.encode("utf-8")) < 32:
        log.warning("the secret is shorter than 32 bytes; HS256 tokens are only as strong as it")
    if fault is not None:
        log.warning("planted fault %r is installed: this server is deliberately broken", fault)
    raise_open_files_limit()
    config = ServerConfig(
        db_path=args.db,
        secret=secret,
        host=args.host,
        port=args.port,
        agent=AgentConfig(
            startup_ms=args.startup_ms, chunks=args.chunks, chunk_delay_ms=args.chunk_delay_ms
        ),
        ssl_context=ssl_context,
    )
    server = AgentServer(config, install(fault))
    try:
        server.prepare()
    except StorageError as exc:
        print(f"agentserver: {exc}", file=sys.stderr, flush=True)
        return 1
    failure: OSError | None = None
    try:
        trio.run(_run, server)
    except* OSError as group:
        # Binding failed (port in use, address not available), or the disk
        # went away under us: either way the server cannot go on.
        failure = group.exceptions[0]  # type: ignore[assignment]
    if failure is not None:
        print(
            f"agentserver: cannot serve on {args.host}:{args.port}: {failure}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0
