"""Each request and its replies (PROTOCOL.md "Requests and replies").

Rules under test: every reply carries the request's `id` as `re`;
`start_agent` creates or reuses the tenant's assistant and opens and joins a
new thread; `user_message` gets `ack` (after commit), chunks with `seq`
0, 1, 2... whose deltas concatenate to the `agent_response` content, which
is `echo: ` + content; `get_history` is oldest first, `limit` keeps the
newest; `list_threads` is oldest first with `message_count`; ids the server
makes are opaque random strings. Real server, real sockets, time-bounded.
"""

from __future__ import annotations

import time

from .wsclient import ServerProcess, new_thread, open_client, run


def test_start_agent_opens_and_joins_a_thread(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            started = await client.call(
                "start_agent", "agent_started", assistant="helper", instructions="be brief"
            )
            assert started["type"] == "agent_started"
            assert set(started) >= {"re", "agent_id", "assistant_id", "thread_id", "startup_ms"}
            for key in ("agent_id", "assistant_id", "thread_id"):
                assert isinstance(started[key], str) and len(started[key]) >= 16
                assert not started[key].isdigit()
            assert isinstance(started["startup_ms"], (int, float)) and started["startup_ms"] >= 0
            # Joined already: a message is accepted without join_thread.
            frames = await client.turn(started["thread_id"], "hi")
            assert frames[-1]["type"] == "agent_response"

    run(main)


def test_start_agent_reuses_the_tenants_assistant(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            first = await client.call("start_agent", "agent_started", assistant="same")
            second = await client.call("start_agent", "agent_started", assistant="same")
            other = await client.call("start_agent", "agent_started", assistant="other")
            assert first["assistant_id"] == second["assistant_id"] != other["assistant_id"]
            assert first["thread_id"] != second["thread_id"]
            assert first["agent_id"] != second["agent_id"]

    run(main)


def test_start_agent_startup_ms_measures_the_delay(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--startup-ms", "120:120", "--chunk-delay-ms", "0:0")

    async def main() -> None:
        async with open_client(server) as client:
            began = time.monotonic()
            started = await client.call("start_agent", "agent_started", assistant="slow")
            elapsed_ms = (time.monotonic() - began) * 1000
            assert 110 <= started["startup_ms"] <= elapsed_ms + 5

    run(main)


def test_start_agents_start_concurrently(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--startup-ms", "200:200")

    async def main() -> None:
        async with open_client(server) as client:
            ids = [await client.request("start_agent", assistant="a") for _ in range(5)]
            replies = [await client.reply(request_id, "agent_started") for request_id in ids]
            # Each start-up ran during [arrival - startup_ms, arrival] by the server's own
            # account; run one after another, those spans would be disjoint. They share an
            # instant: the five ran at once. (No wall-clock limit: a slow machine delays
            # every arrival alike.)
            arrivals = [client.arrived(reply) * 1000 for reply in replies]
            spans = [(end - reply["startup_ms"], end) for reply, end in zip(replies, arrivals, strict=True)]
            assert all(reply["startup_ms"] >= 200 for reply in replies)
            assert max(start for start, _ in spans) < min(end for _, end in spans), spans

    run(main)


def test_user_message_acks_streams_and_replies(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            thread_id = await new_thread(client)
            frames = await client.turn(thread_id, "hello, world")
            kinds = [f["type"] for f in frames]
            assert kinds == ["ack"] + ["agent_chunk"] * 4 + ["agent_response"]
            ack, *chunks, response = frames
            assert ack["thread_id"] == thread_id and isinstance(ack["message_id"], str)
            assert [c["seq"] for c in chunks] == [0, 1, 2, 3]
            assert all(c["thread_id"] == thread_id for c in chunks)
            assert "".join(c["delta"] for c in chunks) == response["content"]
            assert response["content"] == "echo: hello, world"
            assert response["message_id"] != ack["message_id"]
            assert response["thread_id"] == thread_id

    run(main)


def test_user_message_content_may_be_empty_or_unicode(
    fast_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            thread_id = await new_thread(client)
            for content in ["", 'é\u0301 \U0001f600 \u202e \x00 \\u0000 "quoted"', "x" * 16_384]:
                frames = await client.turn(thread_id, content)
                assert frames[-1]["content"] == "echo: " + content
                assert "".join(f["delta"] for f in frames if f["type"] == "agent_chunk") == (
                    "echo: " + content
                )

    run(main)


def test_user_message_content_limit_is_utf8_bytes(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            thread_id = await new_thread(client)
            exactly = "é" * 8192  # 16,384 bytes
            assert (await client.turn(thread_id, exactly))[-1]["type"] == "agent_response"
            over = "é" * 8192 + "x"  # 16,385 bytes, 8,193 characters
            error = await client.call("user_message", thread_id=thread_id, content=over)
            assert error["type"] == "error" and error["code"] == "bad_request"
            assert (await client.call("ping", "pong"))["type"] == "pong"

    run(main)


def test_join_and_leave_answer_with_the_thread(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant, "a") as owner,
            open_client(fast_server, tenant, "b") as other,
        ):
            thread_id = await new_thread(owner)
            joined = await other.call("join_thread", "joined", thread_id=thread_id)
            assert joined == {"type": "joined", "re": joined["re"], "thread_id": thread_id}
            again = await other.call("join_thread", "joined", thread_id=thread_id)
            assert again["type"] == "joined"
            left = await other.call("leave_thread", "left", thread_id=thread_id)
            assert left == {"type": "left", "re": left["re"], "thread_id": thread_id}
            # Leaving a thread of the tenant that is not joined still answers left.
            left = await other.call("leave_thread", "left", thread_id=thread_id)
            assert left["type"] == "left"

    run(main)


def test_user_message_needs_a_join(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant, "a") as owner,
            open_client(fast_server, tenant, "b") as other,
        ):
            thread_id = await new_thread(owner)
            error = await other.call("user_message", thread_id=thread_id, content="hi")
            assert error["type"] == "error" and error["code"] == "bad_request"
            await other.call("join_thread", "joined", thread_id=thread_id)
            assert (await other.turn(thread_id, "hi"))[-1]["type"] == "agent_response"
            await other.call("leave_thread", "left", thread_id=thread_id)
            error = await other.call("user_message", thread_id=thread_id, content="again")
            assert error["code"] == "bad_request"

    run(main)


def test_get_history_is_oldest_first_and_limit_keeps_newest(
    fast_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant, "alice") as client:
            thread_id = await new_thread(client)
            acks, replies = [], []
            for n in range(3):
                frames = await client.turn(thread_id, f"m{n}")
                acks.append(frames[0]["message_id"])
                replies.append(frames[-1]["message_id"])
            history = await client.call("get_history", "history", thread_id=thread_id)
            assert history["thread_id"] == thread_id
            messages = history["messages"]
            assert [m["message_id"] for m in messages] == [
                x for pair in zip(acks, replies, strict=True) for x in pair
            ]
            assert [m["role"] for m in messages] == ["user", "assistant"] * 3
            assert [m["content"] for m in messages[:2]] == ["m0", "echo: m0"]
            assert messages[0]["user"] == "alice" and "user" not in messages[1]
            times = [m["created_at"] for m in messages]
            assert times == sorted(times) and all(isinstance(t, float) for t in times)
            tail = await client.call("get_history", "history", thread_id=thread_id, limit=3)
            assert tail["messages"] == messages[-3:]
            one = await client.call("get_history", "history", thread_id=thread_id, limit=1)
            assert one["messages"] == messages[-1:]
            everything = await client.call(
                "get_history", "history", thread_id=thread_id, limit=10**30
            )
            assert everything["messages"] == messages

    run(main)


def test_get_history_needs_no_join(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant, "a") as owner,
            open_client(fast_server, tenant, "b") as other,
        ):
            thread_id = await new_thread(owner)
            await owner.turn(thread_id, "visible")
            history = await other.call("get_history", "history", thread_id=thread_id)
            assert [m["content"] for m in history["messages"]] == ["visible", "echo: visible"]
            empty_thread = await new_thread(owner)
            history = await other.call("get_history", "history", thread_id=empty_thread)
            assert history["messages"] == []

    run(main)


def test_list_threads_is_oldest_first_with_counts(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            listed = await client.call("list_threads", "threads")
            assert listed["threads"] == []
            first = await new_thread(client, "alpha")
            second = await new_thread(client, "beta")
            await client.turn(first, "one")
            await client.turn(first, "two")
            await client.turn(second, "three")
            listed = await client.call("list_threads", "threads")
            threads = listed["threads"]
            assert [t["thread_id"] for t in threads] == [first, second]
            assert [t["assistant"] for t in threads] == ["alpha", "beta"]
            assert [t["message_count"] for t in threads] == [4, 2]
            assert threads[0]["created_at"] <= threads[1]["created_at"]

    run(main)


def test_ping_answers_pong_with_server_time(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            pong = await client.call("ping", "pong", id="p-1")
            assert pong["re"] == "p-1" and pong["type"] == "pong"
            assert abs(pong["server_time"] - time.time()) < 5

    run(main)


def test_request_ids_are_echoed_verbatim(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            for request_id in ["", "x" * 64, "é\U0001f600", "1", " spaced id "]:
                pong = await client.call("ping", "pong", id=request_id or None)
                if request_id:
                    assert pong["re"] == request_id
            await client.send({"type": "ping", "id": ""})
            assert (await client.reply("", "pong"))["re"] == ""

    run(main)


def test_unknown_fields_are_ignored(fast_server: ServerProcess) -> None:
    async def main() -> None:
        async with open_client(fast_server) as client:
            pong = await client.call("ping", "pong", extra={"nested": [1, 2]}, more=None)
            assert pong["type"] == "pong"

    run(main)
