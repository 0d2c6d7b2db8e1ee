"""Planted faults: `--fault NAME` installs each one, and each shows its bug when scripted directly.

These are sanity checks of the modifiers in `partywall_agentserver/faults.py`, not
proofs that the suite's invariants catch them (those live with the suite).
Rules under test: every name in ARCHITECTURE.md's table is accepted and
changes the server's behaviour in exactly the way the table says; the
behaviour without the fault is covered by the conformance tests next to
this file, and the later tests here also run their script against a clean
server (the session's shared one, on a tenant of their own) to show the
difference. Each test runs its own server on 127.0.0.1 port 0, time-bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from .test_handshake import raw_handshake, status_of
from .wsclient import FAST, OMIT, ServerProcess, b64url, make_token, new_thread, open_client, run

PACED = ["--startup-ms", "0:0", "--chunks", "4", "--chunk-delay-ms", "60:60"]


def test_fault_foreign_thread_lookup_lets_a_tenant_read_another(start_server: Any) -> None:
    server = start_server(*FAST, "--fault", "foreign_thread_lookup")

    async def main() -> None:
        async with open_client(server, "acme") as owner, open_client(server, "globex") as intruder:
            thread_id = await new_thread(owner)
            await owner.turn(thread_id, "acme's secret")
            history = await intruder.call("get_history", "history", thread_id=thread_id)
            assert [m["content"] for m in history["messages"]][:1] == ["acme's secret"]
            assert (await intruder.call("join_thread", "joined", thread_id=thread_id))[
                "type"
            ] == "joined"

    run(main)


def test_fault_assistant_by_name_shares_assistants_across_tenants(start_server: Any) -> None:
    server = start_server(*FAST, "--fault", "assistant_by_name")

    async def main() -> None:
        async with open_client(server, "acme") as a, open_client(server, "globex") as b:
            first = await a.call("start_agent", "agent_started", assistant="bot")
            second = await b.call("start_agent", "agent_started", assistant="bot")
            assert first["assistant_id"] == second["assistant_id"]

    run(main)


def test_fault_case_insensitive_user_folds_the_welcomes_user(start_server: Any) -> None:
    server = start_server(*FAST, "--fault", "case_insensitive_user")

    async def main() -> None:
        async with open_client(server, "acme", "Alice") as upper, open_client(server, "acme", "alice") as lower:
            assert upper.welcome["user"] == lower.welcome["user"] == "alice"

    run(main)


def test_fault_not_found_names_owner_tells_foreign_from_missing(start_server: Any) -> None:
    server = start_server(*FAST, "--fault", "not_found_names_owner")

    async def main() -> None:
        async with open_client(server, "acme") as owner, open_client(server, "globex") as prober:
            thread_id = await new_thread(owner)
            foreign = await prober.call("get_history", thread_id=thread_id, id="q")
            missing = await prober.call("get_history", thread_id="no-such-thread", id="q2")
            assert foreign["code"] == missing["code"] == "not_found"
            assert foreign["message"] != missing["message"]

    run(main)


def test_fault_sticky_subscription_keeps_fanout_after_leave(start_server: Any) -> None:
    server = start_server(*FAST, "--fault", "sticky_subscription")

    async def main() -> None:
        async with open_client(server, "acme", "a") as a, open_client(server, "acme", "b") as b:
            thread_id = await new_thread(a)
            await b.call("join_thread", "joined", thread_id=thread_id)
            assert (await b.call("leave_thread", "left", thread_id=thread_id))["type"] == "left"
            await a.turn(thread_id, "after the leave")
            leaked = await b.wait_for(lambda f: f["type"] == "thread_message")
            assert leaked["content"] == "after the leave"

    run(main)


def test_fault_lazy_commit_loses_acked_messages_on_sigkill(start_server: Any) -> None:
    server = start_server(*FAST, "--fault", "lazy_commit")
    acked: list[str] = []
    state: dict[str, str] = {}

    async def main() -> None:
        async with open_client(server, "acme") as client:
            thread_id = await new_thread(client)
            state["thread_id"] = thread_id
            for n in range(3):
                frames = await client.turn(thread_id, f"m{n}")
                acked.append(frames[0]["message_id"])
            server.kill()

    run(main)
    server.restart()

    async def after() -> None:
        async with open_client(server, "acme") as client:
            history = await client.call("get_history", "history", thread_id=state["thread_id"])
            stored = {m["message_id"] for m in history["messages"]}
            assert not set(acked) <= stored, "acked messages survived: the fault is not installed"

    run(after)


def test_fault_queued_turn_double_reply_answers_a_waiting_turn_twice(start_server: Any) -> None:
    server = start_server(*PACED, "--fault", "queued_turn_double_reply")

    async def main() -> None:
        async with open_client(server) as client:
            thread_id = await new_thread(client)
            first = await client.request("user_message", thread_id=thread_id, content="one")
            second = await client.request("user_message", thread_id=thread_id, content="two")
            await client.reply(second, "agent_response")
            await trio.sleep(0.2)
            responses = [f["re"] for f in client.of_type("agent_response")]
            assert responses.count(first) == 1
            assert responses.count(second) == 2

    run(main)


def test_fault_history_by_id_breaks_commit_order(start_server: Any) -> None:
    server = start_server(*FAST, "--fault", "history_by_id")

    async def main() -> None:
        async with open_client(server) as client:
            thread_id = await new_thread(client)
            committed = []
            for n in range(10):
                frames = await client.turn(thread_id, f"m{n}")
                committed += [frames[0]["message_id"], frames[-1]["message_id"]]
            history = await client.call("get_history", "history", thread_id=thread_id)
            returned = [m["message_id"] for m in history["messages"]]
            assert sorted(returned) == returned != committed

    run(main)


def test_fault_lost_wakeup_never_acks_a_queued_message(start_server: Any) -> None:
    server = start_server(*PACED, "--fault", "lost_wakeup")

    async def main() -> None:
        async with open_client(server) as client:
            thread_id = await new_thread(client)
            first = await client.request("user_message", thread_id=thread_id, content="one")
            second = await client.request("user_message", thread_id=thread_id, content="two")
            await client.reply(first, "agent_response")
            await trio.sleep(1.0)
            assert not [f for f in client.frames if f.get("re") == second]
            # The thread is free again for new arrivals, which is what hides the bug.
            assert (await client.turn(thread_id, "three"))[-1]["type"] == "agent_response"

    run(main)


def test_fault_serial_startup_runs_start_ups_one_at_a_time(start_server: Any) -> None:
    server = start_server("--startup-ms", "200:200", "--fault", "serial_startup")

    async def main() -> None:
        async with open_client(server) as client:
            began = trio.current_time()
            ids = [await client.request("start_agent", assistant="a") for _ in range(4)]
            for request_id in ids:
                await client.reply(request_id, "agent_started")
            assert trio.current_time() - began >= 0.75  # four 200 ms start-ups in a row

    run(main)


def test_fault_content_limit_code_says_too_large(start_server: Any) -> None:
    # Installed through the environment variable this time.
    server = start_server(*FAST, env={"AGENTSERVER_FAULT": "content_limit_code"})

    async def main() -> None:
        async with open_client(server) as client:
            thread_id = await new_thread(client)
            error = await client.call("user_message", thread_id=thread_id, content="x" * 16_385)
            assert (error["type"], error["code"]) == ("error", "too_large")
            assert (await client.call("ping", "pong"))["type"] == "pong"  # still open

    run(main)


def test_fault_installation_is_announced_on_stderr(start_server: Any) -> None:
    server: ServerProcess = start_server(*FAST, "--fault", "history_by_id")
    assert server.terminate() == 0
    assert "history_by_id" in server.stderr_text()


# -- the faults below each run one script against the faulty server and a clean one --------


def test_fault_verbose_errors_puts_the_exception_in_the_message(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "verbose_errors")

    async def message_for(target: ServerProcess) -> str:
        async with open_client(target, tenant) as client:
            await client.send('{"type": "ping", "id": "x",')
            return str((await client.wait_for(lambda f: f["type"] == "error"))["message"])

    async def main() -> None:
        assert "JSONDecodeError: Expecting" in await message_for(server)
        assert "Error" not in await message_for(fast_server)

    run(main)


OVERSIZED = json.dumps({"type": "ping", "id": "big", "pad": "y" * 70_000})


async def oversized_answer(
    target: ServerProcess, tenant: str, payload: str = OVERSIZED
) -> tuple[list[dict[str, Any]], int | None]:
    """The error frames an oversized message earns, and the close code (None: open after 1 s)."""
    async with open_client(target, tenant) as client:
        try:
            await client.send(payload)
        except ConnectionClosed:
            pass  # closed while we were still sending it
        with trio.move_on_after(1.0):
            await client.wait_closed()
        return client.of_type("error"), client.close_code


def test_fault_parse_before_size_echoes_the_id_on_too_large(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "parse_before_size")

    async def main() -> None:
        errors, code = await oversized_answer(server, tenant)
        assert [(e["code"], e.get("re")) for e in errors] == [("too_large", "big")] and code == 1009
        errors, code = await oversized_answer(fast_server, tenant)
        assert [(e["code"], e.get("re")) for e in errors] == [("too_large", None)] and code == 1009

    run(main)


def test_fault_oversize_stays_open_keeps_answering_after_too_large(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "oversize_stays_open")

    async def main() -> None:
        async with open_client(server, tenant) as client:
            await client.send(OVERSIZED)
            error = await client.wait_for(lambda f: f["type"] == "error")
            assert error["code"] == "too_large"
            assert (await client.call("ping", "pong"))["type"] == "pong"
            assert client.close_code is None
        errors, code = await oversized_answer(fast_server, tenant)
        assert [e["code"] for e in errors] == ["too_large"] and code == 1009

    run(main)


def test_fault_transport_cut_1mib_closes_without_too_large(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "transport_cut_1mib")
    two_mib = json.dumps({"type": "ping", "id": "two", "pad": "v" * (2 << 20)})

    async def main() -> None:
        assert await oversized_answer(server, tenant, two_mib) == ([], 1009)
        errors, code = await oversized_answer(server, tenant)  # under 1 MiB: our own rule
        assert [e["code"] for e in errors] == ["too_large"] and code == 1009
        errors, code = await oversized_answer(fast_server, tenant, two_mib)
        assert [e["code"] for e in errors] == ["too_large"] and code == 1009

    run(main)


def test_fault_bool_is_int_limit_takes_true_as_one(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "bool_is_int_limit")

    async def read_with_true(target: ServerProcess) -> dict[str, Any]:
        async with open_client(target, tenant) as client:
            thread_id = await new_thread(client)
            await client.turn(thread_id, "one")
            return await client.call("get_history", thread_id=thread_id, limit=True)

    async def main() -> None:
        history = await read_with_true(server)
        assert history["type"] == "history" and len(history["messages"]) == 1
        error = await read_with_true(fast_server)
        assert (error["type"], error["code"]) == ("error", "bad_request")

    run(main)


def test_fault_surrogates_pass_answers_a_lone_surrogate(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "surrogates_pass")

    async def answer(target: ServerProcess) -> dict[str, Any]:
        async with open_client(target, tenant) as client:
            await client.send('{"type": "ping", "id": "s", "note": "\\ud800"}')
            return await client.reply("s")

    async def main() -> None:
        assert (await answer(server))["type"] == "pong"
        refused = await answer(fast_server)
        assert (refused["type"], refused["code"]) == ("error", "bad_request")

    run(main)


def test_fault_chunks_race_sends_chunks_out_of_order(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "chunks_race")

    async def seqs_of_turns(target: ServerProcess) -> list[list[int]]:
        async with open_client(target, tenant) as client:
            thread_id = await new_thread(client)
            turns = []
            for n in range(8):
                frames = await client.turn(thread_id, f"message {n}")
                assert frames[-1]["type"] == "agent_response"  # the reply still comes last
                turns.append([f["seq"] for f in frames if f["type"] == "agent_chunk"])
            return turns

    async def main() -> None:
        raced = await seqs_of_turns(server)
        assert all(sorted(seqs) == [0, 1, 2, 3] for seqs in raced)
        assert any(seqs != [0, 1, 2, 3] for seqs in raced), raced
        assert all(seqs == [0, 1, 2, 3] for seqs in await seqs_of_turns(fast_server))

    run(main)


def test_fault_echo_to_requester_sends_the_requester_its_own_fanout(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "echo_to_requester")

    async def copies(target: ServerProcess) -> list[dict[str, Any]]:
        async with open_client(target, tenant) as client:
            thread_id = await new_thread(client)
            frames = await client.turn(thread_id, "mine")
            await trio.sleep(0.1)
            ids = {frames[0]["message_id"], frames[-1]["message_id"]}
            return [f for f in client.frames if "re" not in f and f.get("message_id") in ids]

    async def main() -> None:
        assert [f["type"] for f in await copies(server)] == ["thread_message", "agent_response"]
        assert await copies(fast_server) == []

    run(main)


def test_fault_rejoin_mid_turn_gives_the_rest_of_the_turn(
    start_server: Any, paced_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*PACED, "--fault", "rejoin_mid_turn")

    async def after_rejoin(target: ServerProcess) -> list[str]:
        """The fan-out frames a watcher gets of a turn after it leaves and joins again mid-turn."""
        async with open_client(target, tenant, "a") as a, open_client(target, tenant, "b") as b:
            thread_id = await new_thread(a)
            await b.call("join_thread", "joined", thread_id=thread_id)
            request_id = await a.request("user_message", thread_id=thread_id, content="turn")
            await b.wait_for(lambda f: f["type"] == "agent_chunk")
            await b.call("leave_thread", "left", thread_id=thread_id)
            rejoined = len(b.frames)
            await b.call("join_thread", "joined", thread_id=thread_id)
            await a.reply(request_id, "agent_response")
            await trio.sleep(0.1)
            return [f["type"] for f in b.frames[rejoined:] if "re" not in f]

    async def main() -> None:
        assert (await after_rejoin(server))[-1:] == ["agent_response"]
        assert await after_rejoin(paced_server) == []

    run(main)


def test_fault_alg_none_accepts_unsigned_tokens(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "alg_none")
    claims = {"tid": "acme", "sub": "alice", "exp": time.time() + 60}
    unsigned = b64url(b'{"alg":"none","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode()) + "."
    assert status_of(server, unsigned) == 101
    assert status_of(server, make_token(key="not-the-secret")) == 401  # signatures still count
    assert status_of(fast_server, unsigned) == 401


def test_fault_expired_accepted_lets_an_expired_token_in(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "expired_accepted")
    expired = make_token(ttl=-3600)
    assert status_of(server, expired) == 101
    assert status_of(server, make_token(exp=str(int(time.time()) + 60))) == 401  # still a number
    assert status_of(fast_server, expired) == 401


def test_fault_limit_keeps_oldest_returns_the_oldest_messages(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "limit_keeps_oldest")

    async def last_two(target: ServerProcess) -> list[str]:
        async with open_client(target, tenant) as client:
            thread_id = await new_thread(client)
            for content in ("old", "new"):
                await client.turn(thread_id, content)
            history = await client.call("get_history", "history", thread_id=thread_id, limit=2)
            return [m["content"] for m in history["messages"]]

    async def main() -> None:
        assert await last_two(server) == ["old", "echo: old"]
        assert await last_two(fast_server) == ["new", "echo: new"]

    run(main)


def test_fault_list_all_tenants_lists_other_tenants_threads(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "list_all_tenants")

    async def listed_by_other(target: ServerProcess) -> tuple[str, set[str]]:
        async with open_client(target, tenant) as owner, open_client(target, tenant + "-b") as other:
            thread_id = await new_thread(owner)
            threads = await other.call("list_threads", "threads")
            return thread_id, {t["thread_id"] for t in threads["threads"]}

    async def main() -> None:
        thread_id, listed = await listed_by_other(server)
        assert thread_id in listed
        thread_id, listed = await listed_by_other(fast_server)
        assert thread_id not in listed

    run(main)


def test_fault_count_user_messages_only_leaves_replies_out_of_the_count(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "count_user_messages_only")

    async def count(target: ServerProcess) -> int:
        async with open_client(target, tenant) as client:
            thread_id = await new_thread(client)
            await client.turn(thread_id, "one")
            threads = await client.call("list_threads", "threads")
            return int(next(t for t in threads["threads"] if t["thread_id"] == thread_id)["message_count"])

    async def main() -> None:
        assert await count(server) == 1
        assert await count(fast_server) == 2

    run(main)


def test_fault_count_per_assistant_counts_the_sibling_threads_messages_too(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "count_per_assistant")

    async def count_of_quiet_sibling(target: ServerProcess) -> int:
        async with open_client(target, tenant) as client:
            busy = await new_thread(client, "helper")
            quiet = await new_thread(client, "helper")
            await client.turn(busy, "one")
            threads = await client.call("list_threads", "threads")
            return int(next(t for t in threads["threads"] if t["thread_id"] == quiet)["message_count"])

    async def main() -> None:
        assert await count_of_quiet_sibling(server) == 2
        assert await count_of_quiet_sibling(fast_server) == 0

    run(main)


def test_fault_reply_to_first_device_sends_the_reply_to_the_users_other_connection(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "reply_to_first_device")

    async def with_re(target: ServerProcess) -> tuple[list[str], list[str]]:
        """The types of frames with `re` that the user's first and second device get for the second's turn."""
        async with open_client(target, tenant, "alice") as first, open_client(
            target, tenant, "alice"
        ) as second:
            thread_id = await new_thread(first)
            await second.call("join_thread", "joined", thread_id=thread_id)
            request_id = await second.request("user_message", thread_id=thread_id, content="mine")
            await (first if target is server else second).reply(request_id, "agent_response")
            await trio.sleep(0.1)
            return [
                [f["type"] for f in client.frames if f.get("re") == request_id]
                for client in (first, second)
            ]

    async def main() -> None:
        first, second = await with_re(server)
        assert first[:1] == ["ack"] and first[-1:] == ["agent_response"] and second == []
        assert await with_re(fast_server) == [[], first]

    run(main)


def test_fault_recovery_uncommitted_leaves_a_pending_message_unanswered(
    start_server: Any,
) -> None:
    state: dict[str, Any] = {}

    def crash_mid_turn(server: ServerProcess) -> list[tuple[str, str]]:
        """Kill the server while a turn streams, restart it, and read the thread back."""

        async def main() -> None:
            async with open_client(server, "crash") as client:
                thread_id = await new_thread(client)
                request_id = await client.request(
                    "user_message", thread_id=thread_id, content="pending"
                )
                await client.reply(request_id, "ack")
                state["thread_id"] = thread_id
                server.kill()
                await client.wait_closed()

        run(main)
        server.restart()

        async def after() -> list[tuple[str, str]]:
            async with open_client(server, "crash") as client:
                history = await client.call("get_history", "history", thread_id=state["thread_id"])
                return [(m["role"], m["content"]) for m in history["messages"]]

        return run(after)  # type: ignore[no-any-return]

    slow = ["--startup-ms", "0:0", "--chunks", "4", "--chunk-delay-ms", "300:300"]
    faulty = start_server(*slow, "--fault", "recovery_uncommitted")
    assert crash_mid_turn(faulty) == [("user", "pending")]
    clean = start_server(*slow)
    assert crash_mid_turn(clean) == [("user", "pending"), ("assistant", "echo: pending")]


def test_fault_any_path_accepted_opens_other_paths(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "any_path_accepted")
    token = make_token()
    for path in ("/", "/wsx", "/ws/", "/ws/admin", "/ws/../admin"):
        assert status_of(server, token, target=path) == 101, path
        assert status_of(fast_server, token, target=path) == 404, path
    assert status_of(server, make_token(key="not-the-secret"), target="/admin") == 401  # tokens still count


def test_fault_token_before_path_answers_401_on_another_path(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "token_before_path")
    forged = make_token(key="not-the-secret")
    for path in ("/", "/ws/admin"):
        assert status_of(server, forged, target=path) == 401, path
        assert status_of(fast_server, forged, target=path) == 404, path
        assert status_of(server, make_token(), target=path) == 404, path  # a valid token still gets the path's answer
    assert status_of(server, make_token()) == 101


def test_fault_refusal_says_why_puts_the_reason_in_the_401_body(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "refusal_says_why")
    headers = {"Authorization": "Bearer " + make_token(key="not-the-secret")}
    status, _, body = raw_handshake(server, "/ws", headers)
    assert status == 401 and b"token rejected" in body
    assert raw_handshake(fast_server, "/ws", headers)[::2] == (401, b"")


def test_fault_exp_whole_seconds_refuses_a_token_in_its_last_second(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "exp_whole_seconds")
    now = time.time()
    if now % 1 > 0.5:  # keep at least half a second between the handshake and exp
        time.sleep(1 - now % 1)
    exp = int(time.time()) + 0.999  # valid for half a second or more; its whole second is already past
    assert status_of(server, make_token(exp=exp)) == 401
    assert status_of(fast_server, make_token(exp=exp)) == 101
    assert status_of(server, make_token(exp=int(time.time()) + 2.5)) == 101  # its whole second still to come


def test_fault_query_wins_takes_the_query_token_over_the_header(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "query_wins")
    header = [(b"authorization", b"Bearer " + make_token(tenant, "alice").encode())]
    query = "token=" + make_token(tenant + "-other", "mallory")

    async def welcomed_as(target: ServerProcess) -> tuple[str, str]:
        async with open_client(target, headers=header, query=query) as client:
            return client.welcome["tenant"], client.welcome["user"]

    async def main() -> None:
        assert await welcomed_as(server) == (tenant + "-other", "mallory")
        assert await welcomed_as(fast_server) == (tenant, "alice")

    run(main)
    refused = {"Authorization": "Bearer " + make_token(key="not-the-secret")}
    assert raw_handshake(server, "/ws?" + query, refused)[0] == 101
    assert raw_handshake(fast_server, "/ws?" + query, refused)[0] == 401


def test_fault_threads_newest_first_lists_the_latest_thread_first(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "threads_newest_first")

    async def listed(target: ServerProcess) -> tuple[list[str], list[str]]:
        async with open_client(target, tenant + "-order") as client:
            started = [await new_thread(client) for _ in range(3)]
            threads = await client.call("list_threads", "threads")
            return started, [t["thread_id"] for t in threads["threads"] if t["thread_id"] in started]

    async def main() -> None:
        started, order = await listed(server)
        assert order == started[::-1]
        started, order = await listed(fast_server)
        assert order == started

    run(main)


def test_fault_created_at_millis_stamps_milliseconds(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "created_at_millis")

    async def stamps(target: ServerProcess) -> list[float]:
        async with open_client(target, tenant + "-clock") as client:
            thread_id = await new_thread(client)
            await client.turn(thread_id, "when?")
            history = await client.call("get_history", "history", thread_id=thread_id)
            threads = await client.call("list_threads", "threads")
            listed = [t["created_at"] for t in threads["threads"] if t["thread_id"] == thread_id]
            return [m["created_at"] for m in history["messages"]] + listed

    async def main() -> None:
        now = time.time()
        assert all(abs(t / 1000.0 - now) < 60 for t in await stamps(server))
        assert all(abs(t - now) < 60 for t in await stamps(fast_server))

    run(main)


def test_fault_counter_thread_ids_numbers_threads(start_server: Any, fast_server: ServerProcess, tenant: str) -> None:
    server = start_server(*FAST, "--fault", "counter_thread_ids")

    async def ids(target: ServerProcess) -> list[str]:
        async with open_client(target, tenant + "-a") as a, open_client(target, tenant + "-b") as b:
            return [await new_thread(a), await new_thread(b), await new_thread(a)]

    async def main() -> None:
        first, second, third = await ids(server)
        assert (first, second, third) == ("thread-1", "thread-2", "thread-3")  # across tenants, one count
        assert not any(i.startswith("thread-") for i in await ids(fast_server))

    run(main)


def test_fault_startup_in_microseconds_reports_a_thousand_times_the_start(start_server: Any, tenant: str) -> None:
    server = start_server("--startup-ms", "30:30", "--fault", "startup_in_microseconds")
    clean = start_server("--startup-ms", "30:30")

    async def said_and_waited(target: ServerProcess) -> tuple[float, float]:
        async with open_client(target, tenant) as client:
            began = time.monotonic()
            started = await client.call("start_agent", "agent_started", assistant="helper")
            return float(started["startup_ms"]), (time.monotonic() - began) * 1000.0

    async def main() -> None:
        said, waited = await said_and_waited(server)
        assert said > 20 * waited  # about 30,000 "ms" for a start the client saw take about 30
        said, waited = await said_and_waited(clean)
        assert 25 <= said <= waited

    run(main)


def test_fault_binary_closes_1003_closes_after_the_error(start_server: Any, fast_server: ServerProcess) -> None:
    server = start_server(*FAST, "--fault", "binary_closes_1003")

    async def after_binary(target: ServerProcess) -> tuple[str, int | None]:
        async with open_client(target) as client:
            await client.send(b"\x00\xff")
            error = await client.wait_for(lambda f: f.get("type") == "error")
            if target is server:
                return error["code"], await client.wait_closed()
            pong = await client.call("ping", "pong")
            return error["code"], None if pong["type"] == "pong" else -1

    async def main() -> None:
        assert await after_binary(server) == ("bad_request", 1003)
        assert await after_binary(fast_server) == ("bad_request", None)

    run(main)


def test_fault_leave_only_mutes_lets_a_connection_post_after_leaving(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "leave_only_mutes")

    async def after_leaving(target: ServerProcess) -> str:
        async with open_client(target, tenant + "-mute") as client:
            thread_id = await new_thread(client)
            await client.call("leave_thread", "left", thread_id=thread_id)
            answer = await client.call("user_message", thread_id=thread_id, content="still here?")
            return answer["type"] if answer["type"] != "error" else answer["code"]

    async def main() -> None:
        assert await after_leaving(server) == "ack"
        assert await after_leaving(fast_server) == "bad_request"

    run(main)


def test_fault_leave_stops_own_turn_drops_the_requesters_reply(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*PACED, "--fault", "leave_stops_own_turn")
    clean = start_server(*PACED)

    async def leave_mid_turn(target: ServerProcess) -> list[str]:
        async with open_client(target, tenant + "-away") as client:
            thread_id = await new_thread(client)
            request_id = await client.request("user_message", thread_id=thread_id, content="bye")
            await client.reply(request_id, "ack")
            await client.call("leave_thread", "left", thread_id=thread_id)  # the turn streams for 240 ms
            await trio.sleep(0.6)
            return [f["type"] for f in client.frames if f.get("re") == request_id]

    async def main() -> None:
        assert "agent_response" not in await leave_mid_turn(server)
        assert (await leave_mid_turn(clean))[-1] == "agent_response"

    run(main)


def test_fault_fanout_trims_content_changes_the_watchers_copy(start_server: Any, tenant: str) -> None:
    server = start_server(*FAST, "--fault", "fanout_trims_content")

    async def main() -> None:
        async with open_client(server, tenant, "alice") as alice, open_client(server, tenant, "bob") as bob:
            thread_id = await new_thread(alice)
            await bob.call("join_thread", "joined", thread_id=thread_id)
            await alice.turn(thread_id, "  spaced out  ")
            copy = await bob.wait_for(lambda f: f.get("type") == "thread_message")
            assert copy["content"] == "spaced out"
            history = await bob.call("get_history", "history", thread_id=thread_id)
            assert history["messages"][0]["content"] == "  spaced out  "

    run(main)


def test_fault_assistant_id_is_agent_id_gives_one_assistant_many_ids(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "assistant_id_is_agent_id")

    async def two_starts(target: ServerProcess) -> list[dict[str, Any]]:
        async with open_client(target, tenant + "-ids") as client:
            return [await client.call("start_agent", "agent_started", assistant="bot") for _ in range(2)]

    async def main() -> None:
        first, second = await two_starts(server)
        assert first["assistant_id"] == first["agent_id"] and first["assistant_id"] != second["assistant_id"]
        first, second = await two_starts(fast_server)
        assert first["assistant_id"] == second["assistant_id"] != first["agent_id"]

    run(main)


def test_fault_rate_limit_bucket_refuses_a_quick_burst_with_few_in_flight(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "rate_limit_bucket")

    async def twelve_pings(target: ServerProcess) -> list[str]:
        """The answers to 12 pings, each sent once the one before is answered (one in flight at a time)."""
        async with open_client(target, tenant + "-busy") as client:
            answers = [await client.reply(await client.request("ping")) for _ in range(12)]
            return [a["code"] if a["type"] == "error" else a["type"] for a in answers]

    async def main() -> None:
        answers = await twelve_pings(server)
        assert answers[:8] == ["pong"] * 8 and "rate_limited" in answers[8:]
        assert await twelve_pings(fast_server) == ["pong"] * 12

    run(main)


def test_fault_shutdown_closes_1000_says_normal_closure_on_sigterm(start_server: Any) -> None:
    # The clean server closes with 1001: test_lifecycle.test_sigterm_closes_connections_with_1001_and_exits_0.
    server = start_server(*FAST, "--fault", "shutdown_closes_1000")

    async def main() -> None:
        async with open_client(server, "t1") as client:
            os.kill(server.pid, signal.SIGTERM)
            assert await client.wait_closed() == 1000

    run(main)


def test_fault_bearer_case_sensitive_refuses_a_lower_case_scheme(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "bearer_case_sensitive")
    token = make_token()
    for scheme in ("bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} {token}"}
        assert raw_handshake(server, "/ws", headers)[0] == 401, scheme
        assert raw_handshake(fast_server, "/ws", headers)[0] == 101, scheme
    assert status_of(server, token) == 101  # "Bearer" as written in PROTOCOL.md still opens


def test_fault_exp_optional_lets_a_token_without_exp_in(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "exp_optional")
    forever = make_token(exp=OMIT)
    assert status_of(server, forever) == 101
    assert status_of(fast_server, forever) == 401
    assert status_of(server, make_token(ttl=-1.0)) == 401  # an exp that is there is still checked


def test_fault_final_reply_trimmed_sends_a_content_its_chunks_do_not_add_up_to(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "final_reply_trimmed")

    async def deltas_and_content(target: ServerProcess) -> tuple[str, str]:
        async with open_client(target, tenant + "-trim") as client:
            frames = await client.turn(await new_thread(client), "a line\n")
            deltas = "".join(f["delta"] for f in frames if f["type"] == "agent_chunk")
            return deltas, frames[-1]["content"]

    async def main() -> None:
        assert await deltas_and_content(server) == ("echo: a line\n", "echo: a line")
        assert await deltas_and_content(fast_server) == ("echo: a line\n", "echo: a line\n")

    run(main)


def test_fault_history_first_author_names_the_first_poster_for_every_message(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "history_first_author")

    async def authors(target: ServerProcess) -> list[str]:
        async with open_client(target, tenant, "alice") as alice, open_client(target, tenant, "bob") as bob:
            thread_id = await new_thread(alice)
            await bob.call("join_thread", "joined", thread_id=thread_id)
            await alice.turn(thread_id, "from alice")
            await bob.turn(thread_id, "from bob")
            history = await bob.call("get_history", "history", thread_id=thread_id)
            return [m["user"] for m in history["messages"] if m["role"] == "user"]

    async def main() -> None:
        assert await authors(server) == ["alice", "alice"]
        assert await authors(fast_server) == ["alice", "bob"]

    run(main)


def test_fault_listed_assistant_id_lists_the_assistants_id_as_its_name(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "listed_assistant_id")

    async def listed(target: ServerProcess) -> tuple[str, str]:
        async with open_client(target, tenant + "-list") as client:
            started = await client.call("start_agent", "agent_started", assistant="helper")
            threads = await client.call("list_threads", "threads")
            return started["assistant_id"], threads["threads"][0]["assistant"]

    async def main() -> None:
        assistant_id, name = await listed(server)
        assert name == assistant_id
        assert (await listed(fast_server))[1] == "helper"

    run(main)


def test_fault_blank_content_refused_refuses_an_empty_message(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "blank_content_refused")

    async def answers(target: ServerProcess) -> list[str]:
        async with open_client(target, tenant + "-blank") as client:
            thread_id = await new_thread(client)
            got = []
            for content in ("", " \n", "x"):
                answer = await client.call("user_message", thread_id=thread_id, content=content)
                got.append(answer["code"] if answer["type"] == "error" else answer["type"])
                if answer["type"] == "ack":
                    await client.reply(answer["re"], "agent_response")
            return got

    async def main() -> None:
        assert await answers(server) == ["bad_request", "bad_request", "ack"]
        assert await answers(fast_server) == ["ack", "ack", "ack"]

    run(main)


def _unjoined_answer(target: ServerProcess, tenant: str, request: str, expect: str) -> str:
    """The answer to ``request`` on a thread of the tenant that the asking connection has not joined."""
    answer: dict[str, Any] = {}

    async def main() -> None:
        async with open_client(target, tenant, "alice") as alice, open_client(target, tenant, "bob") as bob:
            thread_id = await new_thread(alice)
            reply = await bob.call(request, expect, thread_id=thread_id)
            answer.update(reply)

    run(main)
    return answer["code"] if answer["type"] == "error" else answer["type"]


def test_fault_history_needs_join_refuses_a_reader_who_has_not_joined(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "history_needs_join")
    assert _unjoined_answer(server, tenant, "get_history", "history") == "bad_request"
    assert _unjoined_answer(fast_server, tenant, "get_history", "history") == "history"


def test_fault_leave_needs_join_refuses_to_leave_a_thread_not_joined(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "leave_needs_join")
    assert _unjoined_answer(server, tenant, "leave_thread", "left") == "bad_request"
    assert _unjoined_answer(fast_server, tenant, "leave_thread", "left") == "left"


def test_fault_current_tenant_race_lists_another_tenants_threads(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "current_tenant_race")

    async def foreign_listed(target: ServerProcess) -> int:
        """How many of 20 lists, each sent beside another tenant's reads, named a thread of that tenant."""
        async with open_client(target, tenant + "-a") as a, open_client(target, tenant + "-b") as b:
            await new_thread(a)
            theirs = await new_thread(b)
            leaks = 0
            for _ in range(20):
                reads = [await b.request("get_history", thread_id=theirs) for _ in range(4)]
                listed = await a.call("list_threads", "threads")
                for request_id in reads:
                    await b.reply(request_id, "history")
                leaks += theirs in {t["thread_id"] for t in listed["threads"]}
            return leaks

    async def main() -> None:
        assert await foreign_listed(server) > 0
        assert await foreign_listed(fast_server) == 0

    run(main)


