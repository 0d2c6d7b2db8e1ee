"""What the suite knows about the server's state, folded from the history.

The model is the client's view of the service's protocol: which connection
belongs to which tenant and user, who owns each thread and who may receive its
fan-out (as the adapter's ``semantics`` declare: threads shared in the tenant
or private to their user; fan-out to joined connections, to the owner's other
connections, or to nobody), which threads each connection has joined (as time intervals),
which messages were acked and which replies were sent, and which tenant owns
every marker and server id. The invariants in `partywall_props.invariants` read it
before each event is applied; `apply` then takes the event in.

Everything here comes from recorded events, never from the driver's private
state, so a replayed history is checked the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import attrs

from partywall.adapter import Adapter, Frame
from partywall.history import Event
from partywall.markers import Registry, markers_in

ID_FIELDS = ("thread_id", "message_id", "agent_id", "assistant_id", "connection_id")

_TRAILING_DIGITS = re.compile(r"(.*?)([0-9]{1,18})")


def id_number(value: str) -> tuple[str, int] | None:
    """An id's stem and its trailing digits as a number (``thread-12`` -> ``("thread-", 12)``), or
    None when it does not end in digits. Random ids almost never share a stem; counters always do."""
    match = _TRAILING_DIGITS.fullmatch(value)
    return (match.group(1), int(match.group(2))) if match else None


@attrs.define(eq=False)
class ConnState:
    name: str
    tenant: str
    user: str
    token_kind: str
    """``valid``, or a kind the server must refuse: one of partywall.tokens.BAD_TOKEN_KINDS or
    partywall.credentials.EXTRA_BAD_KINDS (no credential at all, a tampered one), or ``other_path``
    (a valid credential on another path than the service's) or ``other_path:KIND`` (a refused
    credential of KIND there)."""
    open: bool = False
    opened_t: float | None = None
    closed_t: float | None = None
    closed_by_suite: bool = False
    """Whether the suite closed it (a disconnect step, a hang-up, the end of an example)."""
    unsolicited_errors: int = 0
    """Errors without ``re`` the suite provoked (a binary frame, invalid JSON) and still expects."""
    closing_1009: bool = False
    too_large_seen: bool = False
    closing_seq: int | None = None
    """The event number of the oversized message it sent (requests after it must go unanswered)."""
    in_flight: int = 0
    """Requests sent on it and not yet finally answered (as the client sees it: never fewer than the server counts)."""


@attrs.define(eq=False)
class Req:
    req_id: str
    conn: str
    type: str
    fields: dict[str, Any]
    t: float
    seq: int
    accepts: frozenset[str]
    """Outcomes the protocol allows: ``ok`` and/or error codes."""
    step: int | None = None
    """The state-machine step that sent it: the cause of whatever goes wrong with it."""
    in_flight: int = 1
    """Its connection's requests in flight when it was sent, itself included."""
    acked: str | None = None
    ack_t: float | None = None
    chunks: dict[int, str] = attrs.field(factory=dict)
    max_seq: int = -1
    responses: int = 0
    response_t: float | None = None
    response_id: str | None = None
    """The message id of the first agent_response it got: the reply's."""
    outcome: str | None = None
    """ok, an error code, info (unknown), or None while in flight."""
    done_t: float | None = None
    startup_ms: Any = None
    """For start_agent: the server's own measure of the start, as agent_started said it."""
    expect_history: list[Msg] | None = None
    expect_threads: set[str] | None = None
    expect_counts: dict[str, int] = attrs.field(factory=dict)
    """For list_threads: the messages of each thread known committed before it was sent (a floor for message_count)."""


@attrs.define(eq=False)
class Msg:
    message_id: str
    thread_id: str
    role: str
    content: str
    user: str | None
    req_id: str
    known_t: float
    """When the suite learned it was committed (the ack, or the agent_response)."""
    invoke_t: float
    """When the request that made it was sent."""


@attrs.define(eq=False)
class ThreadState:
    thread_id: str
    tenant: str
    assistant: str
    owner: str
    """The user who opened it."""
    asked_t: float = 0.0
    """When its start_agent was sent."""
    started_t: float = 0.0
    """When its agent_started arrived."""
    msgs: list[Msg] = attrs.field(factory=list)
    """Committed messages the suite knows of, in the order it learned of them."""


