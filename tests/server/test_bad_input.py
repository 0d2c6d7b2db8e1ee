"""Bad input and error codes (PROTOCOL.md "Frames" and "Errors").

Rules under test: a binary frame, invalid JSON (NaN and Infinity included),
a non-object, a lone surrogate (even escaped), an unknown `type` or a
missing or ill-typed field gets `error` `bad_request` and the connection
stays open; `re` is echoed whenever the request had a string `id`; an `id`
over 64 characters is refused; a message over 65,536 bytes of UTF-8 gets
`too_large` without `re` and then a 1009 close; `not_found` for a thread
that does not exist and for another tenant's thread are byte-identical but
for `re`; more than the documented number of requests in flight gets
`rate_limited`. After every bad input the server still answers.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest

from .wsclient import Client, ServerProcess, new_thread, open_client, run


async def error_for(client: Client, payload: str | bytes) -> dict[str, Any]:
    """Send a raw message; return the error it earns, then check the connection lives."""
    before = len(client.frames)
    await client.send(payload)
    error = await client.wait_for(lambda f: f.get("type") == "error", since=before)
    pong = await client.call("ping", "pong")
    assert pong["type"] == "pong", "the connection must stay open after a bad request"
    return error


BAD_FRAMES = {
    "invalid-json": "{not json",
    "truncated": '{"type": "ping", "id": "x"',
    "empty": "",
    "nan": '{"type": "ping", "id": "x", "v": NaN}',
    "infinity": '{"type": "ping", "id": "x", "v": Infinity}',
    "minus-infinity": '{"type": "ping", "id": "x", "v": -Infinity}',
    "array": '[{"type": "ping", "id": "x"}]',
    "string": '"ping"',
    "number": "42",
    "null": "null",
    "true": "true",
    "trailing-garbage": '{"type": "ping", "id": "x"} x',
    "single-quotes": "{'type': 'ping', 'id': 'x'}",
    "control-char-in-string": '{"type": "ping", "id": "a\x01b"}',
    "deep-nesting": '{"type": "ping", "id": "x", "v": ' + "[" * 20000 + "]" * 20000 + "}",
    "huge-integer": '{"type": "ping", "id": "x", "v": ' + "9" * 20000 + "}",
    "bom": '\ufeff{"type": "ping", "id": "x"}',
}


@pytest.mark.parametrize("payload", list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_bad_input_invalid_json_is_bad_request(fast_server: ServerProcess, payload: str) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            error = await error_for(client, payload)
            assert error["code"] == "bad_request"
            assert isinstance(error["message"], str) and error["message"]

    run(main)


def test_bad_input_binary_frame_is_bad_request(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            for payload in [b'{"type": "ping", "id": "x"}', b"\x00\xff", b""]:
                error = await error_for(client, payload)
                assert error["code"] == "bad_request" and "re" not in error

    run(main)


LONE_SURROGATES = {
    "in-content": '{"type": "ping", "id": "x", "content": "a\\ud800b"}',
    "low-half": '{"type": "ping", "id": "x", "content": "\\udfff"}',
    "upper-case-hex": '{"type": "ping", "id": "x", "content": "\\uD83D"}',
    "reversed-pair": '{"type": "ping", "id": "x", "content": "\\ude00\\ud83d"}',
    "in-key": '{"type": "ping", "id": "x", "\\ud800": 1}',
    "nested": '{"type": "ping", "id": "x", "v": [{"w": "\\udbff"}]}',
}


@pytest.mark.parametrize("payload", list(LONE_SURROGATES.values()), ids=list(LONE_SURROGATES))
def test_bad_input_lone_surrogate_is_bad_request(fast_server: ServerProcess, payload: str) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            error = await error_for(client, payload)
            assert error["code"] == "bad_request"
            assert error.get("re") == "x"

    run(main)


def test_bad_input_lone_surrogate_in_user_message_is_not_stored(
    fast_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            thread_id = await new_thread(client)
            frame = json.dumps({"type": "user_message", "id": "s", "thread_id": thread_id})
            frame = frame[:-1] + ', "content": "bad \\ud800 half"}'
            error = await error_for(client, frame)
            assert (error["code"], error["re"]) == ("bad_request", "s")
            # A proper pair, escaped, is fine.
            frame = frame.replace("\\ud800", "\\ud83d\\ude00").replace('"s"', '"ok"')
            await client.send(frame)
            reply = await client.reply("ok", "agent_response")
            assert reply["content"] == "echo: bad \U0001f600 half"
            history = await client.call("get_history", "history", thread_id=thread_id)
            assert [m["content"] for m in history["messages"]] == [
                "bad \U0001f600 half",
                "echo: bad \U0001f600 half",
            ]

    run(main)


def test_bad_input_lone_surrogate_id_is_not_echoed(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            error = await error_for(client, '{"type": "ping", "id": "\\ud800"}')
            assert error["code"] == "bad_request" and "re" not in error

    run(main)


def test_bad_input_missing_or_bad_id(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            for frame in [
                {"type": "ping"},
                {"type": "ping", "id": 7},
                {"type": "ping", "id": None},
            ]:
                error = await error_for(client, json.dumps(frame))
                assert error["code"] == "bad_request" and "re" not in error
            long_id = "i" * 65
            error = await error_for(client, json.dumps({"type": "ping", "id": long_id}))
            assert error["code"] == "bad_request" and error["re"] == long_id
            pong = await client.call("ping", "pong", id="é" * 64)  # 64 characters, 128 bytes
            assert pong["type"] == "pong"

    run(main)


def test_bad_input_unknown_or_missing_type(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            for frame in [
                {"id": "a"},
                {"id": "b", "type": "launch_missiles"},
                {"id": "c", "type": 3},
                {"id": "d", "type": "PING"},
                {"id": "e", "type": "welcome"},
                {"id": "f", "type": None},
            ]:
                error = await error_for(client, json.dumps(frame))
                assert (error["code"], error["re"]) == ("bad_request", frame["id"])

    run(main)


def test_bad_input_duplicate_keys_are_refused(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            error = await error_for(client, '{"type": "ping", "id": "x", "id": "y"}')
            assert error["code"] == "bad_request"

    run(main)


def _ill_typed(thread_id: str) -> list[dict[str, Any]]:
    return [
        {"type": "start_agent"},
        {"type": "start_agent", "assistant": 5},
        {"type": "start_agent", "assistant": ""},
        {"type": "start_agent", "assistant": "two words"},
        {"type": "start_agent", "assistant": "tab\there"},
        {"type": "start_agent", "assistant": "x" * 65},
        {"type": "start_agent", "assistant": "nul\x00"},
        {"type": "start_agent", "assistant": "ok", "instructions": 5},
        {"type": "start_agent", "assistant": "ok", "instructions": None},
        {"type": "join_thread"},
        {"type": "join_thread", "thread_id": 5},
        {"type": "join_thread", "thread_id": [thread_id]},
        {"type": "leave_thread", "thread_id": None},
        {"type": "user_message", "thread_id": thread_id},
        {"type": "user_message", "content": "hi"},
        {"type": "user_message", "thread_id": thread_id, "content": 5},
        {"type": "user_message", "thread_id": thread_id, "content": None},
        {"type": "user_message", "thread_id": thread_id, "content": ["hi"]},
        {"type": "get_history"},
        {"type": "get_history", "thread_id": {"id": thread_id}},
        {"type": "get_history", "thread_id": thread_id, "limit": True},
        {"type": "get_history", "thread_id": thread_id, "limit": False},
        {"type": "get_history", "thread_id": thread_id, "limit": 2.0},
        {"type": "get_history", "thread_id": thread_id, "limit": 0},
        {"type": "get_history", "thread_id": thread_id, "limit": -1},
        {"type": "get_history", "thread_id": thread_id, "limit": "3"},
        {"type": "get_history", "thread_id": thread_id, "limit": None},
        {"type": "get_history", "thread_id": thread_id, "limit": 10.5},
    ]


def test_bad_input_ill_typed_fields_are_bad_request(
    fast_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            thread_id = await new_thread(client)
            for n, frame in enumerate(_ill_typed(thread_id)):
                frame["id"] = f"bad-{n}"
                error = await error_for(client, json.dumps(frame))
                assert (error["code"], error["re"]) == ("bad_request", frame["id"]), frame
            huge = json.dumps({"type": "get_history", "id": "huge", "thread_id": thread_id})
            error = await error_for(client, huge[:-1] + ', "limit": 1e400}')
            assert (error["code"], error["re"]) == ("bad_request", "huge")
            # Nothing was created or stored by any of them.
            listed = await client.call("list_threads", "threads")
            assert [t["thread_id"] for t in listed["threads"]] == [thread_id]
            history = await client.call("get_history", "history", thread_id=thread_id)
            assert history["messages"] == []

    run(main)


def test_not_found_is_identical_for_missing_and_foreign_threads(
    fast_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant + "-owner") as owner,
            open_client(fast_server, tenant, "prober") as prober,
        ):
            foreign = await new_thread(owner)
            await owner.turn(foreign, "secret content")
            requests = [
                ("join_thread", {}),
                ("leave_thread", {}),
                ("get_history", {}),
                ("get_history", {"limit": 1}),
                ("user_message", {"content": "hi"}),
            ]
            for kind, extra in requests:
                for thread_id in [foreign, "no-such-thread", "", "x" * 500]:
                    before = len(prober.frames)
                    await prober.send(
                        {"type": kind, "id": "same-id", "thread_id": thread_id, **extra}
                    )
                    frame = await prober.wait_for(lambda f: f.get("re") == "same-id", since=before)
                    raw = prober.raw_of(frame)
                    expected = (
                        '{"type":"error","re":"same-id","code":"not_found",'
                        '"message":"No thread with that id exists for this tenant."}'
                    )
                    assert raw == expected, (kind, thread_id, raw)
            assert foreign not in "".join(prober.raw)

    run(main)


def test_too_large_message_gets_error_then_1009(fast_server: ServerProcess) -> None:
    async def main() -> None:
        for payload in [
            "x" * 65_537,
            json.dumps({"type": "ping", "id": "big", "pad": "y" * 70_000}),
            # 16,400 characters but 65,600 bytes of UTF-8: bytes count, not characters.
            json.dumps(
                {"type": "ping", "id": "big", "pad": "\U0001f600" * 16_400}, ensure_ascii=False
            ),
            b"\x00" * 65_537,
            "z" * 900_000,
            # PROTOCOL.md: the error frame comes first for messages up to at least 16 MiB.
            "w" * (2 << 20),
            json.dumps({"type": "ping", "id": "huge", "pad": "v" * (16 << 20)}),
        ]:
            async with open_client(fast_server) as client:
                await client.send(payload)
                code = await client.wait_closed()
                assert code == 1009
                errors = client.of_type("error")
                assert len(errors) == 1, client.frames
                assert errors[0]["code"] == "too_large" and "re" not in errors[0]

    run(main)


def test_message_of_exactly_64_kib_is_not_too_large(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            head = '{"type":"ping","id":"edge","pad":"'
            payload = head + "p" * (65_536 - len(head) - 2) + '"}'
            assert len(payload.encode()) == 65_536
            await client.send(payload)
            assert (await client.reply("edge", "pong"))["type"] == "pong"

    run(main)


def test_rate_limited_past_the_in_flight_limit(start_server) -> None:  # type: ignore[no-untyped-def]
    # Turns of one thread run one at a time, so pipelined messages pile up
    # in flight; the server documents a limit of 128. A turn takes 40 ms, so 128
    # of them take 5 s: far longer than sending 200 frames, even on a loaded machine.
    server = start_server("--startup-ms", "0:0", "--chunks", "1", "--chunk-delay-ms", "40:40")

    async def main() -> None:
        async with open_client(server) as client:
            client.patience = 15.0
            thread_id = await new_thread(client)
            ids = [
                await client.request("user_message", thread_id=thread_id, content=str(n))
                for n in range(200)
            ]
            limited = await client.reply(ids[-1])
            assert (limited["type"], limited["code"]) == ("error", "rate_limited")
            accepted = []
            for request_id in ids:
                frame = await client.reply(request_id, "agent_response")
                if frame["type"] == "agent_response":
                    accepted.append(request_id)
                else:
                    assert frame["code"] == "rate_limited"
            # Nothing can be limited before 128 are in flight: the first 128 all got in.
            assert set(ids[:128]) <= set(accepted)
            assert len(accepted) < len(ids)
            # Once drained, the connection is served normally again.
            assert (await client.turn(thread_id, "after"))[-1]["type"] == "agent_response"

    run(main, limit=30)


def test_bad_input_never_crashes_the_server(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            for payload in list(BAD_FRAMES.values()) + list(LONE_SURROGATES.values()):
                await client.send(payload)
            await client.send(b"\xff" * 10)
            assert (await client.call("ping", "pong"))["type"] == "pong"

    run(main)
    assert fast_server.proc is not None and fast_server.proc.poll() is None


def test_internal_error_when_storage_fails(start_server) -> None:  # type: ignore[no-untyped-def]
    # A real failure, not a mock: another process breaks the database under
    # the running server. Requests that need it get `internal` (with `re`),
    # the failure is logged, and the server keeps serving what it can.
    server = start_server("--startup-ms", "0:0", "--chunk-delay-ms", "0:0")

    async def main() -> None:
        async with open_client(server) as client:
            thread_id = await new_thread(client)
            await client.turn(thread_id, "before")
            db = sqlite3.connect(server.db, timeout=10)
            db.execute("DROP TABLE messages")
            db.commit()
            db.close()
            error = await client.call("user_message", thread_id=thread_id, content="after")
            assert (error["type"], error["code"]) == ("error", "internal")
            error = await client.call("get_history", thread_id=thread_id)
            assert (error["type"], error["code"]) == ("error", "internal")
            assert (await client.call("ping", "pong"))["type"] == "pong"

    run(main)
    assert server.terminate() == 0
    assert "no such table: messages" in server.stderr_text()


@pytest.mark.parametrize("frame", [
    '{"type": "get_history", "id": "n1", "thread_id": "x", "limit": 1' + "0" * 5000 + "}",
    '{"type": "ping", "id": "n2", "x": NaN}',
    '{"type": "ping", "id": "n3", "id": "n4"}',
    '{"type": "ping", "id": "n5",',
])
def test_error_messages_name_the_problem_not_the_servers_internals(fast_server: ServerProcess, frame: str) -> None:
    from partywall_props.invariants import INTERNALS

    async def main() -> None:
        async with open_client(fast_server) as client:
            await client.send(frame)
            error = await client.wait_for(lambda f: f["type"] == "error")
            assert error["code"] == "bad_request"
            assert INTERNALS.search(error["message"]) is None, error["message"]
            assert "sys." not in error["message"] and "digits" not in error["message"], error["message"]

    run(main)