def test_fault_assistant_create_race_fails_start_ups_of_one_new_name_at_once(
    start_server: Any, tenant: str
) -> None:
    server = start_server("--startup-ms", "0:0", "--fault", "assistant_create_race")
    clean = start_server("--startup-ms", "0:0")

    async def answers(target: ServerProcess) -> list[list[str]]:
        """For up to ten new names, the answers to eight start-ups of it sent at once on eight
        connections (until one is `internal`: the race needs two of them inside its window)."""
        rounds: list[list[str]] = []

        async def one(client: Any, name: str, got: list[str]) -> None:
            answer = await client.call("start_agent", "agent_started", assistant=name)
            got.append(answer["code"] if answer["type"] == "error" else answer["assistant_id"])

        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(open_client(target, tenant + "-crowd", f"u{i}")) for i in range(8)]
            while len(rounds) < 10 and not any("internal" in got for got in rounds):
                rounds.append([])
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(one, client, f"fresh{len(rounds)}", rounds[-1])
        return rounds

    async def main() -> None:
        assert any("internal" in got for got in await answers(server))
        clean_rounds = await answers(clean)
        assert len(clean_rounds) == 10
        assert all(len(set(got)) == 1 and "internal" not in got for got in clean_rounds)

    run(main)


def test_fault_limit_plus_one_returns_one_message_more_than_the_limit(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "limit_plus_one")

    async def window(target: ServerProcess) -> int:
        async with open_client(target, tenant + "-window") as client:
            thread_id = await new_thread(client)
            for n in range(3):
                await client.turn(thread_id, f"m{n}")
            history = await client.call("get_history", "history", thread_id=thread_id, limit=2)
            return len(history["messages"])

    async def main() -> None:
        assert await window(server) == 3
        assert await window(fast_server) == 2

    run(main)


