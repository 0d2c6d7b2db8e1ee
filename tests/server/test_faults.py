"""Planted faults: `--fault NAME` installs each one, and each shows its bug when scripted directly.

These are sanity checks of the modifiers in `partywall_agentserver/faults.py`, not
proofs that the suite's invariants catch them (those live with the suite).
Rules under test: every name in ARCHITECTURE.md's table is accepted and
changes the server's behaviour in exactly the way the table says; the
behaviour without the fault is covered by the conformance tests next to
this file. Each test runs its own server on 127.0.0.1 port 0, time-bounded.
"""

from __future__ import annotations

from typing import Any

import trio

from .wsclient import FAST, ServerProcess, new_thread, open_client, run

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