@attrs.define
class Membership:
    start: float
    end: float | None = None
    sure: float | None = None
    """When the server's answer (joined, agent_started) to the span's latest join came: a turn
    asked for after it certainly began with this connection joined. None while a join is unanswered."""
    leave_sent: float | None = None
    """When the connection first asked to leave during this span (the server may act on it any time after)."""


@attrs.define(frozen=True)
class OwedCopy:
    """A watcher's copy of an answered turn that has not (wholly) arrived."""

    conn: str
    req: Req
    missing: tuple[str, ...]
    """The fan-out frames not received: ``thread_message``, ``agent_response``."""
    due: float
    """When it is late: ``timing.fanout_lag_ms`` after the requester's own agent_response (or, where
    the requester hung up, after the history read that showed the reply stored)."""


@attrs.define(eq=False)
class FanoutTurn:
    """What a watching connection has received of the turn it is watching."""

    started: bool = True
    """Whether the watcher received the turn's thread_message (its start) first."""
    seqs: set[int] = attrs.field(factory=set)
    deltas: dict[int, str] = attrs.field(factory=dict)
    message_id: str | None = None
    """The user message its thread_message carried."""


class Model:
    """The suite's view of the server, updated event by event."""

    def __init__(self, registry: Registry | None = None, limits: dict[str, Any] | None = None,
                 adapter: Adapter | None = None) -> None:
        self.adapter = adapter if adapter is not None else Adapter()
        """The service's adapter: which frames answer a request, and its id and content limits."""
        self.semantics = self.adapter.semantics
        self.user_scoped = self.semantics.thread_scope == "user"
        """Threads private to the user who opened them: the isolation boundary is the user."""
        self.registry = registry if registry is not None else Registry()
        self.limits: dict[str, Any] = dict(limits or {})
        """Per-operation time limits in ms ([tool.partywall.timing])."""
        self.conns: dict[str, ConnState] = {}
        self.users: dict[str, set[str]] = {}
        """Users each tenant has authenticated as (valid tokens only)."""
        self.reqs: dict[str, Req] = {}
        self.threads: dict[str, ThreadState] = {}
        self.msgs: dict[str, Msg] = {}
        self.members: dict[tuple[str, str], list[Membership]] = {}
        self.fanout: dict[tuple[str, str], FanoutTurn] = {}
        self.fanout_responses: set[tuple[str, str]] = set()
        self.fanout_msgs: set[tuple[str, str]] = set()
        """(connection, message id) of every fan-out copy (thread_message, agent_response) it received."""
        self.own_msgs: set[tuple[str, str]] = set()
        """(connection, message id) of every ack and agent_response it received for its own requests."""
        self.replies_stored: dict[str, float] = {}
        """user message id -> when a history read first showed a reply stored after it."""
        self.fanout_replied: set[tuple[str, str]] = set()
        """(connection, user message id) of every watched turn whose agent_response came."""
        self.copies_reported: set[tuple[str, str]] = set()
        """(connection, request id) of every watcher's copy already reported missing."""
        self.assistants: dict[tuple[str, str], str] = {}
        """(tenant, assistant name) -> the assistant_id the service gave it."""
        self.probes: dict[str, dict[str, Any]] = {}
        """req_id -> the probe it belongs to (foreign id vs nonexistent id)."""
        self.probe_replies: dict[str, dict[str, Any]] = {}
        self.crashes = 0
        self.crash_t: float | None = None
        """When the suite last killed the server (its connections were closed by that)."""
        self.shutdown_t: float | None = None
        """When the suite last stopped the server gently (SIGTERM: a shutdown), None if never."""
        self.connection_ids: dict[str, str] = {}
        """connection_id of a welcome -> the connection it welcomed."""
        self.wall_offset: float | None = None
        """The client's wall clock minus ``time.monotonic()``, from the last connect: server times
        (Unix seconds) are compared with event times through it."""
        self.turn_reqs: dict[str, list[Req]] = {}
        """thread id -> the user_message requests sent to it, in order."""
        self.response_contents: dict[str, str] = {}
        """reply message id -> the content of the first copy of its agent_response received (own or fan-out)."""
        self.id_numbers: dict[tuple[str, str], dict[int, str]] = {}
        """(id field, the text before an id's trailing digits) -> those digits as a number -> the id:
        ids that count up share a stem."""
        self.samples: dict[str, list[float]] = {}
        """Latencies in ms per operation, for the timing percentiles."""

    # -- queries the invariants use ----------------------------------------

    def tenant_of(self, conn: str) -> str:
        return self.conns[conn].tenant

    def party_of(self, conn: str) -> tuple[str, str | None]:
        """The isolation boundary a connection is on: its tenant, and its user where threads are private."""
        state = self.conns[conn]
        return state.tenant, state.user if self.user_scoped else None

    def party_label(self, party: tuple[str, str | None]) -> str:
        tenant, user = party
        return f"tenant {tenant!r}" if user is None else f"user {user!r} of tenant {tenant!r}"

    def thread_party(self, thread: ThreadState) -> tuple[str, str | None]:
        return thread.tenant, thread.owner if self.user_scoped else None

    def claim(self, token: str, conn: str, what: str, origin: str) -> None:
        tenant, user = self.party_of(conn)
        self.registry.claim(token, tenant, what, origin, user)

    def receives_fanout(self, conn: str, thread: str, t: float) -> bool:
        """Whether the declared fan-out rule lets a turn of ``thread`` reach ``conn`` at ``t``."""
        rule = self.semantics.fanout
        if rule == "joined":
            return self.is_member(conn, thread, t)
        state = self.threads.get(thread)
        if rule == "requester" or state is None:
            return False
        mine = self.conns[conn]
        return mine.tenant == state.tenant and mine.user == state.owner

    def owed_copies(self) -> list[OwedCopy]:
        """The watchers' copies of answered turns that have not wholly arrived (and were not reported).

        Owed only where no timing makes it optional: the turn's requester got its agent_response,
        and the watcher (another connection, valid and open now, owing no close) was certainly
        receiving the thread's fan-out when the message was sent and has been since. Where fan-out
        goes to joined connections: joined by an answer that came before the message went, with no
        leave asked since. Where it goes to the owner's other connections: the owner's, open before
        the message went. (A copy's chunks are checked as its agent_response arrives.)"""
        rule = self.semantics.fanout
        if rule == "requester":
            return []
        lag = float(self.limits.get("fanout_lag_ms", 1000)) / 1000.0
        owed: list[OwedCopy] = []
        for thread, reqs in self.turn_reqs.items():
            state = self.threads.get(thread)
            # Answered turns, and turns whose requester hung up after the ack once a history read
            # shows their reply stored: those finish all the same, and their watchers get them whole.
            answered = [r for r in reqs if r.acked is not None and (
                r.response_id is not None or r.acked in self.replies_stored and self._hung_up(r))]
            if state is None or not answered:
                continue
            watchers: list[tuple[str, float]]
            if rule == "joined":
                watchers = [(c, spans[-1].sure) for (c, t), spans in self.members.items()
                            if t == thread and spans and spans[-1].end is None and spans[-1].leave_sent is None
                            and spans[-1].sure is not None]
            else:
                watchers = [(name, c.opened_t) for name, c in self.conns.items()
                            if c.tenant == state.tenant and c.user == state.owner and c.opened_t is not None]
            for conn, since in watchers:
                mine = self.conns.get(conn)
                if mine is None or not mine.open or mine.closing_1009 or mine.token_kind != "valid":
                    continue
                for req in answered:
                    if req.conn == conn or since > req.t or (conn, req.req_id) in self.copies_reported:
                        continue
                    missing = tuple(kind for kind, seen in (
                        ("thread_message", (conn, req.acked) in self.fanout_msgs),
                        ("agent_response", (conn, req.response_id) in self.fanout_msgs if req.response_id is not None
                         else (conn, req.acked) in self.fanout_replied)) if not seen)
                    if missing:
                        ended = req.response_t if req.response_t is not None else self.replies_stored[str(req.acked)]
                        owed.append(OwedCopy(conn, req, missing, ended + lag))
        return owed

    def _hung_up(self, req: Req) -> bool:
        """Whether the requester's connection closed, by the suite's hand, before its reply came
        (the turn still finishes; a connection the server closed or a crash took may mean it did not)."""
        state = self.conns.get(req.conn)
        return (state is not None and state.closed_by_suite and state.closed_t is not None and req.ack_t is not None
                and state.closed_t >= req.ack_t and not self.killed_under(req.conn))

    def is_member(self, conn: str, thread: str, t: float) -> bool:
        return any(m.start <= t and (m.end is None or t <= m.end) for m in self.members.get((conn, thread), ()))

    def joined_now(self, conn: str, thread: str) -> bool:
        spans = self.members.get((conn, thread))
        return bool(spans) and spans[-1].end is None

    def ids_in(self, data: Any) -> Iterator[tuple[str, str]]:
        """Every (field, server id) in a frame, nested lists included."""
        if isinstance(data, dict):
            for k, v in data.items():
                if k in ID_FIELDS and isinstance(v, str):
                    yield k, v
                elif isinstance(v, (list, dict)):
                    yield from self.ids_in(v)
        elif isinstance(data, list):
            for item in data:
                yield from self.ids_in(item)

    def users_in(self, data: Any) -> Iterator[str]:
        if isinstance(data, dict):
            if data.get("type") == "thread_message" and isinstance(data.get("user"), str):
                yield data["user"]
            for item in data.get("messages", []) if isinstance(data.get("messages"), list) else []:
                if isinstance(item, dict) and isinstance(item.get("user"), str):
                    yield item["user"]

    def accepts_for(self, conn: str, req_type: str, fields: dict[str, Any]) -> frozenset[str]:
        """The outcomes the protocol allows for a request, from what the suite knows now."""
        outcomes: set[str] = set()
        thread = fields.get("thread_id")
        if req_type == "start_agent":
            bad = not self.adapter.valid_id(fields.get("assistant")) or (
                "instructions" in fields and not isinstance(fields["instructions"], str)
            )
            return frozenset({"bad_request"} if bad else {"ok"})
        if req_type == "ping" or req_type == "list_threads":
            return frozenset({"ok"})
        if req_type not in ("join_thread", "leave_thread", "user_message", "get_history"):
            return frozenset({"bad_request"})
        if not isinstance(thread, str):
            return frozenset({"bad_request"})
        state = self.threads.get(thread)
        exists = state is not None and self.thread_party(state) == self.party_of(conn)
        if req_type == "get_history" and "limit" in fields:
            lim = fields["limit"]
            if not (isinstance(lim, int) and not isinstance(lim, bool) and lim >= 1):
                outcomes.add("bad_request")
        if req_type == "user_message":
            content = fields.get("content")
            if not isinstance(content, str) or len(content.encode("utf-8", "surrogatepass")) > self.adapter.limits.max_content:
                outcomes.add("bad_request")
        if not exists:
            if outcomes:
                outcomes.add("not_found")  # which check comes first is the server's choice
                return frozenset(outcomes)
            return frozenset({"not_found"})
        if req_type == "user_message" and not outcomes:
            if self.semantics.fanout != "joined" or self.joined_now(conn, thread):
                outcomes.add("ok")
            else:
                outcomes.add("bad_request")
            if self._membership_in_flight(conn, thread):
                # A join or leave of this thread sent just before, still unanswered: the server
                # may take either first, so the message may find the connection joined or not.
                outcomes |= {"ok", "bad_request"}
        if not outcomes:
            outcomes.add("ok")
        return frozenset(outcomes)

    def _membership_in_flight(self, conn: str, thread: str) -> bool:
        return any(r.conn == conn and r.outcome is None and r.type in ("join_thread", "leave_thread")
                   and r.fields.get("thread_id") == thread for r in self.reqs.values())

    def expected_history(self, thread: str, before: float) -> list[Msg]:
        state = self.threads.get(thread)
        return [m for m in state.msgs if m.known_t < before] if state else []

    # -- applying events --------------------------------------------------------

    def apply(self, ev: Event, frame: Frame | None) -> None:
        handler = getattr(self, f"_on_{ev.kind}", None)
        if handler is not None:
            handler(ev, frame)

    def _on_invoke(self, ev: Event, frame: Frame | None) -> None:
        if ev.op == "connect":
            d = ev.data
            self.conns[ev.conn] = ConnState(ev.conn, d["tenant"], d["user"], d.get("token_kind", "valid"))
            return
        if ev.conn is None or ev.conn not in self.conns:
            return
        if ev.op == "raw":
            conn = self.conns[ev.conn]
            if ev.data.get("expect") == "too_large":
                conn.closing_1009 = True
                conn.closing_seq = ev.seq
            if ev.data.get("readable") is not True:
                conn.unsolicited_errors += 1
            if ev.req_id is not None:
                # Counted in flight too: a server may count a malformed request until it answers it.
                conn.in_flight += 1
                self.reqs[ev.req_id] = Req(ev.req_id, ev.conn, "raw:" + str(ev.data.get("note")), {}, ev.t, ev.seq,
                                           frozenset({str(ev.data.get("expect"))}), ev.step, in_flight=conn.in_flight)
            return
        if ev.req_id is None:
            return
        fields = dict(ev.data)
        self.conns[ev.conn].in_flight += 1
        req = Req(ev.req_id, ev.conn, ev.op, fields, ev.t, ev.seq, self.accepts_for(ev.conn, ev.op, fields), ev.step,
                  in_flight=self.conns[ev.conn].in_flight)
        for marker in markers_in(str(fields.get("content", ""))):
            self.claim(marker, ev.conn, "marker", f"{ev.conn} request {ev.req_id}")
        if ev.op == "get_history" and isinstance(fields.get("thread_id"), str):
            req.expect_history = self.expected_history(fields["thread_id"], ev.t)
        if ev.op == "list_threads":
            # Only what this model saw the tenant start must be listed. A provisioned tenant
            # (--identities) also lists threads of earlier examples and runs: those are its own,
            # never another tenant's (their ids are attributed to the tenant that lists them).
            party = self.party_of(ev.conn)
            req.expect_threads = {t for t, s in self.threads.items() if self.thread_party(s) == party}
            req.expect_counts = {t: len(self.expected_history(t, ev.t)) for t in req.expect_threads}
        if ev.op == "user_message" and isinstance(fields.get("thread_id"), str):
            self.turn_reqs.setdefault(fields["thread_id"], []).append(req)
        if ev.op == "join_thread" and "ok" in req.accepts:
            spans = self.members.get((ev.conn, fields["thread_id"]))
            if spans and spans[-1].end is None:
                # Joining again while joined: a server may take it as a fresh join, from its next
                # turn on, so which turns this span surely saw whole is known again at the answer.
                spans[-1].sure = None
            self._join(ev.conn, fields["thread_id"], ev.t)
        if ev.op == "leave_thread" and isinstance(fields.get("thread_id"), str):
            spans = self.members.get((ev.conn, fields["thread_id"]))
            if spans and spans[-1].end is None and spans[-1].leave_sent is None:
                spans[-1].leave_sent = ev.t
        self.reqs[ev.req_id] = req

    def killed_under(self, conn: str) -> bool:
        """Whether the suite killed or stopped the server while ``conn`` was open (its close is the suite's doing)."""
        state = self.conns[conn]
        return self.crash_t is not None and state.opened_t is not None and state.opened_t <= self.crash_t

    def shut_down_under(self, conn: str) -> bool:
        """Whether the suite's last end of the server was a shutdown (not a kill) while ``conn`` was open."""
        return self.shutdown_t is not None and self.shutdown_t == self.crash_t and self.killed_under(conn)

    def wall(self, t: float) -> float | None:
        """The client's wall clock at event time ``t``, when a connect recorded it."""
        return None if self.wall_offset is None else t + self.wall_offset

    def _join(self, conn: str, thread: str, t: float, sure: float | None = None) -> None:
        spans = self.members.setdefault((conn, thread), [])
        if not spans or spans[-1].end is not None:
            spans.append(Membership(t))
        if sure is not None:
            spans[-1].sure = sure

    def _leave(self, conn: str, thread: str, t: float) -> None:
        spans = self.members.get((conn, thread))
        if spans and spans[-1].end is None:
            spans[-1].end = t
        self.fanout.pop((conn, thread), None)  # leaving stops a watcher's turn part-way

    def _on_frame(self, ev: Event, frame: Frame | None) -> None:
        if frame is None or ev.conn not in self.conns:
            return
        conn = self.conns[ev.conn]
        for field, value in self.ids_in(frame.data):
            self.claim(value, ev.conn, field, f"{ev.conn} frame #{ev.seq}")
            counted = id_number(value)
            if counted is not None:
                self.id_numbers.setdefault((field, counted[0]), {}).setdefault(counted[1], value)
        data = frame.data
        ftype = frame.type
        if ftype == "error" and frame.re is None and conn.unsolicited_errors:
            conn.unsolicited_errors -= 1
        if ftype == "error" and data.get("code") == "too_large":
            conn.too_large_seen = True
        if frame.re in self.probes:
            self.probe_replies[frame.re] = dict(data)
        if ftype == "agent_response" and isinstance(data.get("message_id"), str) and isinstance(data.get("content"), str):
            self.response_contents.setdefault(data["message_id"], data["content"])
        req = self.reqs.get(frame.re) if frame.re is not None else None
        if req is not None and req.conn == ev.conn:
            self._on_reply(req, ev, frame)
            return
        if frame.re is None and isinstance(data.get("thread_id"), str):
            key = (ev.conn, data["thread_id"])
            # A watcher's turn opens with the thread_message and closes with the agent_response
            # (or its leaving): chunks outside one are part of a turn it did not see begin.
            if ftype == "thread_message":
                mid = data.get("message_id")
                self.fanout[key] = FanoutTurn(message_id=mid if isinstance(mid, str) else None)
            elif ftype == "agent_chunk" and isinstance(data.get("seq"), int):
                turn = self.fanout.setdefault(key, FanoutTurn(started=False))
                turn.seqs.add(data["seq"])
                turn.deltas[data["seq"]] = str(data.get("delta"))
            elif ftype == "agent_response":
                ended = self.fanout.pop(key, None)
                if ended is not None and ended.message_id is not None:
                    self.fanout_replied.add((ev.conn, ended.message_id))
                if isinstance(data.get("message_id"), str):
                    self.fanout_responses.add((ev.conn, data["message_id"]))
            if ftype in ("thread_message", "agent_response") and isinstance(data.get("message_id"), str):
                self.fanout_msgs.add((ev.conn, data["message_id"]))

    def _on_reply(self, req: Req, ev: Event, frame: Frame) -> None:
        data = frame.data
        ftype = frame.type
        if ftype in ("ack", "agent_response") and isinstance(data.get("message_id"), str):
            self.own_msgs.add((req.conn, data["message_id"]))
        if ftype == "history" and isinstance(data.get("messages"), list):
            msgs = [m for m in data["messages"] if isinstance(m, dict)]
            for m, after in zip(msgs, msgs[1:], strict=False):
                if m.get("role") == "user" and after.get("role") == "assistant" and isinstance(m.get("message_id"), str):
                    self.replies_stored.setdefault(m["message_id"], ev.t)
        tenant = self.tenant_of(req.conn)
        if ftype == "agent_started":
            thread = data.get("thread_id")
            name, assistant_id = req.fields.get("assistant"), data.get("assistant_id")
            if isinstance(name, str) and isinstance(assistant_id, str):
                self.assistants.setdefault((tenant, name), assistant_id)
            req.startup_ms = data.get("startup_ms")
            if isinstance(thread, str):
                self.threads.setdefault(thread, ThreadState(thread, tenant, str(req.fields.get("assistant")),
                                                            self.conns[req.conn].user, req.t, ev.t))
                self._join(req.conn, thread, req.t, sure=ev.t)
        elif ftype == "left" and isinstance(data.get("thread_id"), str):
            self._leave(req.conn, data["thread_id"], ev.t)
        elif ftype == "joined" and isinstance(data.get("thread_id"), str):
            # A join sent while a leave of the same thread was in flight: the leave's answer closed
            # the span the join's invoke found open, and this answer opens the new one.
            self._join(req.conn, data["thread_id"], ev.t, sure=ev.t)
        elif ftype == "ack" and req.acked is None and isinstance(data.get("message_id"), str):
            req.acked = data["message_id"]
            req.ack_t = ev.t
            self.samples.setdefault("ack", []).append((ev.t - req.t) * 1000)
            thread = str(req.fields.get("thread_id"))
            msg = Msg(req.acked, thread, "user", str(req.fields.get("content")), self.conns[req.conn].user,
                      req.req_id, ev.t, req.t)
            self.msgs[msg.message_id] = msg
            if thread in self.threads:
                self.threads[thread].msgs.append(msg)
        elif ftype == "agent_chunk" and isinstance(data.get("seq"), int):
            req.chunks.setdefault(data["seq"], str(data.get("delta")))
            req.max_seq = max(req.max_seq, data["seq"])
        elif ftype == "agent_response":
            req.responses += 1
            if req.responses == 1 and isinstance(data.get("message_id"), str):
                req.response_t = ev.t
                req.response_id = data["message_id"]
                thread = str(req.fields.get("thread_id"))
                msg = Msg(data["message_id"], thread, "assistant", str(data.get("content")), None,
                          req.req_id, ev.t, req.t)
                self.msgs[msg.message_id] = msg
                if thread in self.threads:
                    self.threads[thread].msgs.append(msg)

    def _done(self, ev: Event, outcome: str) -> None:
        req = self.reqs.get(ev.req_id) if ev.req_id else None
        if req is None or req.outcome is not None:
            return
        req.outcome = outcome
        req.done_t = ev.t
        if req.conn in self.conns:
            self.conns[req.conn].in_flight -= 1
        if outcome == "ok" and "latency_ms" in ev.data:
            self.samples.setdefault(req.type, []).append(float(ev.data["latency_ms"]))
        if req.type == "join_thread" and outcome != "ok":
            thread = req.fields.get("thread_id")
            if isinstance(thread, str):
                self._leave(req.conn, thread, ev.t)

    def _on_ok(self, ev: Event, frame: Frame | None) -> None:
        if ev.op == "connect" and isinstance(ev.data.get("wall_s"), float):
            self.wall_offset = ev.data["wall_s"] - ev.t
        if ev.op == "connect" and ev.conn in self.conns:
            conn = self.conns[ev.conn]
            connection_id = (ev.data.get("welcome") or {}).get("connection_id")
            if isinstance(connection_id, str):
                self.connection_ids.setdefault(connection_id, ev.conn)
            conn.open = True
            conn.opened_t = ev.t
            if conn.token_kind == "valid":
                self.users.setdefault(conn.tenant, set()).add(conn.user)
            self.samples.setdefault("connect", []).append(float(ev.data.get("latency_ms", 0.0)))
            return
        self._done(ev, "ok")

    def _on_fail(self, ev: Event, frame: Frame | None) -> None:
        if ev.op == "connect":
            return
        code = frame.data.get("code") if frame is not None else None
        self._done(ev, code if isinstance(code, str) else "error")

    def _on_info(self, ev: Event, frame: Frame | None) -> None:
        if ev.op == "closed" and ev.conn in self.conns:
            conn = self.conns[ev.conn]
            conn.open = False
            conn.closed_t = ev.t
            conn.closed_by_suite = str(ev.data.get("reason")) in ("closed by the suite", "abrupt drop")
            for (c, _thread), spans in self.members.items():
                if c == ev.conn and spans and spans[-1].end is None:
                    spans[-1].end = ev.t
        elif ev.op == "copy_missing" and ev.conn is not None:
            self.copies_reported.add((ev.conn, str(ev.data.get("request"))))
        elif ev.op == "probe":
            for key in ("foreign", "absent"):
                self.probes[ev.data[key]] = dict(ev.data)
        elif ev.op == "crash":
            self.crashes += 1
            self.crash_t = ev.t
            if ev.data.get("gentle"):
                # A shutdown closes with 1001; one that owed a 1009 may send either (the close
                # for too_large may come first), so closing_1009 stays.
                self.shutdown_t = ev.t
            else:
                for conn in self.conns.values():
                    conn.closing_1009 = False  # a killed server closes nothing cleanly: 1006 is all there is
        elif ev.req_id is not None and ev.op != "timeout":
            self._done(ev, "info")