def test_fault_tenant_nocase_lets_tenants_that_differ_by_case_read_each_other(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "tenant_nocase")

    async def seen_by_the_other(target: ServerProcess) -> tuple[bool, bool]:
        async with open_client(target, tenant + "-acme") as lower, open_client(target, tenant + "-ACME") as upper:
            thread_id = await new_thread(lower)
            listed = await upper.call("list_threads", "threads")
            history = await upper.call("get_history", thread_id=thread_id)
            return thread_id in {t["thread_id"] for t in listed["threads"]}, history["type"] == "history"

    async def main() -> None:
        assert await seen_by_the_other(server) == (True, True)
        assert await seen_by_the_other(fast_server) == (False, False)

    run(main)


def test_fault_content_limit_in_chars_accepts_content_over_the_byte_limit(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "content_limit_in_chars")
    content = "\u00e9" * 8193  # 8,193 characters, 16,386 bytes of UTF-8

    async def answer(target: ServerProcess) -> str:
        async with open_client(target, tenant + "-bytes") as client:
            reply = await client.call("user_message", thread_id=await new_thread(client), content=content)
            return reply["code"] if reply["type"] == "error" else reply["type"]

    async def main() -> None:
        assert await answer(server) == "ack"
        assert await answer(fast_server) == "bad_request"

    run(main)


