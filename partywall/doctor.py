"""`partywall doctor`: one of each operation, and whether the adapter understood the answers.

The first command a team runs while writing an adapter. It reaches the
target with the given adapter and credentials, opens one connection, sends
each operation the adapter declares once (in an order where each can work:
start an agent, send a message in its thread, read the history...), and
prints, per operation, every frame that came back, what the adapter made of
it (its type, or why it could not parse it), and whether the adapter
recognised the frame that completes the request. It judges the adapter,
not the server's isolation: no invariant runs.

Exit 0 when every operation was answered and understood, 2 otherwise (with
what was not), like any run that could not be made.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import attrs

from partywall.adapter import Frame
from partywall.driver import Refused
from partywall.session import session_from_settings

#: The order operations are tried in; each needs only what an earlier one made.
ORDER = ("ping", "start_agent", "user_message", "get_history", "list_threads", "leave_thread", "join_thread")


@attrs.frozen
class Check:
    """What one operation got."""

    operation: str
    frames: tuple[Frame, ...]
    completed: bool
    """The adapter recognised a frame that completes the request."""

    @property
    def understood(self) -> bool:
        return self.completed and all(not f.problems for f in self.frames) and bool(self.frames)


def _fields(operation: str, thread_id: str | None) -> dict[str, Any] | None:
    """The request's fields, or None when it needs a thread and none was made."""
    if operation in ("ping", "list_threads"):
        return {}
    if operation == "start_agent":
        return {"assistant": "partywall-doctor"}
    if thread_id is None:
        return None
    if operation == "user_message":
        return {"thread_id": thread_id, "content": "partywall doctor says hello"}
    return {"thread_id": thread_id}


def run_doctor(found: Any, say: Callable[[str], None] = print) -> int:
    """Reach the target the settings name and try each operation; the exit code (0 or 2)."""
    session = session_from_settings(found, seed=0, profile="doctor")
    adapter = session.adapter
    try:
        driver = session.start(observer=lambda ev, frame: None)
        say(f"target: {session.target.kind} {session.target.url}")
        say(f"adapter: {adapter.name} (API version {adapter.api_version}); operations: "
            + ", ".join(op for op in ORDER if op in adapter.operations))
        if session.identities is not None:
            tenant = session.identities.tenant_at(0).id
            user = session.identities.user_at(tenant, 0)
        else:
            tenant, user = f"partywall-doctor-{secrets.token_hex(3)}", "alice"
        token = session.credentials.for_identity(tenant, user)
        # Both ways the suite draws for a credential, as the adapter says they travel.
        for via in ("header", "query"):
            way = adapter.credential_ways.get(via, via)
            name = "doctor" if via == "header" else "doctor-query"
            conn = driver.call(driver.connect, name, tenant, user, token, via)
            if isinstance(conn, Refused):
                say(f"connect as {tenant}/{user} via {way}: refused ({conn.reason}); check the credentials and "
                    "where the adapter puts them (Adapter.handshake, Adapter.auth_message).")
                return 2
            welcome = [e for e in session.history if e.kind == "ok" and e.op == "connect"]
            say(f"connect as {tenant}/{user} via {way}: open; welcome "
                f"{welcome[-1].data.get('welcome') if welcome else None}")
            if via == "query":
                driver.call(driver.disconnect, name, False)
        checks: list[Check] = []
        thread_id: str | None = None
        for n, operation in enumerate(op for op in ORDER if op in adapter.operations):
            fields = _fields(operation, thread_id)
            if fields is None:
                say(f"{operation}: not tried (no thread was made to try it in)")
                continue
            pending = driver.call(driver.send, "doctor", operation, f"doctor-{n}", fields)
            final = driver.call(driver.wait, pending) if pending is not None else None
            frames = tuple(pending.frames) if pending is not None else ()
            check = Check(operation, frames, final is not None and adapter.completes(operation, final))
            checks.append(check)
            if operation == "start_agent" and final is not None and isinstance(final.data.get("thread_id"), str):
                thread_id = final.data["thread_id"]
            say(f"{operation}: {'understood' if check.understood else 'NOT UNDERSTOOD'}")
            for frame in frames:
                shown = frame.raw if len(frame.raw) <= 160 else frame.raw[:157] + "..."
                say(f"    <- {frame.type or '?'}: {shown}")
                for problem in frame.problems:
                    say(f"       the adapter says: {problem}")
            if not frames:
                say(f"    no frame came back within {driver.reply_timeout_s:g} s")
            elif not check.completed:
                say("    the adapter recognised no frame as this request's last (Adapter.completes)")
        bad = [c.operation for c in checks if not c.understood]
        if bad:
            say(f"partywall doctor: the adapter did not understand the answers to {', '.join(bad)}.")
            return 2
        say("partywall doctor: every operation was answered and understood.")
        return 0
    finally:
        session.close()
