"""Tenancy, fan-out and turns (PROTOCOL.md "Tenancy model", "Requests and replies", guarantees 1-5).

Rules under test: tenants are isolated and compared exactly (the same user
id in two tenants is two people; ids differing only by case or by Unicode
normalisation are different tenants); fan-out (`thread_message`, chunks and
`agent_response` without `re`) reaches every other connection joined when
the turn began and still joined, and nobody else; a requester that leaves
during its own turn still gets its `re` frames; a turn finishes and is
stored after its requester disconnects; a thread runs one turn at a time,
so a message that arrives while a reply streams is acked only after that
reply is committed, and history alternates.
"""

from __future__ import annotations

import unicodedata

import trio

from .wsclient import ServerProcess, new_thread, open_client, run


def _assert_isolated(
    fast_server: ServerProcess, tenant_a: str, tenant_b: str, user_a: str, user_b: str
) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant_a, user_a) as a,
            open_client(fast_server, tenant_b, user_b) as b,
        ):
            assert a.welcome["tenant"] == tenant_a and b.welcome["tenant"] == tenant_b
            thread_a = await new_thread(a, "shared-name")
            thread_b = await new_thread(b, "shared-name")
            await a.turn(thread_a, "for tenant a only")
            listed_b = await b.call("list_threads", "threads")
            assert [t["thread_id"] for t in listed_b["threads"]] == [thread_b]
            for kind, extra in [("get_history", {}), ("join_thread", {}), ("leave_thread", {})]:
                error = await b.call(kind, thread_id=thread_a, **extra)
                assert error["code"] == "not_found"
            assert not any("for tenant a only" in raw for raw in b.raw)
            assert not any(thread_a in raw for raw in b.raw)

    run(main)


def test_tenant_same_user_id_in_two_tenants_are_two_people(
    fast_server: ServerProcess, tenant: str
) -> None:
    _assert_isolated(fast_server, tenant + "-acme", tenant + "-globex", "alice", "alice")


def test_tenant_ids_differing_only_by_case_are_distinct(
    fast_server: ServerProcess, tenant: str
) -> None:
    _assert_isolated(fast_server, tenant.upper() + "-X", tenant.lower() + "-x", "u", "u")


def test_tenant_ids_differing_only_by_normalisation_are_distinct(
    fast_server: ServerProcess, tenant: str
) -> None:
    nfc = unicodedata.normalize("NFC", f"café-{tenant}")
    nfd = unicodedata.normalize("NFD", f"café-{tenant}")
    assert nfc != nfd
    _assert_isolated(fast_server, nfc, nfd, "zoë", unicodedata.normalize("NFD", "zoë"))

    async def main() -> None:
        async with open_client(fast_server, nfd, nfd) as client:
            assert client.welcome["tenant"] == nfd and client.welcome["user"] == nfd

    run(main)


def test_tenant_assistant_names_are_per_tenant(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant + "-1") as a,
            open_client(fast_server, tenant + "-2") as b,
        ):
            started_a = await a.call("start_agent", "agent_started", assistant="twin")
            started_b = await b.call("start_agent", "agent_started", assistant="twin")
            assert started_a["assistant_id"] != started_b["assistant_id"]

    run(main)


def test_fanout_reaches_other_joined_connections_only(
    fast_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant, "alice") as alice,
            open_client(fast_server, tenant, "bob") as bob,
            open_client(fast_server, tenant, "alice") as alice2,
            open_client(fast_server, tenant, "carol") as carol,
            open_client(fast_server, tenant, "dave") as dave,
            open_client(fast_server, tenant + "-other", "bob") as stranger,
        ):
            thread_id = await new_thread(alice)
            for watcher in (bob, alice2, carol):
                await watcher.call("join_thread", "joined", thread_id=thread_id)
            await carol.call("leave_thread", "left", thread_id=thread_id)
            frames = await alice.turn(thread_id, "news")
            ack, response = frames[0], frames[-1]
            for watcher in (bob, alice2):
                response_seen = await watcher.wait_for(
                    lambda f: f["type"] == "agent_response" and f["thread_id"] == thread_id
                )
                fanned = [f for f in watcher.frames if f.get("thread_id") == thread_id]
                fanned = [f for f in fanned if f["type"] not in ("joined", "left")]
                assert all("re" not in f for f in fanned)
                assert [f["type"] for f in fanned] == (
                    ["thread_message"] + ["agent_chunk"] * 4 + ["agent_response"]
                )
                message = fanned[0]
                assert message == {
                    "type": "thread_message",
                    "thread_id": thread_id,
                    "message_id": ack["message_id"],
                    "role": "user",
                    "user": "alice",
                    "content": "news",
                }
                assert [f["seq"] for f in fanned[1:5]] == [0, 1, 2, 3]
                assert response_seen["message_id"] == response["message_id"]
                assert response_seen["content"] == "echo: news"
            # The requester gets its frames once, with re, and no thread_message.
            assert not alice.of_type("thread_message")
            assert len(alice.of_type("agent_response")) == 1
            await trio.sleep(0.2)
            for outsider in (carol, dave, stranger):
                assert not any(f.get("type") in ("thread_message", "agent_chunk", "agent_response")
                               for f in outsider.frames)  # fmt: skip

    run(main)