def test_fault_frame_limit_in_chars_answers_a_message_over_64_kib_of_utf8(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "frame_limit_in_chars")
    frame = json.dumps({"type": "ping", "id": "big", "pad": "\u00e9" * 40_000}, ensure_ascii=False)  # 80 KB

    async def answer(target: ServerProcess) -> str:
        async with open_client(target, tenant + "-frame") as client:
            await client.ws.send_message(frame)
            reply = await client.wait_for(lambda f: f["type"] in ("pong", "error"))
            return reply["code"] if reply["type"] == "error" else reply["type"]

    async def main() -> None:
        assert await answer(server) == "pong"
        assert await answer(fast_server) == "too_large"

    run(main)


def test_fault_connection_id_per_user_welcomes_a_second_device_with_the_first_ones_id(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "connection_id_per_user")

    async def two_devices(target: ServerProcess) -> tuple[str, str]:
        async with open_client(target, tenant, "alice") as phone, open_client(target, tenant, "alice") as laptop:
            return phone.welcome["connection_id"], laptop.welcome["connection_id"]

    async def main() -> None:
        first, second = await two_devices(server)
        assert first == second
        first, second = await two_devices(fast_server)
        assert first != second

    run(main)


def test_fault_query_skips_exp_opens_an_expired_token_through_the_query(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "query_skips_exp")
    expired = make_token(ttl=-5.0)
    assert raw_handshake(server, "/ws?token=" + expired)[0] == 101
    assert raw_handshake(fast_server, "/ws?token=" + expired)[0] == 401
    assert status_of(server, expired) == 401  # the header's token is still checked in full
    assert raw_handshake(server, "/ws?token=" + make_token(key="not-the-secret"))[0] == 401  # and the signature


