"""The invariants: what must hold on every frame and every read.

Each check is registered under its invariant's name with a one-line
docstring (``partywall run --list-invariants`` prints them). A check gets the
model as it was when the event arrived, the event, and the parsed frame, and
yields violations with the evidence a developer needs: the frame, the
connection and tenant that received it, and the owner of what leaked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from partywall_props.model import Model, Req, id_number

from partywall.adapter import Frame
from partywall.checks import InvariantRegistry
from partywall.errors import Violation
from partywall.history import Event
from partywall.markers import markers_in

INVARIANTS = InvariantRegistry()
register = INVARIANTS.register

INVARIANTS.describe("isolation", "nothing of another tenant (or user, where threads are private) reaches a connection, "
                                 "foreign ids answer like nonexistent ones, and ids do not count")
INVARIANTS.describe("routing", "fan-out goes where the service's rule sends it, all of it and only there, and a reply only to the connection that asked")
INVARIANTS.describe("durability", "acked messages and sent replies are in history, unchanged, after disconnects and crashes")
INVARIANTS.describe("exactly-once", "each acked message gets one complete reply: no chunk missing, repeated or skipped; "
                                    "watchers get the same turn")
INVARIANTS.describe("ordering", "history is in commit order, each user message followed by its reply, chunks in seq order, "
                                "thread lists oldest first")
INVARIANTS.describe("liveness", "every request on an open connection is answered in time, and the server stays up")
INVARIANTS.describe("timing", "no per-operation limit or percentile limit of the profile is exceeded")
INVARIANTS.describe("protocol", "every frame matches the schema of its type and what the protocol says of each field, "
                                "errors carry the right code, never internal, and close nothing but too_large")

FANOUT = ("thread_message", "agent_chunk", "agent_response")


def _where(model: Model, ev: Event) -> dict[str, Any]:
    conn = model.conns.get(ev.conn or "")
    return {
        "connection": ev.conn,
        "tenant": conn.tenant if conn else None,
        "user": conn.user if conn else None,
    }


def _frame_in(model: Model, ev: Event, frame: Frame | None) -> bool:
    return ev.kind == "frame" and frame is not None and ev.conn in model.conns


def _own_reply(model: Model, ev: Event, frame: Frame | None, ftype: str) -> Req | None:
    """The request this frame of type ``ftype`` answers, when it reached the connection that asked."""
    if not _frame_in(model, ev, frame) or frame is None or frame.type != ftype:
        return None
    req = model.reqs.get(frame.re or "")
    if req is None or req.conn != ev.conn or "ok" not in req.accepts:
        return None  # a request the protocol says must fail: right_outcome reports its answer
    return req


# -- isolation -----------------------------------------------------------------


@register("isolation")
def no_foreign_data(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """No marker, server id or user id of another tenant (or user, where threads are private) reaches a connection."""
    if not _frame_in(model, ev, frame):
        return
    assert frame is not None
    party = model.party_of(ev.conn)  # type: ignore[arg-type]
    tenant, here = party[0], model.party_label(party)
    for marker in dict.fromkeys(markers_in(frame.raw)):
        owner = model.registry.owner(marker)
        if owner is None:
            yield Violation("isolation", f"a marker this run never sent reached {here}",
                            {**_where(model, ev), "marker": marker, "frame": frame.raw})
        elif (owner.tenant, owner.user) != party:
            yield Violation("isolation", f"{owner.label()}'s marker reached a connection of {here}",
                            {**_where(model, ev), "marker": marker, "owner_tenant": owner.tenant, "owner_user": owner.user,
                             "planted_by": owner.origin, "frame": frame.raw})
    for field, value in dict.fromkeys(model.ids_in(frame.data)):
        owner = model.registry.owner(value)
        if owner is not None and (owner.tenant, owner.user) != party:
            yield Violation("isolation", f"{owner.label()}'s {owner.what} reached a connection of {here}",
                            {**_where(model, ev), "field": field, "id": value, "owner_tenant": owner.tenant,
                             "owner_user": owner.user, "first_seen": owner.origin, "frame": frame.raw})
    known_users = model.users.get(tenant, set())
    for user in dict.fromkeys(model.users_in(frame.data)):
        if user not in known_users:
            owners = sorted(t for t, us in model.users.items() if user in us)
            yield Violation("isolation", f"user id {user!r}, not a user of tenant {tenant!r}, reached it",
                            {**_where(model, ev), "user_id": user, "tenants_with_that_user": owners, "frame": frame.raw})


@register("isolation")
def identity_as_token(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A welcome names the token's tenant and user (the header's, when a token is sent both ways at once);
    a token that must be refused, or another path than the service's, opens nothing."""
    if ev.kind == "ok" and ev.op == "connect" and ev.conn in model.conns:
        conn = model.conns[ev.conn]
        if conn.token_kind.startswith("other_path"):
            yield Violation("isolation", "a handshake on another path than the service's opened a connection",
                            {**_where(model, ev), "welcome": ev.data.get("welcome")})
        elif conn.token_kind != "valid":
            yield Violation("isolation", f"a token that must be refused ({conn.token_kind}) opened a connection",
                            {**_where(model, ev), "token_kind": conn.token_kind, "welcome": ev.data.get("welcome")})
        welcome = ev.data.get("welcome") or {}
        if welcome and (welcome.get("tenant") != conn.tenant or welcome.get("user") != conn.user):
            yield Violation("isolation", "the welcome names another identity than the token",
                            {**_where(model, ev), "token": {"tid": conn.tenant, "sub": conn.user}, "welcome": welcome})


#: Two ids of one kind and one stem whose trailing numbers are this close were counted out.
COUNTER_GAP = 1000


