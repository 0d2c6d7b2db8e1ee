"""Fixtures of the agentserver conformance tests: launched servers and unique tenants.

Every server here is a real `python -m partywall_agentserver` subprocess bound to
127.0.0.1 port 0 with a fresh SQLite file, found through its `listening on`
line; tokens are real HS256 JWTs. The session-wide servers are shared by
tests that each use their own random tenant, so they cannot see each other.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .wsclient import FAST, ServerProcess


@pytest.fixture(scope="session")
def fast_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Zero delays: start-ups and turns as fast as the server goes."""
    server = ServerProcess(tmp_path_factory.mktemp("fast") / "agents.db", FAST)
    yield server
    server.close()


@pytest.fixture(scope="session")
def paced_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Replies stream over about 200 ms (4 chunks, 50 ms apart): room to act mid-turn."""
    server = ServerProcess(
        tmp_path_factory.mktemp("paced") / "agents.db",
        ["--startup-ms", "0:0", "--chunks", "4", "--chunk-delay-ms", "50:50"],
    )
    yield server
    server.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a private server (own database) with extra options; killed after the test."""
    started: list[ServerProcess] = []

    def start(
        *args: str, db: Path | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        server = ServerProcess(db or tmp_path / f"agents-{len(started)}.db", args, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def tenant() -> str:
    """A tenant id no other test uses."""
    return "t-" + secrets.token_hex(6)