def test_fault_unknown_type_without_re_leaves_the_error_unattributed(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "unknown_type_without_re")

    async def error_of(target: ServerProcess) -> dict[str, Any]:
        async with open_client(target, tenant + "-re") as client:
            await client.ws.send_message(json.dumps({"type": "subscribe_all", "id": "u1"}))
            return await client.wait_for(lambda f: f["type"] == "error")

    async def main() -> None:
        assert "re" not in await error_of(server)
        assert (await error_of(fast_server))["re"] == "u1"

    run(main)


def test_fault_history_by_assistant_shows_a_sibling_threads_messages(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "history_by_assistant")

    async def contents(target: ServerProcess) -> list[str]:
        async with open_client(target, tenant + "-memory") as client:
            first = await new_thread(client)
            second = await new_thread(client)
            await client.turn(first, "in the first thread")
            history = await client.call("get_history", "history", thread_id=second)
            return [m["content"] for m in history["messages"]]

    async def main() -> None:
        assert await contents(server) == ["in the first thread", "echo: in the first thread"]
        assert await contents(fast_server) == []

    run(main)


def test_fault_claims_any_string_opens_under_an_invalid_id(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "claims_any_string")
    for tenant, user in (("acme", "al ice"), ("t" * 65, "alice"), ("acme", "tab\there")):
        token = make_token(tenant, user)
        assert status_of(server, token) == 101, (tenant, user)
        assert status_of(fast_server, token) == 401, (tenant, user)
    assert status_of(server, make_token(ttl=-1.0)) == 401  # exp still counts