def test_fanout_goes_only_to_connections_joined_when_the_turn_began(
    paced_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with (
            open_client(paced_server, tenant, "a") as a,
            open_client(paced_server, tenant, "late") as late,
            open_client(paced_server, tenant, "leaver") as leaver,
        ):
            thread_id = await new_thread(a)
            await leaver.call("join_thread", "joined", thread_id=thread_id)
            request_id = await a.request("user_message", thread_id=thread_id, content="x")
            await a.reply(request_id, "ack")
            await late.call("join_thread", "joined", thread_id=thread_id)
            await leaver.wait_for(lambda f: f["type"] == "agent_chunk")
            await leaver.call("leave_thread", "left", thread_id=thread_id)
            await a.reply(request_id, "agent_response")
            await trio.sleep(0.1)
            # Joined after the turn began: none of this turn's frames.
            assert not [f for f in late.frames if f.get("type", "").startswith("agent_")]
            # Left mid-turn: nothing after the leave.
            left_at = next(i for i, f in enumerate(leaver.frames) if f["type"] == "left")
            assert not [f for f in leaver.frames[left_at:] if f["type"].startswith("agent_")]
            assert not leaver.of_type("agent_response")

    run(main)


def test_fanout_stops_for_a_connection_that_leaves_and_joins_again_mid_turn(
    paced_server: ServerProcess, tenant: str
) -> None:
    """A watcher sees a turn whole or not at all: a re-join mid-turn waits for the next turn."""

    async def main() -> None:
        async with open_client(paced_server, tenant, "a") as a, open_client(paced_server, tenant, "w") as w:
            thread_id = await new_thread(a)
            await w.call("join_thread", "joined", thread_id=thread_id)
            first = await a.request("user_message", thread_id=thread_id, content="one")
            await w.wait_for(lambda f: f["type"] == "agent_chunk")
            await w.call("leave_thread", "left", thread_id=thread_id)
            await w.call("join_thread", "joined", thread_id=thread_id)
            rejoined_at = len(w.frames)
            await a.reply(first, "agent_response")
            second = await a.request("user_message", thread_id=thread_id, content="two")
            await a.reply(second, "agent_response")
            await w.wait_for(lambda f: f["type"] == "agent_response" and f["content"] == "echo: two")
            after = [f for f in w.frames[rejoined_at:] if f["type"] in ("thread_message", "agent_chunk", "agent_response")]
            # Nothing more of the first turn; the second whole, in order.
            assert [f["type"] for f in after] == ["thread_message", *["agent_chunk"] * 4, "agent_response"], after
            assert "".join(f["delta"] for f in after if f["type"] == "agent_chunk") == "echo: two"

    run(main)


def test_turn_requester_that_leaves_still_gets_its_frames(
    paced_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with open_client(paced_server, tenant) as client:
            thread_id = await new_thread(client)
            request_id = await client.request("user_message", thread_id=thread_id, content="bye")
            await client.reply(request_id, "ack")
            await client.call("leave_thread", "left", thread_id=thread_id)
            response = await client.reply(request_id, "agent_response")
            assert response["content"] == "echo: bye"
            chunks = [f for f in client.frames if f["type"] == "agent_chunk"]
            assert [c["seq"] for c in chunks] == [0, 1, 2, 3]
            assert all(c["re"] == request_id for c in chunks)

    run(main)


def test_turn_finishes_after_the_requester_disconnects(
    paced_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with open_client(paced_server, tenant) as client:
            thread_id = await new_thread(client)
            request_id = await client.request("user_message", thread_id=thread_id, content="gone")
            await client.reply(request_id, "ack")
        # Closed mid-reply; the reply is still stored.
        async with open_client(paced_server, tenant, "someone-else") as other:
            with trio.fail_after(5):
                while True:
                    history = await other.call("get_history", "history", thread_id=thread_id)
                    if len(history["messages"]) == 2:
                        break
                    await trio.sleep(0.05)
            assert [m["content"] for m in history["messages"]] == ["gone", "echo: gone"]

    run(main)


def test_turn_abrupt_disconnect_mid_reply_is_harmless(
    paced_server: ServerProcess, tenant: str
) -> None:
    async def main() -> None:
        async with open_client(paced_server, tenant, "watcher") as watcher:
            async with open_client(paced_server, tenant) as client:
                thread_id = await new_thread(client)
                await watcher.call("join_thread", "joined", thread_id=thread_id)
                request_id = await client.request(
                    "user_message", thread_id=thread_id, content="cut"
                )
                await client.wait_for(
                    lambda f: f.get("re") == request_id and f["type"] == "agent_chunk"
                )
                # Drop the TCP connection without a closing handshake.
                await client.ws._stream.aclose()  # noqa: SLF001
            # The other joined connection still sees the whole turn.
            response = await watcher.wait_for(lambda f: f["type"] == "agent_response")
            assert response["content"] == "echo: cut"
            assert (await watcher.call("ping", "pong"))["type"] == "pong"

    run(main)


def test_turn_one_at_a_time_per_thread(paced_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with (
            open_client(paced_server, tenant, "a") as a,
            open_client(paced_server, tenant, "b") as b,
        ):
            thread_id = await new_thread(a)
            await b.call("join_thread", "joined", thread_id=thread_id)
            first = await a.request("user_message", thread_id=thread_id, content="first")
            await a.reply(first, "ack")
            second = await b.request("user_message", thread_id=thread_id, content="second")
            ack2 = await b.reply(second, "ack")
            response1 = await a.reply(first, "agent_response")
            # b's ack came after a's reply was committed: b saw a's response
            # (fan-out) before its own ack.
            response1_at_b = await b.wait_for(
                lambda f: f["type"] == "agent_response" and "re" not in f
            )
            assert b.arrived(response1_at_b) <= b.arrived(ack2)
            await b.reply(second, "agent_response")
            history = await a.call("get_history", "history", thread_id=thread_id)
            assert [m["content"] for m in history["messages"]] == [
                "first",
                "echo: first",
                "second",
                "echo: second",
            ]
            assert history["messages"][1]["message_id"] == response1["message_id"]

    run(main)


def test_turn_pipelined_messages_keep_their_order(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with open_client(fast_server, tenant) as client:
            thread_id = await new_thread(client)
            ids = [
                await client.request("user_message", thread_id=thread_id, content=f"n{n}")
                for n in range(20)
            ]
            for request_id in ids:
                await client.reply(request_id, "agent_response")
            history = await client.call("get_history", "history", thread_id=thread_id)
            contents = [m["content"] for m in history["messages"]]
            assert contents == [x for n in range(20) for x in (f"n{n}", f"echo: n{n}")]
            # Exactly one response per request, each with its own chunks in order.
            for request_id in ids:
                mine = [f for f in client.frames if f.get("re") == request_id]
                assert [f["type"] for f in mine] == ["ack"] + ["agent_chunk"] * 4 + [
                    "agent_response"
                ]

    run(main)


def test_turn_join_then_message_pipelined(fast_server: ServerProcess, tenant: str) -> None:
    async def main() -> None:
        async with (
            open_client(fast_server, tenant, "a") as a,
            open_client(fast_server, tenant, "b") as b,
        ):
            thread_id = await new_thread(a)
            await b.request("join_thread", thread_id=thread_id)
            request_id = await b.request("user_message", thread_id=thread_id, content="quick")
            assert (await b.reply(request_id, "agent_response"))["type"] == "agent_response"

    run(main)
