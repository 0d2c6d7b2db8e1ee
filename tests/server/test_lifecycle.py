"""The process: command line, shutdown, crash durability, migrations.

Rules under test: `python -m partywall_agentserver` prints exactly one line,
`listening on ws://HOST:PORT/ws`, when ready; without a secret it refuses
to start with a one-line reason and exit 2; a bad option or unknown fault
is exit 2; SIGTERM closes every connection with 1001 and exits 0; SIGKILL
at any moment loses no acked message and no sent reply, and messages acked
without a reply are answered when it restarts; an older database is
migrated, a newer or broken one refused with one line and a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from trio_websocket import ConnectionClosed

from .wsclient import SECRET, ServerProcess, new_thread, open_client, run

ENV_WITHOUT_SECRET = {
    k: v for k, v in os.environ.items() if k not in ("PARTYWALL_AUTH_SECRET", "AGENTSERVER_FAULT")
}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "partywall_agentserver", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else ENV_WITHOUT_SECRET,
        timeout=timeout,
    )


# -- command line ----------------------------------------------------------------


def test_cli_without_secret_refuses_to_start(tmp_path: Path) -> None:
    result = run_cli("--port", "0", "--db", str(tmp_path / "x.db"))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "secret" in lines[0]
    assert not (tmp_path / "x.db").exists()


def test_cli_empty_secret_file_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("\n")
    result = run_cli(
        "--port", "0", "--db", str(tmp_path / "x.db"), "--secret-file", str(tmp_path / "secret")
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("--db", str(tmp_path / "x.db"), "--secret-file", str(tmp_path / "missing"))
    assert result.returncode == 2 and "missing" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--port", "abc"],
        ["--port", "70000"],
        ["--chunks", "-1"],
        ["--chunks", "two"],
        ["--startup-ms", "9:1"],
        ["--startup-ms", "a:b"],
        ["--chunk-delay-ms", "-5:5"],
        ["--secret", "a", "--secret-file", "b"],
        ["--fault", "no_such_fault"],
    ],
)
def test_cli_bad_option_exits_2(tmp_path: Path, args: list[str]) -> None:
    result = run_cli("--db", str(tmp_path / "x.db"), "--secret", SECRET, *args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip()


def test_cli_unknown_fault_in_environment_exits_2(tmp_path: Path) -> None:
    env = dict(ENV_WITHOUT_SECRET, AGENTSERVER_FAULT="made_up")
    result = run_cli("--db", str(tmp_path / "x.db"), "--secret", SECRET, env=env)
    assert result.returncode == 2
    assert "made_up" in result.stderr and "lost_wakeup" in result.stderr


def test_cli_secret_from_environment_and_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    commands = [
        ([sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db", str(tmp_path / "e.db")],
         dict(ENV_WITHOUT_SECRET, PARTYWALL_AUTH_SECRET=SECRET)),
        ([sys.executable, "-m", "partywall_agentserver", "--port", "0", "--db", str(tmp_path / "f.db"),
          "--secret-file", str(tmp_path / "secret")], ENV_WITHOUT_SECRET),
    ]  # fmt: skip
    for command, env in commands:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("listening on ws://127.0.0.1:")
            server = ServerProcess.__new__(ServerProcess)
            server.url = line.strip().removeprefix("listening on ")
            server.port = int(server.url.rsplit(":", 1)[1].split("/")[0])

            async def main(server: ServerProcess = server) -> None:
                async with open_client(server) as client:
                    assert client.welcome["type"] == "welcome"

            run(main)
        finally:
            proc.kill()
            proc.communicate(timeout=10)


def test_cli_prints_one_listening_line(start_server: Any) -> None:
    server = start_server()
    assert server.url == f"ws://127.0.0.1:{server.port}/ws"
    assert 0 < server.port < 65536
    assert server.terminate() == 0
    assert server.proc.stdout.read() == ""  # nothing after the one line


def test_cli_raises_open_files_limit(start_server: Any) -> None:
    server = start_server()
    soft, hard = psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert soft == hard


def test_cli_port_in_use_exits_1(start_server: Any, tmp_path: Path) -> None:
    server = start_server()
    result = run_cli("--port", str(server.port), "--db", str(tmp_path / "y.db"), "--secret", SECRET)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


# -- shutdown --------------------------------------------------------------------


def test_sigterm_closes_connections_with_1001_and_exits_0(start_server: Any) -> None:
    server = start_server("--startup-ms", "0:0", "--chunk-delay-ms", "100:100")

    async def main() -> None:
        async with open_client(server, "t1") as one, open_client(server, "t2") as two:
            thread_id = await new_thread(one)
            await one.request("user_message", thread_id=thread_id, content="mid-turn")
            await one.wait_for(lambda f: f["type"] == "ack")
            os.kill(server.pid, signal.SIGTERM)
            assert await one.wait_closed() == 1001
            assert await two.wait_closed() == 1001
        status = await trio.to_thread.run_sync(server.proc.wait, 10)
        assert status == 0

    run(main)


# -- crashes -----------------------------------------------------------------------


def _history(
    server: ServerProcess, tenant: str, thread_ids: list[str]
) -> dict[str, list[dict[str, Any]]]:
    async def main() -> dict[str, list[dict[str, Any]]]:
        async with open_client(server, tenant, "auditor") as client:
            return {
                t: (await client.call("get_history", "history", thread_id=t))["messages"]
                for t in thread_ids
            }

    return run(main)  # type: ignore[no-any-return]


def test_sigkill_mid_turn_keeps_acked_message_and_answers_it_on_restart(start_server: Any) -> None:
    server = start_server("--startup-ms", "0:0", "--chunks", "4", "--chunk-delay-ms", "300:300")
    state: dict[str, Any] = {}

    async def main() -> None:
        async with open_client(server, "crash") as client:
            thread_id = await new_thread(client)
            request_id = await client.request(
                "user_message", thread_id=thread_id, content="pending"
            )
            state["ack"] = await client.reply(request_id, "ack")
            state["thread_id"] = thread_id
            server.kill()
            await client.wait_closed()

    run(main)
    server.restart()
    thread_id = state["thread_id"]
    messages = _history(server, "crash", [thread_id])[thread_id]
    assert [m["message_id"] for m in messages][:1] == [state["ack"]["message_id"]]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "pending"),
        ("assistant", "echo: pending"),
    ]


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acked_message_or_sent_reply(start_server: Any) -> None:
    server = start_server("--startup-ms", "0:0", "--chunk-delay-ms", "0:2")
    acked: dict[str, str] = {}  # message_id -> thread_id
    replied: dict[str, str] = {}
    threads: list[str] = []

    async def user(n: int) -> None:
        async with open_client(server, "load", f"user-{n}") as client:
            thread_id = await new_thread(client)
            threads.append(thread_id)
            turn = 0
            while client.close_code is None:
                try:
                    request_id = await client.request(
                        "user_message", thread_id=thread_id, content=f"{n}/{turn}"
                    )
                    ack = await client.reply(request_id, "ack")
                    acked[ack["message_id"]] = thread_id
                    response = await client.reply(request_id, "agent_response")
                    replied[response["message_id"]] = thread_id
                except (AssertionError, ConnectionClosed):
                    return  # the connection died with the server
                turn += 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(user, n)
            await trio.sleep(1.0)
            server.kill()

    run(main)
    assert len(replied) > 20, "the load did not get going"
    server.restart()
    histories = _history(server, "load", threads)
    stored = {m["message_id"]: (t, m) for t, ms in histories.items() for m in ms}
    assert set(acked) <= set(stored), "an acked message was lost"
    assert set(replied) <= set(stored), "a sent reply was lost"
    for thread_id, messages in histories.items():
        roles = [m["role"] for m in messages]
        # Every user message is followed by its reply (recovery answered the last one).
        assert roles == ["user", "assistant"] * (len(roles) // 2), (thread_id, roles)
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            assert answer["content"] == "echo: " + question["content"]


# -- migrations --------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE assistants (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL,
    instructions TEXT, created_at REAL NOT NULL, UNIQUE (tenant, name));
CREATE TABLE threads (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
    assistant_id TEXT NOT NULL REFERENCES assistants (id), agent_id TEXT NOT NULL,
    instructions TEXT, created_at REAL NOT NULL);
CREATE INDEX threads_by_tenant ON threads (tenant);
CREATE TABLE messages (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    thread_id TEXT NOT NULL REFERENCES threads (id),
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), user_id TEXT,
    content TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX messages_by_thread ON messages (thread_id, pos);
PRAGMA user_version = 1;
"""