def test_fault_assistant_name_trimmed_accepts_a_name_with_a_newline(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "assistant_name_trimmed")

    async def answer(target: ServerProcess) -> str:
        async with open_client(target, tenant + "-trim") as client:
            reply = await client.call("start_agent", "agent_started", assistant="helper\n")
            return reply["code"] if reply["type"] == "error" else reply["type"]

    async def main() -> None:
        assert await answer(server) == "agent_started"
        assert await answer(fast_server) == "bad_request"

    run(main)


def test_fault_name_limit_in_bytes_refuses_a_valid_name_of_multibyte_characters(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "name_limit_in_bytes")
    name = "\u00e9" * 40  # 40 code points, 80 bytes of UTF-8

    async def answer(target: ServerProcess) -> str:
        async with open_client(target, tenant + "-bytes") as client:
            reply = await client.call("start_agent", "agent_started", assistant=name)
            return reply["code"] if reply["type"] == "error" else reply["type"]

    async def main() -> None:
        assert await answer(server) == "bad_request"
        assert await answer(fast_server) == "agent_started"

    run(main)


def test_fault_stream_by_request_id_gives_a_stream_to_whoever_reuses_its_id(
    start_server: Any, paced_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*PACED, "--fault", "stream_by_request_id")

    async def taken(target: ServerProcess) -> list[str]:
        """The thread ids in frames a second tenant's connection gets after it sends a message
        with the id of the first tenant's message that is still streaming."""
        async with open_client(target, tenant + "-a") as a, open_client(target, tenant + "-b") as b:
            mine, theirs = await new_thread(a), await new_thread(b)
            await a.request("user_message", id="7", thread_id=mine, content="a's turn")
            await a.wait_for(lambda f: f["type"] == "agent_chunk")
            await b.request("user_message", id="7", thread_id=theirs, content="b's turn")
            await b.reply("7", "agent_response")
            await trio.sleep(0.3)
            return sorted({f["thread_id"] for f in b.frames if f.get("thread_id") == mine})

    async def main() -> None:
        assert len(await taken(server)) == 1
        assert await taken(paced_server) == []

    run(main)


