"""The server speaks standard WebSocket to a stranger: the `websockets` library as client.

Rules under test: the same protocol as the trio-websocket tests (welcome,
a whole turn, history, errors, too_large + 1009, 401 and 404 at the
handshake) holds for an independent client implementation, with the
header and with `?token=`. Every receive has a timeout; each test has a
pytest-timeout bound.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .wsclient import ServerProcess, make_token

pytestmark = pytest.mark.timeout(30)


def recv(ws: ClientConnection) -> dict[str, Any]:
    message = ws.recv(timeout=5)
    assert isinstance(message, str)
    return json.loads(message)  # type: ignore[no-any-return]


def until(ws: ClientConnection, re: str, kind: str) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = recv(ws)
        frames.append(frame)
        if frame.get("re") == re and frame["type"] in (kind, "error"):
            return frames


def test_websockets_client_full_session(fast_server: ServerProcess, tenant: str) -> None:
    headers = {"Authorization": "Bearer " + make_token(tenant, "stranger")}
    with connect(fast_server.url, additional_headers=headers, open_timeout=5) as ws:
        welcome = recv(ws)
        assert (welcome["type"], welcome["tenant"], welcome["user"]) == (
            "welcome",
            tenant,
            "stranger",
        )
        ws.send(json.dumps({"type": "start_agent", "id": "1", "assistant": "polyglot"}))
        thread_id = until(ws, "1", "agent_started")[-1]["thread_id"]
        ws.send(
            json.dumps(
                {"type": "user_message", "id": "2", "thread_id": thread_id, "content": "ça va?"}
            )
        )
        frames = until(ws, "2", "agent_response")
        assert [f["type"] for f in frames] == ["ack"] + ["agent_chunk"] * 4 + ["agent_response"]
        assert "".join(f["delta"] for f in frames[1:-1]) == "echo: ça va?" == frames[-1]["content"]
        ws.send(json.dumps({"type": "get_history", "id": "3", "thread_id": thread_id, "limit": 1}))
        history = until(ws, "3", "history")[-1]
        assert [m["content"] for m in history["messages"]] == ["echo: ça va?"]
        ws.send(b"\x01binary")
        assert recv(ws)["code"] == "bad_request"
        ws.send('{"type": "ping", "id": "4", "x": NaN}')
        error = recv(ws)
        # Not parseable, so no readable id: no `re`.
        assert (error["type"], error["code"], "re" in error) == ("error", "bad_request", False)
        ws.send(json.dumps({"type": "ping", "id": "5"}))
        assert until(ws, "5", "pong")[-1]["type"] == "pong"


def test_websockets_client_query_token(fast_server: ServerProcess, tenant: str) -> None:
    with connect(fast_server.url + "?token=" + make_token(tenant, "q"), open_timeout=5) as ws:
        assert recv(ws)["user"] == "q"


def test_websockets_client_too_large_closes_1009(fast_server: ServerProcess) -> None:
    headers = {"Authorization": "Bearer " + make_token()}
    with connect(fast_server.url, additional_headers=headers, open_timeout=5, max_size=None) as ws:
        recv(ws)
        ws.send("x" * 70_000)
        error = recv(ws)
        assert error == {
            "type": "error",
            "code": "too_large",
            "message": error["message"],
        }
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@pytest.mark.parametrize(("path", "token", "status"), [("/ws", None, 401), ("/nope", "ok", 404)])
def test_websockets_client_sees_handshake_refusals(
    fast_server: ServerProcess, path: str, token: str | None, status: int
) -> None:
    headers = {"Authorization": "Bearer " + make_token()} if token else {}
    url = fast_server.url.removesuffix("/ws") + path
    with pytest.raises(InvalidStatus) as info:
        connect(url, additional_headers=headers, open_timeout=5)
    assert info.value.response.status_code == status
    assert info.value.response.body == b""