def _version_1_database(path: Path) -> None:
    """A database as the first release of agentserver left it."""
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    now = time.time() - 3600
    db.execute("INSERT INTO assistants VALUES ('asst-1', 'old', 'helper', NULL, ?)", (now,))
    db.execute(
        "INSERT INTO threads VALUES ('thread-1', 'old', 'asst-1', 'agent-1', NULL, ?)", (now,)
    )
    rows = [
        ("m1", "user", "alice", "hello", now + 1),
        ("m2", "assistant", None, "echo: hello", now + 2),
        ("m3", "user", "bob", "unanswered", now + 3),
    ]
    for message_id, role, user, content, at in rows:
        db.execute(
            "INSERT INTO messages (id, thread_id, role, user_id, content, created_at)"
            " VALUES (?, 'thread-1', ?, ?, ?, ?)",
            (message_id, role, user, content, at),
        )
    db.commit()
    db.close()


def test_migration_upgrades_a_version_1_database(start_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _version_1_database(path)
    server = start_server(db=path)

    async def main() -> None:
        async with open_client(server, "old", "carol") as client:
            listed = await client.call("list_threads", "threads")
            assert [(t["thread_id"], t["assistant"]) for t in listed["threads"]] == [
                ("thread-1", "helper")
            ]
            history = await client.call("get_history", "history", thread_id="thread-1")
            assert [(m["message_id"], m["content"]) for m in history["messages"]][:3] == [
                ("m1", "hello"),
                ("m2", "echo: hello"),
                ("m3", "unanswered"),
            ]
            # The message the old server never answered was answered at start.
            assert history["messages"][3]["content"] == "echo: unanswered"
            await client.call("join_thread", "joined", thread_id="thread-1")
            frames = await client.turn("thread-1", "new era")
            assert frames[-1]["content"] == "echo: new era"

    run(main)
    assert server.terminate() == 0
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT reply_to FROM messages WHERE id = 'm2'").fetchone()[0] == "m1"
        users = {row[0] for row in db.execute("SELECT user_id FROM userbase WHERE tenant = 'old'")}
        assert users == {"alice", "bob", "carol"}
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_migration_refuses_a_newer_database(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE from_the_future (x)")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    result = run_cli("--port", "0", "--db", str(path), "--secret", SECRET)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "99" in lines[0] and "newer" in lines[0]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 99  # untouched
    db.close()


def test_migration_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    result = run_cli("--port", "0", "--db", str(path), "--secret", SECRET)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


def test_restart_keeps_everything(start_server: Any) -> None:
    server = start_server("--startup-ms", "0:0", "--chunk-delay-ms", "0:0")
    seen: dict[str, Any] = {}

    async def first_life() -> None:
        async with open_client(server, "keep") as client:
            thread_id = await new_thread(client, "keeper")
            frames = await client.turn(thread_id, "remember me")
            seen.update(thread_id=thread_id, frames=frames)
            seen["listed"] = (await client.call("list_threads", "threads"))["threads"]

    run(first_life)
    assert server.terminate() == 0
    server.start()

    async def second_life() -> None:
        async with open_client(server, "keep") as client:
            assert (await client.call("list_threads", "threads"))["threads"] == seen["listed"]
            history = await client.call("get_history", "history", thread_id=seen["thread_id"])
            ids = [m["message_id"] for m in history["messages"]]
            assert ids == [seen["frames"][0]["message_id"], seen["frames"][-1]["message_id"]]
            # Old threads can be joined and used after a restart.
            await client.call("join_thread", "joined", thread_id=seen["thread_id"])
            assert (await client.turn(seen["thread_id"], "again"))[-1]["content"] == "echo: again"

    run(second_life)