def test_fault_request_id_limit_in_bytes_refuses_a_valid_id_of_multibyte_characters(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "request_id_limit_in_bytes")
    request_id = "\u8acb" * 64  # 64 code points, 192 bytes of UTF-8

    async def answer(target: ServerProcess) -> str:
        async with open_client(target, tenant + "-rid") as client:
            reply = await client.call("ping", "pong", id=request_id)
            assert reply["re"] == request_id
            return reply["code"] if reply["type"] == "error" else reply["type"]

    async def main() -> None:
        assert await answer(server) == "bad_request"
        assert await answer(fast_server) == "pong"

    run(main)


def test_fault_abandon_unheard_stores_no_reply_once_the_requester_is_gone(
    start_server: Any, paced_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*PACED, "--fault", "abandon_unheard")

    async def roles_after_hang_up(target: ServerProcess) -> list[str]:
        """The thread's history after its requester closed right after the ack."""
        async with open_client(target, tenant + "-gone") as reader:
            thread_id = await new_thread(reader)
            await reader.call("leave_thread", "left", thread_id=thread_id)
            async with open_client(target, tenant + "-gone") as talker:
                await talker.call("join_thread", "joined", thread_id=thread_id)
                await talker.call("user_message", "ack", thread_id=thread_id, content="then I closed the tab")
            await trio.sleep(0.6)  # 4 chunks 60 ms apart: the turn has long ended
            history = await reader.call("get_history", "history", thread_id=thread_id)
            return [m["role"] for m in history["messages"]]

    async def main() -> None:
        assert await roles_after_hang_up(server) == ["user"]
        assert await roles_after_hang_up(paced_server) == ["user", "assistant"]

    run(main)


