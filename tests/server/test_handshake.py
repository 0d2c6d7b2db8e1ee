"""Handshake: path, token and claims (PROTOCOL.md "Connecting").

Rules under test: the path is checked first (anything but /ws is 404); then
a HS256 JWT from `Authorization: Bearer` (scheme case-insensitive) or
`?token=`, the header winning when both are there; a missing, malformed,
wrongly signed, expired (no leeway, `exp` a real JSON number) or
other-algorithm token, or a missing or invalid `tid`/`sub`, is 401 with an
empty body and no WebSocket; a valid one gets `welcome` first. Every test
talks to a real server on 127.0.0.1 over real sockets, under a time bound.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import trio

from .wsclient import OMIT, SECRET, ServerProcess, b64url, make_token, open_client, run, sign

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def raw_handshake(
    server: ServerProcess, target: str = "/ws", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send an upgrade request by hand; (status, headers, body) of the answer."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        response_headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            response_headers[name.strip().lower()] = value.strip()
        body = rest
        if status != 101:
            # Rejected: the server closes the connection; read the rest.
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    return status, response_headers, body


def status_of(server: ServerProcess, token: str | None = None, **kwargs: object) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    return raw_handshake(server, headers=headers, **kwargs)[0]  # type: ignore[arg-type]


def test_auth_header_bearer_gets_welcome(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        before = time.time()
        async with open_client(fast_server, tenant, "alice") as client:
            welcome = client.welcome
            assert welcome["type"] == "welcome"
            assert welcome["protocol"] == 1
            assert welcome["tenant"] == tenant and welcome["user"] == "alice"
            assert isinstance(welcome["connection_id"], str) and welcome["connection_id"]
            assert isinstance(welcome["server_time"], float)
            assert before - 5 <= welcome["server_time"] <= time.time() + 5

    run(main)


def test_auth_connection_ids_are_random_and_unique(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        ids = []
        for _ in range(3):
            async with open_client(fast_server, tenant) as client:
                ids.append(client.welcome["connection_id"])
        assert len(set(ids)) == 3
        assert all(not i.isdigit() and len(i) >= 16 for i in ids)

    run(main)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_auth_scheme_is_case_insensitive(fast_server: ServerProcess, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {make_token()}"}
    assert raw_handshake(fast_server, headers=headers)[0] == 101


def test_auth_query_token_gets_welcome(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        query = "token=" + make_token(tenant, "bob")
        async with open_client(fast_server, headers=[], query=query) as client:
            assert client.welcome["tenant"] == tenant
            assert client.welcome["user"] == "bob"

    run(main)


def test_auth_header_wins_over_query(fast_server: ServerProcess) -> None:
    good_query = "token=" + make_token("acme", "from-query")
    bad = make_token(key="not-the-secret")
    # A bad header is not rescued by a good query token.
    assert status_of(fast_server, bad, target="/ws?" + good_query) == 401
    # A good header with a bad query token is accepted, as the header's principal.

    async def main() -> None:
        headers = [(b"authorization", b"Bearer " + make_token("acme", "from-header").encode())]
        async with open_client(
            fast_server, headers=headers, query="token=" + make_token("acme", "x", key="wrong")
        ) as client:
            assert client.welcome["user"] == "from-header"
        async with open_client(fast_server, headers=headers, query=good_query) as client:
            assert client.welcome["user"] == "from-header"

    run(main)


def test_auth_missing_token_is_401_with_empty_body(fast_server: ServerProcess) -> None:
    status, headers, body = raw_handshake(fast_server)
    assert status == 401
    assert body == b""
    assert headers.get("content-length", "0") == "0"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Bearer ...",
        "Token " + "x" * 10,
    ],
)
def test_auth_malformed_header_is_401(fast_server: ServerProcess, authorization: str) -> None:
    status, _, body = raw_handshake(fast_server, headers={"Authorization": authorization})
    assert (status, body) == (401, b"")


@pytest.mark.parametrize("query", ["token=", "token=abc", "token=a.b.c", "tok=" + make_token()])
def test_auth_malformed_query_is_401(fast_server: ServerProcess, query: str) -> None:
    assert status_of(fast_server, target="/ws?" + query) == 401


def test_auth_alg_none_is_refused(fast_server: ServerProcess) -> None:
    payload = {"tid": "acme", "sub": "alice", "exp": time.time() + 60}
    unsigned = (
        b64url(b'{"alg":"none","typ":"JWT"}') + "." + b64url(json.dumps(payload).encode()) + "."
    )
    assert status_of(fast_server, unsigned) == 401
    # alg none with a real HMAC signature attached is still not HS256.
    assert status_of(fast_server, sign({"alg": "none"}, payload)) == 401


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS256", "hs256", "ES256", ""])
def test_auth_other_algorithms_are_refused(fast_server: ServerProcess, alg: str) -> None:
    assert status_of(fast_server, make_token(alg=alg)) == 401


def test_auth_wrong_key_is_refused(fast_server: ServerProcess) -> None:
    assert status_of(fast_server, make_token(key=SECRET + "x")) == 401
    assert status_of(fast_server, make_token(key="")) == 401


def test_auth_tampered_payload_is_refused(fast_server: ServerProcess) -> None:
    header, _, sig = make_token("acme", "alice").split(".")
    forged = b64url(json.dumps({"tid": "globex", "sub": "alice", "exp": time.time() + 60}).encode())
    assert status_of(fast_server, f"{header}.{forged}.{sig}") == 401


def test_auth_expired_token_is_refused(fast_server: ServerProcess) -> None:
    assert status_of(fast_server, make_token(ttl=-1)) == 401
    assert status_of(fast_server, make_token(ttl=-0.3)) == 401


def test_auth_exp_half_a_second_ahead_is_accepted(fast_server: ServerProcess) -> None:
    # PyJWT alone truncates exp to whole seconds and would refuse this.
    assert status_of(fast_server, make_token(ttl=0.5)) == 101
    token = sign({"alg": "HS256"}, {"tid": "acme", "sub": "a", "exp": int(time.time()) + 1.0})
    assert status_of(fast_server, token) == 101


@pytest.mark.parametrize(
    "exp",
    [str(int(time.time()) + 3600), "9999999999", True, None, [9999999999], {"t": 1}, OMIT],
    ids=["numeric-string", "far-string", "true", "null", "list", "object", "missing"],
)
def test_auth_exp_must_be_a_json_number(fast_server: ServerProcess, exp: object) -> None:
    assert status_of(fast_server, make_token(exp=exp)) == 401


def test_auth_exp_nan_is_refused(fast_server: ServerProcess) -> None:
    payload = b'{"tid": "acme", "sub": "alice", "exp": NaN}'
    assert status_of(fast_server, sign({"alg": "HS256"}, payload)) == 401
    payload = b'{"tid": "acme", "sub": "alice", "exp": Infinity}'
    assert status_of(fast_server, sign({"alg": "HS256"}, payload)) == 401


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"tid"', b"not json", b"", b"null"])
def test_auth_payload_must_be_an_object(fast_server: ServerProcess, payload: bytes) -> None:
    assert status_of(fast_server, sign({"alg": "HS256"}, payload)) == 401


@pytest.mark.parametrize("claim", ["tid", "sub"])
def test_auth_missing_claim_is_refused(fast_server: ServerProcess, claim: str) -> None:
    assert status_of(fast_server, make_token(**{claim: OMIT})) == 401


BAD_IDS = [
    "",
    " ",
    "a b",
    " alice",
    "alice ",
    "a\tb",
    "a\nb",
    "a\x00b",
    "a\x7f",
    "a\x85b",  # NEL, a C1 control
    "a\u2003b",  # em space
    "a\u2028b",  # line separator
    "a\u3000b",  # ideographic space
    "x" * 65,
    "\ud800",
    123,
    None,
    ["alice"],
]


@pytest.mark.parametrize("claim", ["tid", "sub"])
@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:20] for b in BAD_IDS])
def test_auth_invalid_ids_are_refused(fast_server: ServerProcess, claim: str, bad: object) -> None:
    # json.dumps writes "\ud800" as an escape, so the claim arrives as a lone surrogate.
    assert status_of(fast_server, make_token(**{claim: bad})) == 401


def test_auth_ids_of_64_code_points_are_accepted(fast_server: ServerProcess) -> None:
    async def main() -> None:
        for ident in ["x" * 64, "é" * 64, "\U0001f600" * 64, "Ωmega-テナント"]:
            async with open_client(fast_server, ident, ident) as client:
                assert client.welcome["tenant"] == ident
                assert client.welcome["user"] == ident

    run(main)


def test_auth_other_claims_are_ignored(fast_server: ServerProcess) -> None:
    token = make_token(nbf=time.time() + 3600, iat="yesterday", aud="elsewhere", iss=5)
    assert status_of(fast_server, token) == 101


@pytest.mark.parametrize("path", ["/", "/wss", "/ws/", "/WS", "/api/ws", "/ws/x"])
def test_path_other_than_ws_is_404_before_auth(fast_server: ServerProcess, path: str) -> None:
    status, _, body = raw_handshake(fast_server, target=path)
    assert (status, body) == (404, b"")
    # Even with a valid token: the path is checked first.
    assert status_of(fast_server, make_token(), target=path) == 404
    assert status_of(fast_server, target=path + "?token=" + make_token()) == 404


def test_handshake_client_leaving_midway_does_not_hurt_server(fast_server: ServerProcess) -> None:
    for partial in [b"", b"GET /ws HTTP/1.1\r\n", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr"]:
        with socket.create_connection(("127.0.0.1", fast_server.port), timeout=5) as sock:
            sock.sendall(partial)
    # Garbage that is not HTTP at all.
    with socket.create_connection(("127.0.0.1", fast_server.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer

    async def main() -> None:
        async with open_client(fast_server) as client:
            assert (await client.call("ping", "pong"))["type"] == "pong"

    run(main)
    assert fast_server.proc is not None and fast_server.proc.poll() is None


def test_handshake_rejections_close_the_tcp_connection(fast_server: ServerProcess) -> None:
    async def main() -> None:
        # trio-websocket sees the same 401 as a browser would.
        from trio_websocket import ConnectionRejected, open_websocket_url

        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(fast_server.ws_url()):
                pass
        assert info.value.status_code == 401
        assert not info.value.body
        with trio.fail_after(5):
            status, _, _ = await trio.to_thread.run_sync(raw_handshake, fast_server, "/nope")
        assert status == 404

    run(main)