@register("isolation")
def ids_are_opaque(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Ids the server makes are opaque random strings, never counters (which let a tenant count another's)."""
    if not _frame_in(model, ev, frame) or frame is None:
        return
    seen: dict[tuple[str, str], dict[int, str]] = {}
    for field, value in dict.fromkeys(model.ids_in(frame.data)):
        counted = id_number(value)
        if counted is None or model.registry.owner(value) is not None:
            continue  # no trailing number, or an id this run has seen before
        stem, number = counted
        earlier = {**model.id_numbers.get((field, stem), {}), **seen.get((field, stem), {})}
        near = [(n, v) for n, v in earlier.items() if v != value and abs(n - number) <= COUNTER_GAP]
        if near:
            _, before = min(near, key=lambda nv: abs(nv[0] - number))
            yield Violation("isolation", f"{field}s count up ({before!r}, then {value!r}): server ids must be opaque "
                                         "random strings, never counters",
                            {**_where(model, ev), "field": field, "earlier": before, "now": value, "frame": frame.raw})
            return
        seen.setdefault((field, stem), {})[number] = value


@register("isolation")
def foreign_like_absent(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """An id of another tenant (or user, where threads are private) is answered exactly like one that does not exist."""
    if not _frame_in(model, ev, frame) or frame is None or frame.re not in model.probes:
        return
    probe = model.probes[frame.re]
    mine = "foreign" if probe["foreign"] == frame.re else "absent"
    other = probe["absent"] if mine == "foreign" else probe["foreign"]
    if mine == "foreign" and frame.type != "error":
        yield Violation("isolation", f"{probe['request']} on {probe.get('whose', 'another tenant')}'s thread was answered with "
                                     f"{frame.type!r}, not not_found",
                        {**_where(model, ev), "probe": probe, "frame": frame.raw})
        return
    other_reply = model.probe_replies.get(other)
    if other_reply is None or frame.type not in ("error",) and mine == "absent":
        return
    mine_cmp = {k: v for k, v in frame.data.items() if k != "re"}
    other_cmp = {k: v for k, v in other_reply.items() if k != "re"}
    if mine_cmp != other_cmp:
        foreign_reply, absent_reply = (mine_cmp, other_cmp) if mine == "foreign" else (other_cmp, mine_cmp)
        yield Violation("isolation", f"{probe.get('whose', 'another tenant')}'s thread id is answered differently from an "
                                     "id that does not exist",
                        {**_where(model, ev), "probe": probe, "foreign_reply": foreign_reply, "absent_reply": absent_reply})


# -- routing -------------------------------------------------------------------


@register("routing")
def replies_to_sender(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A frame with re reaches only the connection that sent that request id."""
    if not _frame_in(model, ev, frame) or frame is None or frame.re is None:
        return
    req = model.reqs.get(frame.re)
    if req is None:
        yield Violation("routing", f"a {frame.type!r} frame carries re {frame.wire_re!r}, an id {ev.conn} never sent",
                        {**_where(model, ev), "frame": frame.raw})
    elif req.conn != ev.conn:
        sender = model.conns[req.conn]
        yield Violation("routing", f"the reply to {req.conn}'s request reached {ev.conn}",
                        {**_where(model, ev), "sender": req.conn, "sender_tenant": sender.tenant, "frame": frame.raw})


@register("routing")
def fanout_to_members(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Fan-out of a thread reaches only where the service's rule sends it: connections that joined it
    and have not left, the owner's other connections, or none."""
    if not _frame_in(model, ev, frame) or frame is None or frame.re is not None or frame.type not in FANOUT:
        return
    thread = frame.data.get("thread_id")
    if not isinstance(thread, str) or model.receives_fanout(ev.conn, thread, ev.t):  # type: ignore[arg-type]
        return
    rule = model.semantics.fanout
    if rule == "joined":
        spans = [(round(m.start, 3), m.end and round(m.end, 3)) for m in model.members.get((ev.conn, thread), [])]  # type: ignore[index]
        what = "has left" if spans else "never joined"
        yield Violation("routing", f"{frame.type} of a thread reached a connection that {what} it",
                        {**_where(model, ev), "thread_id": thread, "memberships": spans, "frame": frame.raw})
        return
    state = model.threads.get(thread)
    owner = f"user {state.owner!r} of tenant {state.tenant!r}" if state is not None else "a thread this run never started"
    said = ("reached a connection that is not its owner's" if rule == "owner"
            else "reached a connection, and this service sends fan-out to nobody")
    yield Violation("routing", f"{frame.type} of a thread {said}",
                    {**_where(model, ev), "thread_id": thread, "fanout_rule": rule, "thread_owner": owner, "frame": frame.raw})


@register("routing")
def fanout_reaches_members(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Every connection the service's rule sends a thread's fan-out to (v1: joined before the turn began, without a break since) gets each turn's thread_message and agent_response, within timing.fanout_lag_ms of the requester's own reply."""
    # Model.owed_copies says which copies are owed; the machine waits for them when it settles
    # and at the audit, and notes each that never came (copy_missing).
    if ev.kind != "info" or ev.op != "copy_missing" or ev.conn not in model.conns:
        return
    req = model.reqs.get(str(ev.data.get("request")))
    if req is None:
        return
    thread = req.fields.get("thread_id")
    spans = [(round(m.start, 3), m.end and round(m.end, 3)) for m in model.members.get((ev.conn, thread), [])]  # type: ignore[index]
    yield Violation("routing", f"a turn of a thread never reached {ev.conn}, which {_receives_as(model)} "
                               f"(missing: {', '.join(ev.data.get('missing', ()))})",
                    {**_where(model, ev), "thread_id": thread, "requester": req.conn, "request": req.req_id,
                     "step": req.step, "message_id": req.acked, "reply_id": req.response_id,
                     "missing": list(ev.data.get("missing", ())), "waited_s": ev.data.get("waited_s"),
                     "fanout_lag_ms": ev.data.get("limit_ms"),
                     "memberships": spans, "fanout_rule": model.semantics.fanout})


def _receives_as(model: Model) -> str:
    if model.semantics.fanout == "joined":
        return "had joined it before the message was sent and has not left since"
    return "is another connection of its owner, open since before the message was sent"


@register("routing")
def turn_whole_or_nothing(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A watcher receives a turn whole or not at all: its chunks and reply only after its thread_message."""
    if not _frame_in(model, ev, frame) or frame is None or frame.re is not None:
        return
    thread = frame.data.get("thread_id")
    if frame.type not in ("agent_chunk", "agent_response") or not isinstance(thread, str):
        return
    if not model.receives_fanout(ev.conn, thread, ev.t):  # type: ignore[arg-type]
        return  # fanout_to_members reports it
    if frame.type == "agent_response" and (ev.conn, frame.data.get("message_id")) in model.fanout_responses:
        return  # the same reply again: one_complete_reply reports it
    turn = model.fanout.get((ev.conn, thread))  # type: ignore[arg-type]
    if turn is None or not turn.started:
        spans = [(round(m.start, 3), m.end and round(m.end, 3)) for m in model.members.get((ev.conn, thread), [])]  # type: ignore[index]
        yield Violation("routing", f"a watcher received part of a turn ({frame.type}) without its start (no "
                                   "thread_message): it joined, or left and joined again, while the turn streamed",
                        {**_where(model, ev), "thread_id": thread, "memberships": spans, "frame": frame.raw})


@register("routing")
def no_copy_to_requester(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """The requester never receives the fan-out copy of its own turn (its message or its reply)."""
    if not _frame_in(model, ev, frame) or frame is None:
        return
    mid = frame.data.get("message_id")
    if not isinstance(mid, str):
        return
    req = model.reqs.get(frame.re or "")
    own = req is not None and req.conn == ev.conn and frame.type in ("ack", "agent_response")
    fanout = frame.re is None and frame.type in ("thread_message", "agent_response")
    if (own and (ev.conn, mid) in model.fanout_msgs) or (fanout and (ev.conn, mid) in model.own_msgs):
        yield Violation("routing", f"the requester received a fan-out copy of its own turn ({frame.type})",
                        {**_where(model, ev), "message_id": mid, "thread_id": frame.data.get("thread_id"), "frame": frame.raw})


# -- durability ----------------------------------------------------------------


@register("durability")
def history_keeps_commits(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Every message acked and reply sent before a history read is in it, unchanged (with limit: the newest)."""
    req = _own_reply(model, ev, frame, "history")
    if req is None or req.expect_history is None or frame is None:
        return
    got = frame.data.get("messages")
    if not isinstance(got, list):
        return
    by_id = {m.get("message_id"): m for m in got if isinstance(m, dict)}
    limit = req.fields.get("limit")
    windowed = isinstance(limit, int) and not isinstance(limit, bool)
    if windowed:
        known = [model.msgs[m.get("message_id")] for m in got if isinstance(m, dict) and m.get("message_id") in model.msgs]
        if any(b.known_t < a.invoke_t or (a.role == "assistant" and b.role == "user" and a.req_id == b.req_id)
               for i, a in enumerate(known) for b in known[i + 1:]):
            return  # out of commit order: history_in_commit_order says so, and no window is judged by it
    expected = req.expect_history
    asked = req.fields.get("thread_id")
    strays = [mid for mid in by_id if mid in model.msgs and model.msgs[mid].thread_id != asked]
    if strays:
        yield Violation("durability", "the history of one thread holds a message of another thread",
                        {**_where(model, ev), "thread_id": asked, "message_id": strays[0],
                         "its_thread": model.msgs[strays[0]].thread_id, "history_ids": list(by_id)})
        return
    if windowed and len(got) > limit:
        yield Violation("durability", f"history with limit {limit} returned {len(got)} messages, more than the limit",
                        {**_where(model, ev), "thread_id": req.fields.get("thread_id"), "history_ids": list(by_id)})
        return
    if windowed and len(got) < min(limit, len(expected)):
        yield Violation("durability", f"history with limit {limit} returned {len(got)} messages; at least {min(limit, len(expected))} were committed",
                        {**_where(model, ev), "thread_id": req.fields.get("thread_id"), "crashes_so_far": model.crashes, "frame": frame.raw})
    for msg in expected:
        item = by_id.get(msg.message_id)
        if item is None:
            if windowed:
                # Older than the window, or left out: the window holds the newest `limit`, so
                # nothing in it may be older than a message it leaves out. Known older: committed
                # before the left-out one was sent, or the user message the left-out reply answers.
                older = [model.msgs[mid] for mid in by_id if mid in model.msgs
                         and (model.msgs[mid].known_t < msg.invoke_t
                              or (msg.role == "assistant" and model.msgs[mid].role == "user"
                                  and model.msgs[mid].req_id == msg.req_id))]
                if older:
                    yield Violation("durability", f"history with limit {limit} left out a newer message and returned "
                                                  "an older one",
                                    {**_where(model, ev), "thread_id": msg.thread_id, "left_out": msg.message_id,
                                     "older_returned": older[0].message_id, "history_ids": list(by_id)})
                    return
                continue
            yield Violation("durability", f"an {'acked message' if msg.role == 'user' else 'sent reply'} is missing from history",
                            {**_where(model, ev), "thread_id": msg.thread_id, "message_id": msg.message_id, "role": msg.role,
                             "content": msg.content[:200], "request": msg.req_id, "crashes_so_far": model.crashes,
                             "history_ids": list(by_id)})
        elif item.get("content") != msg.content or item.get("role") != msg.role or (
            msg.role == "user" and item.get("user") != msg.user
        ):
            yield Violation("durability", "a committed message reads back different from what was acked or sent",
                            {**_where(model, ev), "message_id": msg.message_id,
                             "expected": {"role": msg.role, "user": msg.user, "content": msg.content[:300]},
                             "got": {k: (v[:300] if isinstance(v, str) else v) for k, v in item.items()}})


@register("durability")
def threads_kept(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Every thread the tenant started is in its thread list, counting at least the messages committed in it,
    and no more than the user messages sent to it by then and a reply to each."""
    # Threads listed beyond those are not a violation: a provisioned tenant (--identities)
    # holds threads of earlier examples and runs, and they are its own.
    req = _own_reply(model, ev, frame, "threads")
    if req is None or req.expect_threads is None or frame is None:
        return
    threads = frame.data.get("threads")
    if not isinstance(threads, list):
        return  # not a list: frames_match_schema reports the frame; nothing here to compare
    listed = {t.get("thread_id") for t in threads if isinstance(t, dict)}
    for thread in sorted(req.expect_threads - listed):
        yield Violation("durability", "a thread the tenant started is missing from list_threads",
                        {**_where(model, ev), "thread_id": thread, "crashes_so_far": model.crashes})
    for item in threads:
        if not isinstance(item, dict) or item.get("thread_id") not in req.expect_counts:
            continue
        count, floor = item.get("message_count"), req.expect_counts[item["thread_id"]]
        if isinstance(count, int) and count < floor:
            yield Violation("durability", f"list_threads counts {count} messages in a thread where {floor} were committed "
                                          "(user messages and replies)",
                            {**_where(model, ev), "thread_id": item["thread_id"], "message_count": count,
                             "committed_before": floor})
        sent = _user_messages_sent(model, item["thread_id"], ev.t)
        if isinstance(count, int) and count > 2 * sent:
            yield Violation("durability", f"list_threads counts {count} messages in a thread where {sent} user "
                                          f"message(s) were sent, so at most {2 * sent} with the replies",
                            {**_where(model, ev), "thread_id": item["thread_id"], "message_count": count,
                             "user_messages_sent": sent})


#: Answers after which a user message was not stored.
NOT_STORED = frozenset({"bad_request", "not_found", "too_large", "rate_limited"})


def _user_messages_sent(model: Model, thread: str, before: float) -> int:
    """User messages sent to ``thread`` before ``before`` that may have been stored (not refused)."""
    return sum(1 for r in model.turn_reqs.get(thread, ()) if r.t <= before and r.outcome not in NOT_STORED)


# -- exactly-once ----------------------------------------------------------------


def _assembled(chunks: dict[int, str]) -> tuple[list[int], str]:
    missing = [i for i in range(max(chunks, default=-1) + 1) if i not in chunks]
    return missing, "".join(chunks[i] for i in sorted(chunks))


@register("exactly-once")
def one_complete_reply(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Each acked message gets one reply; chunks none missing or repeated; deltas add up to it."""
    if _frame_in(model, ev, frame) and frame is not None:
        req = model.reqs.get(frame.re or "")
        data = frame.data
        if req is not None and req.conn == ev.conn and req.type == "user_message":
            if frame.type == "ack" and req.acked is not None:
                yield Violation("exactly-once", "a message was acked twice", {**_where(model, ev), "request": req.req_id, "frame": frame.raw})
            elif frame.type == "agent_chunk" and data.get("seq") in req.chunks:
                yield Violation("exactly-once", f"chunk seq {data.get('seq')} was sent twice", {**_where(model, ev), "request": req.req_id, "frame": frame.raw})
            elif frame.type == "agent_response":
                if req.responses:
                    yield Violation("exactly-once", "a message got a second agent_response", {**_where(model, ev), "request": req.req_id, "frame": frame.raw})
                    return
                yield from _check_assembly(model, ev, frame, req.chunks, req.req_id)
        elif frame.re is None and isinstance(data.get("thread_id"), str):
            key = (ev.conn, data["thread_id"])
            turn = model.fanout.get(key)  # type: ignore[arg-type]
            if frame.type == "agent_chunk" and turn is not None and data.get("seq") in turn.seqs:
                # A watcher sees each turn whole, ended by its agent_response, and a leave ends its
                # view of one (the model drops it): seq 0 again inside a turn is a repeat too.
                yield Violation("exactly-once", f"fan-out chunk seq {data.get('seq')} was delivered twice",
                                {**_where(model, ev), "received_seqs": sorted(turn.seqs), "frame": frame.raw})
            elif frame.type == "agent_response":
                if (ev.conn, data.get("message_id")) in model.fanout_responses:
                    yield Violation("exactly-once", "a fan-out agent_response was delivered twice", {**_where(model, ev), "frame": frame.raw})
                elif turn is not None and turn.started:
                    # A watcher that saw the turn begin saw all of it: no chunks at all is chunks missing.
                    yield from _check_assembly(model, ev, frame, turn.deltas, None)
    elif ev.kind == "info" and ev.op == "timeout":
        req = model.reqs.get(ev.req_id or "")
        if req is not None and req.type == "user_message" and req.acked is not None and not req.responses:
            yield Violation("exactly-once", f"an acked message got no agent_response within {ev.data.get('limit_s')} s",
                            {**_where(model, ev), "request": req.req_id, "message_id": req.acked, "step": req.step,
                             "chunks_received": sorted(req.chunks)})


@register("exactly-once")
def fanout_copies_match(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A watcher's copy of a turn is the turn: thread_message carries the message as sent, by its sender;
    every copy of a reply carries the same content."""
    if not _frame_in(model, ev, frame) or frame is None:
        return
    data = frame.data
    if frame.type == "agent_response" and isinstance(data.get("message_id"), str) and isinstance(data.get("content"), str):
        first = model.response_contents.get(data["message_id"])
        if first is not None and first != data["content"]:
            yield Violation("exactly-once", "two copies of one agent_response carry different content",
                            {**_where(model, ev), "message_id": data["message_id"], "first": first[:300],
                             "now": data["content"][:300], "frame": frame.raw})
        return
    if frame.type != "thread_message" or frame.re is not None or not isinstance(data.get("thread_id"), str):
        return
    content, user, mid = data.get("content"), data.get("user"), data.get("message_id")
    sent = [r for r in model.turn_reqs.get(data["thread_id"], ()) if r.fields.get("content") == content]
    if not sent:
        yield Violation("exactly-once", "a thread_message carries content that no message sent to its thread had",
                        {**_where(model, ev), "content": str(content)[:300], "frame": frame.raw})
    elif user not in {model.conns[r.conn].user for r in sent if r.conn in model.conns}:
        yield Violation("exactly-once", f"a thread_message names {user!r} as the sender of a message another user sent",
                        {**_where(model, ev), "senders": sorted({model.conns[r.conn].user for r in sent}), "frame": frame.raw})
    elif isinstance(mid, str) and all(r.acked is not None for r in sent) and mid not in {r.acked for r in sent}:
        yield Violation("exactly-once", "a thread_message's message_id is not the one the sender's ack gave",
                        {**_where(model, ev), "message_id": mid, "acked": sorted(str(r.acked) for r in sent),
                         "frame": frame.raw})


def _check_assembly(model: Model, ev: Event, frame: Frame, chunks: dict[int, str], req_id: str | None) -> Iterator[Violation]:
    missing, joined = _assembled(chunks)
    content = frame.data.get("content")
    if missing:
        yield Violation("exactly-once", f"agent_response arrived with chunk seq {missing} missing",
                        {**_where(model, ev), "request": req_id, "received_seqs": sorted(chunks), "frame": frame.raw})
    elif isinstance(content, str) and joined != content:
        yield Violation("exactly-once", "the chunks' deltas do not add up to the agent_response content",
                        {**_where(model, ev), "request": req_id, "deltas_joined": joined[:300], "content": content[:300]})


# -- ordering ------------------------------------------------------------------


@register("ordering")
def history_in_commit_order(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """History alternates user message and its reply, in the order the suite saw them commit."""
    req = _own_reply(model, ev, frame, "history")
    got = frame.data.get("messages") if frame is not None else None
    if req is None or not isinstance(got, list):
        return
    items = [m for m in got if isinstance(m, dict)]
    windowed = "limit" in req.fields
    roles = [m.get("role") for m in items]
    where = {**_where(model, ev), "thread_id": req.fields.get("thread_id"), "roles": roles,
             "ids": [m.get("message_id") for m in items]}
    for i in range(1, len(roles)):
        if roles[i] == roles[i - 1]:
            yield Violation("ordering", f"history has two {roles[i]} messages in a row (positions {i - 1} and {i})", where)
            return
    if roles and roles[0] != "user" and not windowed:
        yield Violation("ordering", "history starts with a reply, not a user message", where)
        return
    pos = {m.get("message_id"): i for i, m in enumerate(items)}
    known = [model.msgs[mid] for mid in pos if mid in model.msgs]
    for m in known:
        if m.role != "user":
            continue
        reply = next((r for r in model.msgs.values() if r.role == "assistant" and r.req_id == m.req_id), None)
        if reply is not None and reply.message_id in pos and pos[reply.message_id] != pos[m.message_id] + 1:
            yield Violation("ordering", "a user message is not followed by its own reply",
                            {**where, "message_id": m.message_id, "reply_id": reply.message_id})
            return
    for a in known:
        for b in known:
            if b.role == "user" and a.known_t < b.invoke_t and pos[a.message_id] > pos[b.message_id]:
                yield Violation("ordering", "history puts a message before one that was committed earlier",
                                {**where, "earlier": a.message_id, "later": b.message_id})
                return


@register("ordering")
def threads_in_start_order(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """list_threads is oldest first: a thread started before another was asked for is listed before it."""
    req = _own_reply(model, ev, frame, "threads")
    if req is None or frame is None or not isinstance(frame.data.get("threads"), list):
        return
    known = [model.threads[item["thread_id"]] for item in frame.data["threads"]
             if isinstance(item, dict) and isinstance(item.get("thread_id"), str) and item["thread_id"] in model.threads]
    for i, later in enumerate(known):
        for older in known[i + 1:]:
            # ``older`` was started (its agent_started arrived) before ``later`` was even asked for.
            if older.started_t < later.asked_t:
                yield Violation("ordering", "list_threads is not oldest first: a thread is listed before one "
                                            "that was started before it was asked for",
                                {**_where(model, ev), "listed_first": later.thread_id, "started_first": older.thread_id,
                                 "order": [t.thread_id for t in known]})
                return


@register("ordering")
def chunks_in_order(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A reply's chunks arrive in seq order; an audit finds every user message answered."""
    if _frame_in(model, ev, frame) and frame is not None and frame.type == "agent_chunk":
        req = model.reqs.get(frame.re or "")
        seq = frame.data.get("seq")
        if req is not None and req.conn == ev.conn and isinstance(seq, int) and seq < req.max_seq and seq not in req.chunks:
            yield Violation("ordering", f"chunk seq {seq} arrived after seq {req.max_seq}", {**_where(model, ev), "request": req.req_id, "frame": frame.raw})
        elif frame.re is None and isinstance(seq, int) and isinstance(frame.data.get("thread_id"), str):
            turn = model.fanout.get((ev.conn, frame.data["thread_id"]))  # type: ignore[arg-type]
            if turn is not None and seq not in turn.seqs and seq < max(turn.seqs, default=-1):
                yield Violation("ordering", f"fan-out chunk seq {seq} arrived after seq {max(turn.seqs)}",
                                {**_where(model, ev), "thread_id": frame.data["thread_id"], "frame": frame.raw})
    elif ev.kind == "info" and ev.op == "audit_unanswered":
        yield Violation("ordering", "a stored user message has no reply after the run settled",
                        {**_where(model, ev), **dict(ev.data)})


# -- liveness ------------------------------------------------------------------


@register("liveness")
def answered_in_time(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Every request on an open connection gets its reply within the limit (a malformed one its error); the server stays up."""
    if ev.kind == "info" and ev.op == "timeout":
        req = model.reqs.get(ev.req_id or "")
        if req is not None and not (req.type == "user_message" and req.acked is not None):
            yield Violation("liveness", f"{req.type} got no {'reply' if req.type != 'user_message' else 'ack'} within {ev.data.get('limit_s')} s",
                            {**_where(model, ev), "request": req.req_id, "step": req.step,
                             "fields": {k: str(v)[:80] for k, v in req.fields.items()}})
    elif ev.kind == "info" and ev.op == "error_owed":
        yield Violation("liveness", f"a malformed frame ({ev.data.get('kind')}) got no error within "
                                    f"{ev.data.get('limit_s')} s: each gets bad_request, the connection staying open",
                        {**_where(model, ev), "request": ev.data.get("request"), "kind": ev.data.get("kind"),
                         "waited_s": ev.data.get("waited_s")})
    elif ev.kind == "info" and ev.op == "connect" and ev.data.get("reason") == "timeout":
        yield Violation("liveness", f"the handshake got no welcome within {ev.data.get('limit_s')} s", _where(model, ev))
    elif ev.kind == "info" and ev.op == "died":
        yield Violation("liveness", "the server exited by itself", dict(ev.data))
    elif (ev.kind == "info" and ev.op == "closed" and ev.conn in model.conns and ev.data.get("code") in (1006, None)
          and str(ev.data.get("reason", "")).startswith("closed by the server")):
        conn = model.conns[ev.conn]
        if not conn.closing_1009 and not model.killed_under(ev.conn):
            yield Violation("liveness", "the server dropped the connection without closing it (no close frame): "
                                        "whatever it still owed this connection is lost",
                            {**_where(model, ev), "close": dict(ev.data), "opened_t": conn.opened_t})


# -- timing ----------------------------------------------------------------------

_LIMIT_OF = {"connect": "connect_ms", "start_agent": "start_agent_ms", "user_message": "response_ms", "get_history": "history_ms"}


@register("timing")
def within_limits(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """No single operation takes longer than the profile's limit for it; a message is timed from when its turn could begin.

    A thread runs one turn at a time, so a message sent while another turn of its thread ran
    waits for it (the protocol's rule): that wait is not its own."""
    if ev.kind == "ok" and ev.op in _LIMIT_OF and "latency_ms" in ev.data:
        limit = model.limits.get(_LIMIT_OF[ev.op])
        actual = float(ev.data["latency_ms"])
        req = model.reqs.get(ev.req_id or "")
        if limit is not None and actual > limit and req is not None and req.type == "user_message":
            start = _turn_could_begin(model, req, ev.t)
            actual = -1.0 if start is None else min(actual, (ev.t - start) * 1000)
        if limit is not None and actual > limit:
            yield Violation("timing", f"{ev.op} took {actual:.0f} ms, over the limit of {limit} ms",
                            {**_where(model, ev), "operation": ev.op, "actual_ms": round(actual, 1), "limit_ms": limit,
                             "step": req.step if req is not None else ev.step})
    elif _frame_in(model, ev, frame) and frame is not None and frame.type == "ack":
        req = model.reqs.get(frame.re or "")
        limit = model.limits.get("ack_ms")
        if req is not None and req.acked is None and limit is not None and (ev.t - req.t) * 1000 > limit:
            start = _turn_could_begin(model, req, ev.t)
            actual = -1.0 if start is None else (ev.t - start) * 1000
            if actual > limit:
                yield Violation("timing", f"ack took {actual:.0f} ms, over the limit of {limit} ms",
                                {**_where(model, ev), "operation": "ack", "actual_ms": round(actual, 1),
                                 "limit_ms": limit, "step": req.step})


def _turn_could_begin(model: Model, req: Req, now: float) -> float | None:
    """When ``req``'s turn could begin, as the client knows it: when it was sent, or when the last
    reply of another turn of its thread came, if later; None when another turn of its thread that
    may have run before it ended out of the client's sight (its connection closed), so the wait is unknown."""
    start = req.t
    for other in model.turn_reqs.get(str(req.fields.get("thread_id")), ()):
        if other is req or other.t >= now or other.outcome in NOT_STORED:
            continue
        if other.response_t is not None:
            if other.response_t <= now:
                start = max(start, other.response_t)
        elif other.outcome is not None:
            return None  # sent, maybe run, its end unseen: how long this one waited is unknown
    return start


@register("timing")
def startup_within_latency(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """The server's own start-up measure (startup_ms) fits inside the time the client waited for agent_started."""
    if ev.kind != "ok" or "latency_ms" not in ev.data:
        return
    req = model.reqs.get(ev.req_id or "")
    said = req.startup_ms if req is not None and req.type == "start_agent" else None
    if not isinstance(said, (int, float)) or isinstance(said, bool):
        return  # absent (another protocol) or ill-typed (frames_match_schema reports it)
    waited = float(ev.data["latency_ms"])
    # The server's clock and the client's run at the same rate; 1% and 1 ms cover rounding and drift.
    if said < 0 or said > waited * 1.01 + 1.0:
        yield Violation("timing", f"agent_started says the start took {said} ms, but the client had its answer "
                                  f"{waited:.1f} ms after asking: startup_ms must be milliseconds of this start",
                        {**_where(model, ev), "request": ev.req_id, "startup_ms": said, "client_ms": round(waited, 3)})


def percentile_violations(samples: dict[str, list[float]], limits: dict[str, Any]) -> list[Violation]:
    """Run-level percentile checks (`timing`), over at least ``min_samples`` samples."""
    from partywall.stats import summarize

    out = []
    need = int(limits.get("min_samples", 20))
    for op, key in (("start_agent", "start_agent_p95_ms"), ("user_message", "response_p95_ms")):
        limit = limits.get(key)
        values = samples.get(op, [])
        if limit is None or len(values) < need:
            continue
        summary = summarize(values, 0)
        if summary["p95"] > limit:
            out.append(Violation("timing", f"{op} p95 is {summary['p95']:.0f} ms, over the limit of {limit} ms",
                                 {"operation": op, "percentile": 95, "actual_ms": round(summary["p95"], 1),
                                  "limit_ms": limit, "n": summary["n"]}, check="percentile_limits"))
    return out


# -- protocol ------------------------------------------------------------------


@register("protocol")
def frames_match_schema(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Every frame is a JSON object matching its type's schema; no internal errors."""
    if not _frame_in(model, ev, frame) or frame is None:
        return
    if frame.problems:
        yield Violation("protocol", f"a frame breaks the schema: {frame.problems[0]}",
                        {**_where(model, ev), "problems": list(frame.problems), "frame": frame.raw})
    if frame.type == "error" and frame.data.get("code") == "internal":
        yield Violation("protocol", "the server answered with error code internal",
                        {**_where(model, ev), "frame": frame.raw})
    conn = model.conns[ev.conn]  # type: ignore[index]
    # (An error before the connection opened is the service refusing a credential: see identity_as_token.)
    if (frame.type == "error" and frame.re is None and frame.data.get("code") != "too_large" and conn.open
            and conn.unsolicited_errors == 0):
        yield Violation("protocol", "an error without re arrived that no request of this connection provoked",
                        {**_where(model, ev), "frame": frame.raw})
    if frame.type == "error" and frame.data.get("code") == "too_large" and frame.re is not None:
        yield Violation("protocol", "a too_large error carries re (the oversized frame must not be parsed)",
                        {**_where(model, ev), "frame": frame.raw})
    req = model.reqs.get(frame.re or "")
    if req is not None and req.conn == ev.conn and req.type.startswith("raw:") and frame.type != "error":
        yield Violation("protocol", f"a malformed frame ({req.type[4:]}) was answered with {frame.type!r}, not an error",
                        {**_where(model, ev), "request": req.req_id, "expected": sorted(req.accepts), "frame": frame.raw})
        return
    if req is None or req.conn != ev.conn or frame.type == "error" or req.type.startswith("raw:"):
        return
    allowed = model.adapter.reply_types(req.type)
    if frame.type not in allowed:
        yield Violation("protocol", f"a {req.type} request was answered with {frame.type!r} (expected {' / '.join(allowed)})",
                        {**_where(model, ev), "request": req.req_id, "frame": frame.raw})
    elif req.type == "user_message" and frame.type in ("agent_chunk", "agent_response") and req.acked is None:
        yield Violation("protocol", f"{frame.type} arrived before the message's ack", {**_where(model, ev), "request": req.req_id, "frame": frame.raw})
    elif req.outcome is not None and model.adapter.completes(req.type, frame) and req.type != "user_message":
        yield Violation("protocol", f"a {req.type} request got a second {frame.type}", {**_where(model, ev), "request": req.req_id, "frame": frame.raw})


#: What an error message meant for people must not carry: the server's internals (a stack
#: trace, an exception's class, a source file, a library's advice to its own developers).
INTERNALS = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|\b[A-Z]\w*(?:Error|Exception)\b"
    r"|\bsys\.\w+|set_int_max_str_digits|site-packages|\.pyc?\b|\bat 0x[0-9a-fA-F]{6,}"
    r"|\bsqlite3?\.|\btrio\.|\bjava\.\w|\bnode_modules\b|\bgoroutine \d+")


@register("protocol")
def errors_say_no_internals(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """An error's message says what was wrong with the request, never the server's internals."""
    if not _frame_in(model, ev, frame) or frame is None or frame.type != "error":
        return
    message = frame.data.get("message")
    found = INTERNALS.search(message) if isinstance(message, str) else None
    if found is not None:
        yield Violation("protocol", f"an error message reveals the server's internals ({found.group(0)!r})",
                        {**_where(model, ev), "message": message[:500], "frame": frame.raw[:2000]})


#: 2000-01-01 and 2100-01-01 in Unix seconds: every time this protocol dates lies between.
UNIX_2000, UNIX_2100 = 946_684_800.0, 4_102_444_800.0


def _times_in(frame: Frame) -> Iterator[tuple[str, Any, str | None]]:
    """(field, value, the id of the item it dates) for every server time in a frame but the welcome's."""
    data = frame.data
    if frame.type == "pong":
        yield "server_time", data.get("server_time"), None
    for key, id_key in (("messages", "message_id"), ("threads", "thread_id")):
        items = data.get(key)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict):
                yield "created_at", item.get("created_at"), item.get(id_key)


@register("protocol")
def times_are_unix_seconds(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """created_at and server_time are Unix seconds: on the client's clock within the allowed skew, never before what they date."""
    if ev.kind == "ok" and ev.op == "connect" and isinstance(ev.data.get("welcome"), dict):
        # The welcome comes before the connect records the client's clock: judged here, with it.
        wall = ev.data.get("wall_s")
        found = [("server_time", ev.data["welcome"].get("server_time"), None)]
        now = float(wall) if isinstance(wall, float) else model.wall(ev.t)
    elif _frame_in(model, ev, frame) and frame is not None:
        found, now = list(_times_in(frame)), model.wall(ev.t)
    else:
        return
    skew = float(model.limits.get("clock_skew_ms", 300_000)) / 1000.0
    for field, value, item in found:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # absent or ill-typed: frames_match_schema reports it
        low, high = UNIX_2000, UNIX_2100  # all that is known without the client's clock (a recorded history)
        if now is not None:
            high = now + skew
            if field == "server_time":
                low = now - skew
            msg = model.msgs.get(item) if isinstance(item, str) else None
            thread = model.threads.get(item) if isinstance(item, str) else None
            asked = msg.invoke_t if msg is not None else thread.asked_t if thread is not None else None
            if asked is not None:
                low = max(low, asked + (now - ev.t) - skew)  # no older than the request that made it
        if not low <= value <= high:
            clock = f"the client's clock said {now:.3f}" if now is not None else "no client clock was recorded"
            yield Violation("protocol", f"{field} {value!r} is not Unix seconds of when it happened: {clock} "
                                        f"(allowed skew {skew:g} s)",
                            {**_where(model, ev), "field": field, "value": value, "item": item,
                             "client_time": now, "allowed": [low, high], "frame": frame.raw if frame else None})
            return


@register("protocol")
def refused_as_specified(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A handshake refused with an HTTP status gets the adapter's: another path its own (v1: 404,
    whatever the credential), a refused credential its own (v1: 401, with an empty body)."""
    if ev.kind != "fail" or ev.op != "connect" or ev.conn not in model.conns:
        return
    status, body = ev.data.get("status"), ev.data.get("body") or ""
    kind = model.conns[ev.conn].token_kind
    if not isinstance(status, int) or kind == "valid":
        return  # refused after the socket opened (no status), or a valid credential (valid_token_accepted)
    refusals = model.adapter.refusals
    if kind.startswith("other_path"):
        if refusals.other_path is not None and status != refusals.other_path:
            yield Violation("protocol", f"a handshake on another path than the service's got HTTP {status}, not "
                                        f"{refusals.other_path} (the path is checked before the credential)",
                            {**_where(model, ev), "status": status, "token_kind": kind})
        return
    if refusals.credential is not None and status != refusals.credential:
        yield Violation("protocol", f"a credential that must be refused ({kind}) got HTTP {status}, not "
                                    f"{refusals.credential}",
                        {**_where(model, ev), "status": status, "token_kind": kind})
    elif refusals.empty_body and body:
        yield Violation("protocol", f"a refused credential's HTTP {status} has a body ({len(body)} characters): "
                                    "it must be empty",
                        {**_where(model, ev), "status": status, "token_kind": kind, "body": body[:200]})


@register("protocol")
def closes_only_for_too_large(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """The server closes a connection only after too_large (1009) or when shutting down (1001)."""
    if not (ev.kind == "info" and ev.op == "closed" and ev.conn in model.conns):
        return
    conn = model.conns[ev.conn]
    if not str(ev.data.get("reason", "")).startswith("closed by the server") or conn.closing_1009:
        return  # the suite closed it, or oversize_closes_1009 judges the close
    if ev.data.get("code") in (1001, 1006, None):
        return  # going away (a server shutting down), or dropped without a close frame: answered_in_time's
    if model.killed_under(ev.conn):  # type: ignore[arg-type]
        return  # the suite killed the server under it
    yield Violation("protocol", f"the server closed the connection (code {ev.data.get('code')!r}) without a too_large "
                                "error or a shutdown: an error closes the connection only for too_large",
                    {**_where(model, ev), "close": dict(ev.data), "opened_t": conn.opened_t})


@register("protocol")
def shutdown_closes_1001(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A server shutting down closes each open connection with 1001 (going away)."""
    if not (ev.kind == "info" and ev.op == "closed" and ev.conn in model.conns) or not model.shut_down_under(ev.conn):
        return
    conn = model.conns[ev.conn]
    if not str(ev.data.get("reason", "")).startswith("closed by the server") or conn.closing_1009:
        return  # the suite closed it, or it was already closing for too_large
    code = ev.data.get("code")
    if code != 1001:
        how = "without a close frame" if code in (1006, None) else f"with code {code}"
        yield Violation("protocol", f"the server, shutting down, closed the connection {how}, not 1001 (going away)",
                        {**_where(model, ev), "close": dict(ev.data), "opened_t": conn.opened_t})


@register("protocol")
def replies_as_predicted(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Each reply's fields are what the request and the model predict: its thread, fresh ids, its tenant's assistant."""
    if ev.kind == "ok" and ev.op == "connect":
        connection_id = (ev.data.get("welcome") or {}).get("connection_id")
        first = model.connection_ids.get(connection_id) if isinstance(connection_id, str) else None
        if first is not None:
            yield Violation("protocol", "two connections were welcomed with one connection_id: ids must be unique",
                            {**_where(model, ev), "connection_id": connection_id, "first_given_to": first})
        return
    if not _frame_in(model, ev, frame) or frame is None or frame.type == "error":
        return
    req = model.reqs.get(frame.re or "")
    if req is None or req.conn != ev.conn or req.type.startswith("raw:"):
        return
    data = frame.data
    where = {**_where(model, ev), "request": req.req_id, "frame": frame.raw}
    asked = req.fields.get("thread_id")
    if isinstance(asked, str) and isinstance(data.get("thread_id"), str) and data["thread_id"] != asked:
        yield Violation("protocol", f"a {req.type} request for one thread was answered with {frame.type!r} of another",
                        {**where, "asked": asked, "answered": data["thread_id"]})
    mid = data.get("message_id")
    if frame.type in ("ack", "agent_response") and isinstance(mid, str) and mid in model.msgs:
        yield Violation("protocol", f"{frame.type} names a message id the service gave before: ids must be unique",
                        {**where, "message_id": mid, "first_given_by": model.msgs[mid].req_id})
    if frame.type == "agent_started":
        thread = data.get("thread_id")
        if isinstance(thread, str) and thread in model.threads:
            yield Violation("protocol", "start_agent answered with a thread the service had already opened, not a new one",
                            {**where, "thread_id": thread})
        name, assistant_id = req.fields.get("assistant"), data.get("assistant_id")
        tenant = model.tenant_of(req.conn)
        known = model.assistants.get((tenant, name)) if isinstance(name, str) else None
        if isinstance(assistant_id, str) and known is not None and known != assistant_id:
            yield Violation("protocol", f"assistant {name!r} of one tenant was given two assistant ids: start_agent "
                                        "must find the tenant's assistant of that name",
                            {**where, "first": known, "now": assistant_id})
        other = next((n for (t, n), a in model.assistants.items() if t == tenant and a == assistant_id and n != name), None)
        if isinstance(assistant_id, str) and other is not None:
            yield Violation("protocol", f"assistants {other!r} and {name!r} of one tenant were given the same id",
                            {**where, "assistant_id": assistant_id})
    if frame.type == "threads" and isinstance(data.get("threads"), list):
        for item in data["threads"]:
            state = model.threads.get(item.get("thread_id")) if isinstance(item, dict) else None
            if state is not None and isinstance(item.get("assistant"), str) and item["assistant"] != state.assistant:
                yield Violation("protocol", "list_threads names another assistant than the thread was started with",
                                {**where, "thread_id": state.thread_id, "started_with": state.assistant,
                                 "listed": item["assistant"]})
                return


@register("protocol")
def right_outcome(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """Each request gets the outcome the protocol prescribes: success, or the right error code."""
    if ev.kind not in ("ok", "fail") or ev.op == "connect":
        return
    req = model.reqs.get(ev.req_id or "")
    if req is None or req.outcome is not None:
        return
    got = "ok" if ev.kind == "ok" else (frame.data.get("code") if frame is not None else "error")
    if got == "rate_limited":
        # Legitimate only past the service's allowance of requests in flight (v1: at least 64).
        allowed = model.adapter.limits.max_in_flight
        if req.in_flight <= allowed:
            yield Violation("protocol", f"{req.type} got rate_limited with {req.in_flight} requests in flight on its "
                                        f"connection; the protocol allows it only past {allowed}",
                            {**_where(model, ev), "request": req.req_id, "in_flight": req.in_flight,
                             "allowed": allowed, "frame": frame.raw if frame is not None else None})
        return
    if got not in req.accepts:
        yield Violation("protocol", f"{req.type} got {got!r}; the protocol requires {' or '.join(sorted(req.accepts))}",
                        {**_where(model, ev), "request": req.req_id,
                         "fields": {k: (v if not isinstance(v, str) or len(v) < 100 else f"<{len(v.encode('utf-8', 'surrogatepass'))} bytes>") for k, v in req.fields.items()},
                         "frame": frame.raw if frame is not None else None})


@register("protocol")
def oversize_closes_1009(model: Model, ev: Event, frame: Frame | None) -> Iterator[Violation]:
    """A client message over the frame limit gets too_large and a close with code 1009, in time,
    and nothing sent after it is answered."""
    if _frame_in(model, ev, frame) and frame is not None and frame.re in model.reqs:
        conn, req = model.conns[ev.conn or ""], model.reqs[frame.re or ""]
        if (conn.closing_1009 and conn.closing_seq is not None and req.conn == ev.conn and req.seq > conn.closing_seq
                and not req.type.startswith("raw:")):
            yield Violation("protocol", f"the server answered a {req.type} sent after an oversized frame: after "
                                        "too_large it must close the connection (1009), not go on serving it",
                            {**_where(model, ev), "request": req.req_id, "frame": frame.raw})
    elif ev.kind == "info" and ev.op == "not_closed" and ev.conn in model.conns and model.conns[ev.conn].closing_1009:
        yield Violation("protocol", f"the server kept the connection open {ev.data.get('waited_s')} s after an oversized "
                                    "frame; it must close it with 1009",
                        {**_where(model, ev), "limit_s": ev.data.get("limit_s")})
    elif ev.kind == "info" and ev.op == "closed" and ev.conn in model.conns:
        conn = model.conns[ev.conn]
        closed_by_server = str(ev.data.get("reason", "")).startswith("closed by the server")
        if conn.closing_1009 and closed_by_server and ev.data.get("code") == 1009 and not conn.too_large_seen:
            yield Violation("protocol", "after an oversized frame the server closed with 1009 without the too_large "
                                        "error first", {**_where(model, ev), "close": dict(ev.data)})
        shut_down = ev.data.get("code") == 1001 and model.shut_down_under(ev.conn)  # type: ignore[arg-type]
        if conn.closing_1009 and closed_by_server and ev.data.get("code") != 1009 and not shut_down:
            yield Violation("protocol", f"after an oversized frame the server closed with {ev.data.get('code')!r}, not 1009",
                            {**_where(model, ev), "close": dict(ev.data)})