def test_fault_slot_reuse_hands_a_closed_connections_threads_to_the_next_one(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "slot_reuse")

    async def leaked(target: ServerProcess) -> list[str]:
        """The types of frames of acme's thread that reach a globex connection opened after the
        acme connection that had joined it closed."""
        async with open_client(target, tenant + "-acme") as owner:
            thread_id = await new_thread(owner)
        async with open_client(target, tenant + "-globex") as stranger, open_client(
            target, tenant + "-acme"
        ) as colleague:
            await new_thread(stranger)  # its first join: the slot the owner left
            await colleague.call("join_thread", "joined", thread_id=thread_id)
            await colleague.turn(thread_id, "acme only")
            await trio.sleep(0.1)
            return [f["type"] for f in stranger.frames if f.get("thread_id") == thread_id]

    async def main() -> None:
        assert "thread_message" in await leaked(server)
        assert await leaked(fast_server) == []

    run(main)


async def watcher_sees(target: ServerProcess, tenant: str, *, rejoin: bool = False, same_user: bool = False) -> list[str]:
    """The types of the fan-out frames (without re) a watcher joined to a thread receives of one
    turn asked by another connection: of another user, or (``same_user``) of the same one, and
    (``rejoin``) after it left the thread and joined it again before the turn."""
    async with open_client(target, tenant, "alice") as asker, open_client(
        target, tenant, "alice" if same_user else "bob"
    ) as watcher:
        thread_id = await new_thread(asker)
        await watcher.call("join_thread", "joined", thread_id=thread_id)
        if rejoin:
            await watcher.call("leave_thread", "left", thread_id=thread_id)
            await watcher.call("join_thread", "joined", thread_id=thread_id)
        since = len(watcher.frames)
        await asker.turn(thread_id, "hello")
        # The reference server queues a watcher's copy before the requester's reply goes out, so
        # a ping's pong on the watcher's own connection comes behind it.
        await watcher.call("ping", "pong")
        return [f["type"] for f in watcher.frames[since:] if "re" not in f]


WHOLE_TURN = ["thread_message", *["agent_chunk"] * 4, "agent_response"]  # FAST streams 4 chunks


@pytest.mark.parametrize(("fault", "how", "faulty_sees"), [
    # A connection that left and joined again is never put back on the fan-out list.
    ("rejoin_unsubscribed", {"rejoin": True}, []),
    # The requester's own user is left out: her second device sees nothing.
    ("fanout_skips_own_user", {"same_user": True}, []),
    # Watchers get the turn's start and end, and no chunk between.
    ("watchers_miss_chunks", {}, ["thread_message", "agent_response"]),
])
def test_fault_leaves_a_watcher_without_its_turn(
    start_server: Any, fast_server: ServerProcess, tenant: str, fault: str, how: dict[str, bool],
    faulty_sees: list[str],
) -> None:
    server = start_server(*FAST, "--fault", fault)

    async def main() -> None:
        assert await watcher_sees(server, tenant, **how) == faulty_sees
        assert await watcher_sees(fast_server, tenant, **how) == WHOLE_TURN
        if how:  # a watcher the bug does not concern is still served
            assert await watcher_sees(server, tenant) == WHOLE_TURN

    run(main)


def test_fault_other_claims_checked_refuses_tokens_an_identity_provider_mints(
    start_server: Any, fast_server: ServerProcess
) -> None:
    server = start_server(*FAST, "--fault", "other_claims_checked")
    later = time.time() + 3600
    for claims in ({"aud": "partywall-suite"}, {"nbf": later}, {"iat": later}):
        assert status_of(server, make_token(**claims)) == 401, claims
        assert status_of(fast_server, make_token(**claims)) == 101, claims  # other claims are ignored
    assert status_of(server, make_token(iss="https://idp.invalid/", jti="j1", scope="chat")) == 101


def test_fault_claims_coerced_takes_a_numeric_user_id_as_a_string(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "claims_coerced")
    numeric = make_token(tenant, 1234567)
    assert status_of(server, numeric) == 101
    assert status_of(fast_server, numeric) == 401

    async def main() -> None:
        async with open_client(server, token=numeric) as client:
            assert client.welcome["user"] == "1234567"

    run(main)


def test_fault_stream_stops_unheard_leaves_the_watchers_without_the_rest_of_the_turn(
    start_server: Any, paced_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*PACED, "--fault", "stream_stops_unheard")

    async def watched_after_hang_up(target: ServerProcess) -> tuple[list[str], list[str]]:
        """The fan-out a watcher gets of a turn whose requester closed right after the ack, and the
        thread's history once the turn has ended."""
        async with open_client(target, tenant + "-unheard", "bob") as watcher:
            thread_id = await new_thread(watcher)
            async with open_client(target, tenant + "-unheard") as talker:
                await talker.call("join_thread", "joined", thread_id=thread_id)
                since = len(watcher.frames)
                await talker.call("user_message", "ack", thread_id=thread_id, content="then I closed the tab")
            await trio.sleep(0.6)  # 4 chunks 60 ms apart: the turn has long ended
            history = await watcher.call("get_history", "history", thread_id=thread_id)
            return ([f["type"] for f in watcher.frames[since:] if "re" not in f],
                    [m["role"] for m in history["messages"]])

    async def main() -> None:
        seen, stored = await watched_after_hang_up(server)
        assert "agent_response" not in seen and stored == ["user", "assistant"]
        seen, stored = await watched_after_hang_up(paced_server)
        assert seen[0] == "thread_message" and seen[-1] == "agent_response" and stored == ["user", "assistant"]

    run(main)


def test_fault_unparsable_ignored_answers_invalid_json_with_nothing(
    start_server: Any, fast_server: ServerProcess, tenant: str
) -> None:
    server = start_server(*FAST, "--fault", "unparsable_ignored")

    async def answers_to_invalid_json(target: ServerProcess) -> list[str]:
        """The frames that came back for a frame that is not JSON, up to the pong of a ping behind it."""
        async with open_client(target, tenant) as client:
            since = len(client.frames)
            await client.send('{"type": "ping", "id": "half",')
            await client.call("ping", "pong")
            return [f["type"] for f in client.frames[since:]]

    async def main() -> None:
        assert await answers_to_invalid_json(server) == ["pong"]
        assert await answers_to_invalid_json(fast_server) == ["error", "pong"]

    run(main)
