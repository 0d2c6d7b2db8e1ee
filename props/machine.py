"""The state machine: generated interleavings of tenants over real sockets.

Each example opens with a populated world (two tenants, three connections, two
threads, one of them shared); then rules cover the whole protocol: connects (header or query token, and tokens that must be refused,
a valid token on another path of the host, a token both ways at once),
clean closes and abrupt drops, agent starts, joins and leaves, messages sent
without waiting for their replies (replies stream while later steps run),
history reads with and without ``limit``, thread lists, pings, malformed
frames, bursts that fire several operations at the same instant, a settle
step, and, when the suite started the server itself, a SIGKILL and restart.

An operation that crosses tenants is a probe: it names another tenant's real
thread id and, at the same instant, an id that does not exist; the two
answers must be equal but for ``re``.

Each step is recorded (rule and arguments, bundle values by name) so a
failing program can be replayed step by step (`partywall_props.replay`).

Credentials come from the session (`partywall.credentials`): minted with the
server's secret, or from ``--token-cmd``. With ``--identities`` every example
reuses the provisioned tenants and users: the drawn tenants and user ids are
still drawn (the same program either way) and map onto the provisioned ones
cyclically, and examples are kept apart by their own threads and markers.
What those tenants held before (threads of earlier examples and runs) is
theirs: the checks ask only that what this example made is there.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
from hypothesis import currently_in_test_context
from hypothesis import event as _event
from hypothesis import note as _note
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from partywall_props.coverage import fold_example
from partywall_props.invariants import INVARIANTS
from partywall_props.model import Model, OwedCopy
from partywall_strategies import (
    CLOSING_KINDS,
    HOSTILE,
    AtLimit,
    ContentPlan,
    assistant_names,
    bad_assistant_names,
    build_content,
    closing_frames,
    contents,
    history_limits,
    resolve_id,
    tenant_bases,
    user_ids,
)

from partywall.adapter import BAD_FRAME_KINDS, OTHER_PATH_KINDS, BadFrame
from partywall.checks import Checker
from partywall.credentials import EXTRA_BAD_KINDS, user_index
from partywall.driver import Conn, Refused
from partywall.errors import HarnessError, Violation
from partywall.session import Session
from partywall.tokens import BAD_TOKEN_KINDS, other_claims

MAX_CONNS = 9
MAX_THREADS = 8
CRASH_AFTER = 12
MAX_CRASHES = 1
#: How often a rule may run in one example. Without a budget, Hypothesis spends
#: whole examples on cheap rules that need no bundle (a refused token, a bad
#: frame) and rarely reaches the messages and reads where tenants interact.
BUDGET = {"bad_token": 2, "bad_frame": 3, "bad_name": 2, "add_tenant": 2, "leave_joined": 4, "disconnect": 2,
          "settle": 3, "join_sibling": 5, "crowd": 2, "rejoin": 3, "pipeline": 1}
#: Instructions of a start_agent: none, any text, or text an attacker sends.
INSTRUCTIONS = st.one_of(st.none(), st.text(st.characters(exclude_categories=("Cs",)), max_size=60),
                         st.sampled_from(HOSTILE))


def within_budget(name: str) -> Callable[[Any], bool]:
    return lambda self: self.calls.get(name, 0) < BUDGET[name]


@attrs.frozen
class TenantRef:
    name: str
    tid: str

    def __repr__(self) -> str:
        return self.name


@attrs.frozen
class UserRef:
    name: str
    tenant: TenantRef
    uid: str

    def __repr__(self) -> str:
        return self.name


@attrs.frozen
class ThreadRef:
    name: str
    tenant: TenantRef
    thread_id: str | None
    """None when the start failed; steps then skip the thread."""
    owner: str = ""
    """The user id that opened it (on the wire)."""

    def __repr__(self) -> str:
        return self.name


@attrs.frozen
class ConnRef:
    name: str
    user: UserRef

    def __repr__(self) -> str:
        return self.name


def note(text: str) -> None:
    """Hypothesis's note, event and target, and nothing during a replay outside Hypothesis."""
    if currently_in_test_context():
        _note(text)


def event(text: str) -> None:
    if currently_in_test_context():
        _event(text)


def recorded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Record each call of a rule (name and arguments) in the machine's program."""

    @functools.wraps(fn)
    def wrapper(self: TenantMachine, **kwargs: Any) -> Any:
        self.step_no += 1
        self.session.history.step = self.step_no
        self.calls[fn.__name__] = self.calls.get(fn.__name__, 0) + 1
        entry = {"rule": fn.__name__, "args": {k: encode_arg(v) for k, v in kwargs.items()}, "then": None}
        self.program.append(entry)
        self.outcome = ""
        before = set(self.refs)
        try:
            return fn(self, **kwargs)
        finally:
            entry["then"] = self.outcome
            # The names this step made, so a replay of a program with steps removed
            # can map the old names onto the new objects.
            entry["made"] = [name for name in self.refs if name not in before]
            note(f"step {self.step_no}: {fn.__name__} -> {self.outcome}")

    return wrapper


def encode_arg(value: Any) -> Any:
    if isinstance(value, (TenantRef, UserRef, ThreadRef, ConnRef)):
        return {"ref": value.name}
    if isinstance(value, ContentPlan):
        return {"content": [value.size, value.text]}
    if isinstance(value, AtLimit):
        return {"at_limit": [value.char, value.over]}
    if isinstance(value, (list, tuple)):
        return [encode_arg(v) for v in value]
    return value


class TenantMachine(RuleBasedStateMachine):
    """Tenants connecting, starting agents and talking, all at once, over real sockets."""

    # Connections are a bundle (disconnect consumes them). Tenants and threads are
    # picked by index from the machine's own lists instead: the opening `world`
    # step makes both, and an initialize rule can fill only one bundle.
    conns = Bundle("conns")

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = s = session
        assert s.driver is not None
        self.driver = s.driver
        self.prefix = s.next_prefix()
        limits = dict(s.config["timing"])
        self.model = Model(s.registry, limits, adapter=s.adapter)
        self.checker = Checker(self.model, INVARIANTS.select(), s.history)
        self.driver.observer = self.checker
        self.program: list[dict[str, Any]] = []
        self.step_no = 0
        self.outcome = ""
        self.refs: dict[str, Any] = {}
        self.counts = {"t": 0, "c": 0, "th": 0, "x": 0}
        self.raised: Violation | None = None
        self.allow_crash = s.can_crash
        self.crashes = 0
        self.calls: dict[str, int] = {}
        self.settled_at = 0
        self.joined: dict[str, list[ThreadRef]] = {}
        """Threads each connection has joined, by the program's own account (its intent, not the server's)."""
        self.tenant_threads: dict[str, list[ThreadRef]] = {}
        self.tenant_list: list[TenantRef] = []
        self.thread_list: list[ThreadRef] = []
        self.user_scoped = s.adapter.semantics.thread_scope == "user"
        """Threads private to their user (the adapter's semantics): another user's thread is a probe."""
        self.identities = s.identities
        """Pre-provisioned tenants and users (--identities): every example reuses them."""
        self.harness_error: HarnessError | None = None
        """A credential that could not be had (a failing --token-cmd): the example stops, and so does the run."""
        if "both" not in s.adapter.credential_ways:
            s.not_run_check("credential both ways", f"the {s.adapter.name} adapter declares no way to send a "
                                                    "credential both ways at once, so which one counts is not checked")

    # -- helpers ------------------------------------------------------------------

    def has(self, operation: str) -> bool:
        """Whether the service has ``operation`` (its adapter says; fixed for the whole run)."""
        return operation in self.session.adapter.operations

    def _name(self, kind: str) -> str:
        n = self.counts[kind]
        self.counts[kind] += 1
        return f"{kind}{n}"

    def _keep(self, obj: Any) -> Any:
        self.refs[obj.name] = obj
        return obj

    def _crosses(self, conn: ConnRef, thread: ThreadRef) -> bool:
        """Whether ``thread`` is beyond ``conn``'s boundary: another tenant's, or, where threads are
        private to their user (the adapter's semantics), another user's of the same tenant."""
        if conn.user.tenant.tid != thread.tenant.tid:
            return True
        return self.user_scoped and conn.user.uid != thread.owner

    def _talkable(self, conn: ConnRef) -> list[ThreadRef]:
        """Threads ``conn`` may send in: those it joined, where fan-out goes to joined connections;
        otherwise every started thread on its side of the boundary, in start order."""
        if self.session.adapter.semantics.fanout == "joined":
            return self.joined.get(conn.name, [])
        return [t for t in self.thread_list if t.thread_id is not None and not self._crosses(conn, t)]

    def _id(self, value: str | AtLimit) -> str:
        return resolve_id(value, self.session.adapter.limits.max_id)

    def _tenant(self, i: int) -> TenantRef:
        return self.tenant_list[i % len(self.tenant_list)]

    def _thread(self, i: int) -> ThreadRef | None:
        if not self.thread_list:
            self.outcome = "no thread yet"
            return None
        return self.thread_list[i % len(self.thread_list)]

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.driver.call(fn, *args)

    def _open(self, conn: ConnRef, thread: ThreadRef | None = None) -> bool:
        if thread is not None and thread.thread_id is None:
            self.outcome = f"{thread.name} never started"
            return False
        c = self.driver.conns.get(conn.name)
        if not (c and c.open):
            self.outcome = f"{conn.name} is closed"
            return False
        return True

    def _fire(self, conn: ConnRef, req_type: str, fields: dict[str, Any], t: float | None = None) -> Any:
        return self._call(self.driver.send, conn.name, req_type, self.session.next_req_id(), fields, t)

    def _marker_content(self, plan: ContentPlan) -> str:
        return build_content(plan, self.session.mint.next(), self.session.adapter.limits.max_content)

    def _absent_thread_id(self, like: str) -> str:
        # Same length and alphabet as a real id, so only existence differs.
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
        return "".join(secrets.choice(alphabet) for _ in like) or "x"

    def _probe(self, conn: ConnRef, req_type: str, thread: ThreadRef, fields: dict[str, Any]) -> None:
        """Name a real thread beyond the boundary and a nonexistent one at the same instant."""
        absent_id = self._absent_thread_id(thread.thread_id)
        foreign, absent = self.session.next_req_id(), self.session.next_req_id()
        whose = "another tenant" if conn.user.tenant.tid != thread.tenant.tid else "another user"

        async def both() -> None:
            await self.driver.note("probe", conn.name, {"foreign": foreign, "absent": absent, "request": req_type,
                                                        "thread": thread.name, "owner_tenant": thread.tenant.tid,
                                                        "owner_user": thread.owner, "whose": whose})
            t = time.monotonic()
            async with trio.open_nursery() as n:
                n.start_soon(self.driver.send, conn.name, req_type, foreign, {**fields, "thread_id": thread.thread_id}, t)
                n.start_soon(self.driver.send, conn.name, req_type, absent, {**fields, "thread_id": absent_id}, t)

        self._call(both)
        event(f"probe {req_type} across {'tenants' if whose == 'another tenant' else 'users'}")
        self.outcome = f"probed {thread.name} of {thread.tenant.name}/{thread.owner!r} from {conn.name}"

    # -- tenants and users --------------------------------------------------------

    @initialize(target=conns, first=tenant_bases(), second=tenant_bases(), via=st.sampled_from(["header", "query"]))
    @recorded
    def world(self, first: str, second: str, via: str) -> MultipleResults[ConnRef]:
        """Every example starts populated: two tenants of its own (often near-identical ids),
        the user ``alice`` in both and ``bob`` in the first, and ``alice`` of the first on a
        second device (the other way of sending the credential); each tenant's first user
        starts an agent, and the second user and the second device join that thread.

        Two equal bases: where threads are shared in the tenant (protocol v1), the second tenant's
        id is the first's in the other case (`acme`, `ACME`), two tenants a careless comparison
        takes for one; where threads are private to their user, one tenant, whose boundaries
        between users the opening's users then all stand on."""
        if second == first and not self.user_scoped:
            second = first.swapcase() if first.swapcase() != first else first + "-2"
        for base in (first, second):
            self._add_tenant(base)
        t0, t1 = self.tenant_list[0], self.tenant_list[-1]
        c0 = self._connect(t0, "alice", via)
        c1 = self._connect(t0, "bob", via)
        c2 = self._connect(t1, "alice", via)
        c3 = self._connect(t0, "alice", "query" if via == "header" else "header")
        # The opening is deliberately plain: user ids a careless server cannot mangle, one
        # start after the other, under assistant names of this example's own. Tricky ids,
        # concurrency and names shared across tenants come from generated steps
        # (`connect`, `burst`, `start_agent`), so a failure they cause shrinks to the
        # generated step that caused it, never to this fixed opening alone.
        th0 = self._start(c0, self.prefix + "helper")
        self._start(c2, self.prefix + "helper2")
        if self.has("join_thread"):
            for member in (c1, c3):
                if self._open(member, th0):
                    self._join(member, th0)
        joined = "th0 (c0, c1, c3)" if self.has("join_thread") else "th0 (c0)"
        self.outcome = (f"tenants {t0.tid!r} and {t1.tid!r}; c0, c1, c3 (alice again) in {t0.name}, c2 in "
                        f"{t1.name}; {joined}, th1 (c2)")
        return multiple(c0, c1, c2, c3)

    def _add_tenant(self, base: str) -> TenantRef:
        if self.identities is not None:
            # Provisioned tenants, cyclically. ``base`` is drawn all the same, so a program has
            # the same draws with identities or without; examples are kept apart by their own
            # threads and markers instead of their own tenant ids.
            tid = self.identities.tenant_at(len(self.tenant_list)).id
        else:
            tid = (self.prefix + base)[:64]
        ref = self._keep(TenantRef(self._name("t"), tid))
        self.tenant_list.append(ref)
        return ref

    @precondition(within_budget("add_tenant"))
    @rule(base=tenant_bases())
    @recorded
    def add_tenant(self, base: str) -> None:
        ref = self._add_tenant(base)
        self.outcome = f"tenant {ref.name} {ref.tid!r}"

    # -- connections ---------------------------------------------------------------

    @precondition(lambda self: self.counts["c"] < MAX_CONNS)
    @rule(target=conns, tenant=st.integers(0, 3), uid=user_ids(), via=st.sampled_from(["header", "query"]))
    @recorded
    def connect(self, tenant: int, uid: str | AtLimit, via: str) -> ConnRef:
        """Connect as user ``uid`` of a tenant (common ids recur, so tenants share user names)."""
        return self._connect(self._tenant(tenant), self._id(uid), via)

    def _user_id(self, tenant: TenantRef, uid: str) -> str:
        """The user id on the wire for a drawn one: itself, or with identities a provisioned user
        of the tenant (``alice`` the first, ``bob`` the second, any other by its text, cyclically)."""
        if self.identities is None:
            return uid
        return self.identities.user_at(tenant.tid, user_index(uid))

    def _credential(self, tid: str, uid: str, kind: str = "valid") -> str:
        """The credential for ``uid`` of ``tid`` (a refused one unless ``kind`` is valid), from the session's source."""
        creds = self.session.credentials
        try:
            return creds.for_identity(tid, uid) if kind == "valid" else creds.bad(kind, tid, uid)
        except HarnessError as exc:
            self.harness_error = exc
            raise

    def _connect(self, tenant: TenantRef, uid: str, via: str) -> ConnRef:
        user = UserRef(uid, tenant, self._user_id(tenant, uid))
        name = self._name("c")
        token = self._credential(user.tenant.tid, user.uid)
        result = self._call(self.driver.connect, name, user.tenant.tid, user.uid, token, via)
        if isinstance(result, Refused):
            self.outcome = f"{name} refused: {result.reason}"
            self.checker.record(Violation("liveness", f"a valid token was refused at the handshake ({result.reason})",
                                          {"connection": name, "tenant": user.tenant.tid, "user": user.uid, "via": via},
                                          check="valid_token_accepted"))
            # The ref still goes in the bundle (a closed connection): what a bundle holds
            # must not depend on the server's answers, or Hypothesis cannot replay a choice.
            return self._keep(ConnRef(name, user))
        self.outcome = f"{name} open as {user.tenant.name}/{user.uid!r} via {via}"
        event(f"connect via {via}")
        return self._keep(ConnRef(name, user))

    @precondition(lambda self: self.counts["c"] <= MAX_CONNS - 4 and self.counts["th"] <= MAX_THREADS - 4
                  and within_budget("crowd")(self))
    @rule(target=conns, members=st.lists(st.tuples(st.integers(0, 3), user_ids()), min_size=2, max_size=4),
          via=st.sampled_from(["header", "query"]), assistant=assistant_names())
    @recorded
    def crowd(self, members: list[tuple[int, str | AtLimit]], via: str, assistant: str | AtLimit) -> MultipleResults[ConnRef]:
        """Users arrive at one instant, as 100 users do at nine in the morning: they connect at
        once, and each starts an agent and lists its threads the moment its welcome arrives, all
        at once, then says hello to its agent, all at once."""
        users = [UserRef(self._id(uid), self._tenant(t), self._user_id(self._tenant(t), self._id(uid))) for t, uid in members]
        names = [self._name("c") for _ in users]
        tokens = [self._credential(u.tenant.tid, u.uid) for u in users]

        async def arrive() -> list[Conn | Refused]:
            results: list[Conn | Refused | None] = [None] * len(users)

            async def one(i: int) -> None:
                results[i] = await self.driver.connect(names[i], users[i].tenant.tid, users[i].uid, tokens[i], via)

            async with trio.open_nursery() as n:
                for i in range(len(users)):
                    n.start_soon(one, i)
            return results  # type: ignore[return-value]

        results = self._call(arrive)
        refs = []
        for name, user, result in zip(names, users, results, strict=True):
            if isinstance(result, Refused):
                self.checker.record(Violation("liveness", f"a valid token was refused at the handshake ({result.reason})",
                                              {"connection": name, "tenant": user.tenant.tid, "user": user.uid, "via": via},
                                              check="valid_token_accepted"))
            refs.append(self._keep(ConnRef(name, user)))
        threads = self._start_together([(ref, self._id(assistant)) for ref in refs], listing=True, greeting=True)
        event(f"crowd of {len(refs)}")
        self.outcome = (f"{', '.join(r.name for r in refs)} arrived at once, listed threads, started "
                        f"{sum(1 for t in threads if t.thread_id is not None)} agents and said hello")
        return multiple(*refs)

    def _connect_refused_all(self, tenant: TenantRef, uid: str, kinds: list[tuple[str, str]]) -> list[str]:
        """Connect with a credential of each (kind, way), each of which must be refused, all at once,
        in one call into the driver's loop (one after the other, each in a call of its own, they
        took a seventh of the run's time); "kind via way" for each that opened, in order.

        "x" names: refused attempts must not use up the connection budget. Without the server's
        secret a kind that needs it is sent as one that does not (the report lists it under
        not_run); the drawn kind stays in the program."""
        user = UserRef(uid, tenant, self._user_id(tenant, uid))
        tries = []
        for kind, via in kinds:
            kind = self.session.credentials.kind_for(kind)
            tries.append((self._name("x"), kind, via, self._credential(user.tenant.tid, user.uid, kind)))

        opened: set[str] = set()

        async def one(name: str, kind: str, via: str, token: str) -> None:
            result = await self.driver.connect(name, user.tenant.tid, user.uid, token, via, kind)
            if isinstance(result, Conn):
                opened.add(name)
                await self.driver.disconnect(name, False)

        async def all_at_once() -> None:
            async with trio.open_nursery() as n:
                for name, kind, via, token in tries:
                    n.start_soon(one, name, kind, via, token)

        self._call(all_at_once)
        return [f"{kind} via {via}" for name, kind, via, _ in tries if name in opened]

    @precondition(within_budget("disconnect"))
    @rule(conn=consumes(conns), abrupt=st.booleans())
    @recorded
    def disconnect(self, conn: ConnRef, abrupt: bool) -> None:
        self._call(self.driver.disconnect, conn.name, abrupt)
        self.joined.pop(conn.name, None)
        self.outcome = f"{conn.name} {'dropped' if abrupt else 'closed'}"

    # -- agents and threads --------------------------------------------------------------

    @precondition(lambda self: self.counts["th"] < MAX_THREADS)
    @rule(conn=conns, assistant=assistant_names(), instructions=INSTRUCTIONS)
    @recorded
    def start_agent(self, conn: ConnRef, assistant: str | AtLimit, instructions: str | None = None) -> None:
        self._start(conn, self._id(assistant), instructions)

    def _start(self, conn: ConnRef, assistant: str, instructions: str | None = None) -> ThreadRef:
        return self._start_together([(conn, assistant)], instructions)[0]

    def _start_together(self, starts: list[tuple[ConnRef, str]], instructions: str | None = None,
                        listing: bool = False, greeting: bool = False) -> list[ThreadRef]:
        """Start agents at the same instant and wait for all of them (threads named in order). With
        ``listing``, each connection also lists its tenant's threads at that instant, as an app's
        sidebar loads while its agent starts: requests of several tenants at once. With
        ``greeting``, each connection whose agent started then says hello in its new thread, all at
        one instant, without waiting for the replies: connections that arrived together count
        their request ids alike, so these turns stream at once under one id."""
        names = [self._name("th") for _ in starts]
        extra = {} if instructions is None else {"instructions": instructions}
        todo = [(conn, self.session.next_req_id(), {"assistant": assistant, **extra}) for conn, assistant in starts
                if self._open(conn)]
        lists = [(conn, self.session.next_req_id()) for conn, _, _ in todo] if listing and self.has("list_threads") else []
        greeting = greeting and self.has("user_message")
        hellos = [self._marker_content(ContentPlan("short", "hello")) for _ in todo] if greeting else []

        async def fire_and_wait() -> dict[str, Any]:
            t = time.monotonic()
            pendings = {}
            for conn, rid, fields in todo:
                pendings[rid] = await self.driver.send(conn.name, "start_agent", rid, fields, t)
            for conn, rid in lists:
                pendings[rid] = await self.driver.send(conn.name, "list_threads", rid, {}, t)
            replies = {}
            for rid, pending in pendings.items():
                replies[rid] = await self.driver.wait(pending) if pending is not None else None
            if greeting:
                started = [(conn, replies[rid].data["thread_id"]) for conn, rid, _ in todo
                           if replies.get(rid) is not None and replies[rid].type == "agent_started"
                           and isinstance(replies[rid].data.get("thread_id"), str)]
                t = time.monotonic()
                for (conn, thread_id), content in zip(started, hellos, strict=False):
                    await self.driver.send(conn.name, "user_message", self.session.next_req_id(),
                                           {"thread_id": thread_id, "content": content}, t)
            return replies

        replies = self._call(fire_and_wait) if todo else {}
        by_conn = {conn.name: replies.get(rid) for conn, rid, _ in todo}
        refs, said = [], []
        for name, (conn, assistant) in zip(names, starts, strict=True):
            reply = by_conn.get(conn.name)
            if reply is None or reply.type != "agent_started" or not isinstance(reply.data.get("thread_id"), str):
                # A thread that never started still gets a ref (see connect); steps skip it.
                said.append(f"no agent for {conn.name}: {reply.raw[:120] if reply else 'no reply (connection closed?)'}")
                ref = self._keep(ThreadRef(name, conn.user.tenant, None, conn.user.uid))
            else:
                ref = self._keep(ThreadRef(name, conn.user.tenant, reply.data["thread_id"], conn.user.uid))
                self.joined.setdefault(conn.name, []).append(ref)
                self.tenant_threads.setdefault(ref.tenant.tid, []).append(ref)
                said.append(f"{ref.name} started by {conn.name} ({assistant!r})")
            self.thread_list.append(ref)
            refs.append(ref)
        self.outcome = "; ".join(said)
        return refs

    def _bad_name(self, conn: ConnRef, assistant: str) -> None:
        assistant = self._id(assistant)
        if self._open(conn):
            self._fire(conn, "start_agent", {"assistant": assistant})
        self.outcome = f"start_agent with invalid name {assistant!r}"

    def _join_any(self, conn: ConnRef, thread: ThreadRef) -> None:
        if not self._open(conn, thread):
            pass
        elif self._crosses(conn, thread):
            self._probe(conn, "join_thread", thread, {})
        else:
            self._join(conn, thread)

    def _join(self, conn: ConnRef, thread: ThreadRef) -> None:
        pending = self._fire(conn, "join_thread", {"thread_id": thread.thread_id})
        reply = self._call(self.driver.wait, pending) if pending else None
        if thread not in self.joined.setdefault(conn.name, []):
            self.joined[conn.name].append(thread)
        self.outcome = f"{conn.name} join {thread.name}: {reply.type if reply else 'no reply'}"

    def _leave(self, conn: ConnRef, thread: ThreadRef) -> None:
        pending = self._fire(conn, "leave_thread", {"thread_id": thread.thread_id})
        reply = self._call(self.driver.wait, pending) if pending else None
        if thread in self.joined.get(conn.name, []):
            self.joined[conn.name].remove(thread)
        self.outcome = f"{conn.name} leave {thread.name}: {reply.type if reply else 'no reply'}"

    @precondition(lambda self: self.has("join_thread") and within_budget("join_sibling")(self))
    @rule(conn=conns, i=st.integers(0, 7))
    @recorded
    def join_sibling(self, conn: ConnRef, i: int) -> None:
        """Join one of the tenant's own threads (the i-th it started, cyclically)."""
        threads = self.tenant_threads.get(conn.user.tenant.tid, [])
        if not threads:
            self.outcome = f"tenant of {conn.name} has no thread yet"
        elif self._open(conn, threads[i % len(threads)]):
            self._join(conn, threads[i % len(threads)])

    @precondition(lambda self: self.has("leave_thread") and within_budget("leave_joined")(self))
    @rule(conn=conns, i=st.integers(0, 7))
    @recorded
    def leave_joined(self, conn: ConnRef, i: int) -> None:
        """Leave one of the threads this connection has joined, then post there once more, as a
        stale tab does after its user moved on (PROTOCOL.md: a thread not joined refuses it)."""
        threads = self.joined.get(conn.name, [])
        if not threads:
            self.outcome = f"{conn.name} has joined no thread"
        elif self._open(conn, threads[i % len(threads)]):
            thread = threads[i % len(threads)]
            self._leave(conn, thread)
            if self.has("user_message"):
                content = self._marker_content(ContentPlan("short", "still there?"))
                pending = self._fire(conn, "user_message", {"thread_id": thread.thread_id, "content": content})
                reply = self._call(self.driver.wait, pending) if pending else None
                self.outcome += f"; posted there after: {reply.type if reply else 'no answer'}"

    @precondition(lambda self: self.has("leave_thread") and within_budget("rejoin")(self))
    @rule(conn=conns, i=st.integers(0, 7))
    @recorded
    def rejoin(self, conn: ConnRef, i: int) -> None:
        """Leave a joined thread and join it again at once, without waiting (a client that
        re-subscribes when its tab wakes up): a turn streaming meanwhile must not reach it part-way."""
        threads = self.joined.get(conn.name, [])
        if not threads:
            self.outcome = f"{conn.name} has joined no thread"
            return
        thread = threads[i % len(threads)]
        if not self._open(conn, thread):
            return
        # While a colleague talks: another connection joined to the thread (the first by name, a
        # choice of the program, not of the server) sends a message, and the leave and the join
        # go out the moment its ack says the turn has begun, so they fall inside its reply.
        talkers = sorted(name for name, joined in self.joined.items() if name != conn.name and thread in joined
                         and self.driver.conns.get(name) is not None and self.driver.conns[name].open)
        talker = talkers[0] if talkers else None
        content = self._marker_content(ContentPlan("short", "said while you were away")) if talker else ""
        # And once the join is answered, the colleague speaks again: that turn must reach the
        # connection whole (a server may have kept it off the thread's fan-out since the leave).
        again = self._marker_content(ContentPlan("short", "said once you were back")) if talker else ""

        async def both() -> None:
            if talker is not None:
                pending = await self.driver.send(talker, "user_message", self.session.next_req_id(),
                                                 {"thread_id": thread.thread_id, "content": content})
                if pending is not None:
                    with trio.move_on_after(self.driver.reply_timeout_s):
                        await pending.answered.wait()
            await self.driver.send(conn.name, "leave_thread", self.session.next_req_id(), {"thread_id": thread.thread_id})
            joined = await self.driver.send(conn.name, "join_thread", self.session.next_req_id(),
                                            {"thread_id": thread.thread_id})
            if talker is not None and joined is not None:
                with trio.move_on_after(self.driver.reply_timeout_s):
                    await joined.answered.wait()
                await self.driver.send(talker, "user_message", self.session.next_req_id(),
                                       {"thread_id": thread.thread_id, "content": again})

        self._call(both)
        self.outcome = (f"{conn.name} left and joined {thread.name} again"
                        + (f" while {talker}'s turn streamed, and {talker} spoke again once it was back"
                           if talker else ""))

    def _leave_any(self, conn: ConnRef, thread: ThreadRef) -> None:
        if not self._open(conn, thread):
            pass
        elif self._crosses(conn, thread):
            self._probe(conn, "leave_thread", thread, {})
        else:
            self._leave(conn, thread)

    # -- messages and reads ----------------------------------------------------------

    def _send_any(self, conn: ConnRef, thread: ThreadRef, plan: ContentPlan) -> None:
        """Send without waiting: the reply streams while the next steps run."""
        if not self._open(conn, thread):
            return
        content = self._marker_content(plan)
        if self._crosses(conn, thread):
            self._probe(conn, "user_message", thread, {"content": content})
            return
        self._send(conn, thread, content, plan)

    def _send(self, conn: ConnRef, thread: ThreadRef, content: str, plan: ContentPlan) -> None:
        self._fire(conn, "user_message", {"thread_id": thread.thread_id, "content": content})
        event(f"message {plan.size}")
        self.outcome = f"{conn.name} sent {len(content.encode())} bytes to {thread.name}"

    @rule(conn=conns, i=st.integers(0, 7), plan=contents())
    @recorded
    def talk(self, conn: ConnRef, i: int, plan: ContentPlan) -> None:
        """Send, without waiting, in a thread this connection may talk in (the i-th, cyclically): one it
        joined, or where there is no joining, one on its side of the boundary."""
        threads = self._talkable(conn)
        if not threads:
            self.outcome = f"{conn.name} has no thread to talk in"
        elif self._open(conn, threads[i % len(threads)]):
            self._send(conn, threads[i % len(threads)], self._marker_content(plan), plan)

    @rule(conn=conns, i=st.integers(0, 7), plans=st.lists(contents(), min_size=2, max_size=4),
          then=st.sampled_from(["stay"] * 5 + ["leave"] * 2 + ["hang up"]))
    @recorded
    def chat(self, conn: ConnRef, i: int, plans: list[ContentPlan], then: str = "stay") -> None:
        """Type several messages in a row without waiting for the replies (they queue behind each
        other in the thread), as people do: messages are most of what a service carries. Then
        (``then``) the user stays; or leaves the thread right after (moves on to another one):
        the replies still come to this connection, with ``re``; or hangs up (closes the tab):
        the turn that has begun must still finish and store its reply."""
        threads = self._talkable(conn)
        if not threads:
            self.outcome = f"{conn.name} has no thread to talk in"
            return
        thread = threads[i % len(threads)]
        if not self._open(conn, thread):
            return
        sends = [(self.session.next_req_id(), {"thread_id": thread.thread_id, "content": self._marker_content(plan)})
                 for plan in plans]

        leave = then == "leave" and self.has("leave_thread") and thread in self.joined.get(conn.name, [])
        hang_up = then == "hang up"

        async def in_a_row() -> None:  # one call into the driver's loop for all of them
            sent = [await self.driver.send(conn.name, "user_message", rid, fields) for rid, fields in sends]
            if leave:
                pending = await self.driver.send(conn.name, "leave_thread", self.session.next_req_id(),
                                                 {"thread_id": thread.thread_id})
                if pending is not None:
                    await self.driver.wait(pending)
            elif hang_up:
                if sent[0] is not None:  # the first turn has begun (acked) when the tab closes
                    with trio.move_on_after(self.driver.reply_timeout_s):
                        await sent[0].answered.wait()
                await self.driver.disconnect(conn.name)

        self._call(in_a_row)
        event(f"chat of {len(plans)}" + (f", then {then}" if leave or hang_up else ""))
        self.outcome = f"{conn.name} sent {len(plans)} messages in a row to {thread.name}"
        if leave:
            self.joined[conn.name].remove(thread)
            self.outcome += ", and left it"
        elif hang_up:
            self.joined.pop(conn.name, None)
            self.outcome += ", and hung up"

    @precondition(within_budget("pipeline"))
    @rule(conn=conns, n=st.integers(16, 64), i=st.integers(0, 7))
    @recorded
    def pipeline(self, conn: ConnRef, n: int, i: int) -> None:
        """Send ``n`` reads on one connection at once without waiting, as a client restoring its view
        does (each thread's history, the thread list): the protocol lets 64 be in flight on a connection."""
        if not self._open(conn):
            return
        mine = [t for t in self.thread_list if t.thread_id is not None and not self._crosses(conn, t)]
        reads: list[tuple[str, dict[str, Any]]] = []
        if self.has("get_history"):
            reads += [("get_history", {"thread_id": t.thread_id}) for t in mine]
        reads += [(op, {}) for op in ("list_threads", "ping") if self.has(op)]
        if not reads:
            self.outcome = f"{conn.name} has nothing to read"
            return
        ops = [(self.session.next_req_id(), *reads[(i + k) % len(reads)]) for k in range(n)]

        async def all_at_once() -> int:
            t = time.monotonic()
            pendings = [await self.driver.send(conn.name, kind, rid, fields, t) for rid, kind, fields in ops]
            answered = 0
            for pending in pendings:
                if pending is not None and await self.driver.wait(pending) is not None:
                    answered += 1
            return answered

        answered = self._call(all_at_once)
        event(f"pipeline of {n}")
        self.outcome = f"{conn.name} sent {n} reads at once; {answered} answered"

    @rule(conn=conns, thread=st.integers(0, 15), limit=history_limits())
    @recorded
    def read_history(self, conn: ConnRef, thread: int, limit: object) -> None:
        """Read the history of a thread on this connection's side of the boundary (the i-th,
        cyclically), with or without ``limit``; reads across it are the `probe` rule's."""
        mine = [t for t in self.thread_list if t.thread_id is not None and not self._crosses(conn, t)]
        if not mine:
            self.outcome = f"{conn.name} has no thread to read"
            return
        self._read(conn, mine[thread % len(mine)], limit)

    def _read(self, conn: ConnRef, thread: ThreadRef, limit: object) -> None:
        if not self._open(conn, thread):
            return
        # A drawn limit the service does not take is dropped (the draw stays in the program).
        fields: dict[str, Any] = {} if limit is None or not self.session.adapter.history_limit else {"limit": limit}
        if self._crosses(conn, thread):
            self._probe(conn, "get_history", thread, fields)
            return
        if "limit" in fields:
            # A window is judged against what was committed before it was read: let the turns
            # this example has in flight in the thread finish first, so the window it must
            # return is known, and a wrong one is seen every time the program runs.
            self._call(self._quiesce, thread.thread_id)
        self._fire(conn, "get_history", {"thread_id": thread.thread_id, **fields})
        self.outcome = f"{conn.name} reads {thread.name} (limit {limit!r})"

    async def _quiesce(self, thread_id: str | None) -> None:
        """Wait (up to the reply limit) for this example's messages in flight in ``thread_id``."""
        rids = [r.req_id for r in self.model.reqs.values()
                if r.type == "user_message" and r.outcome is None and r.fields.get("thread_id") == thread_id]
        with trio.move_on_after(self.driver.reply_timeout_s):
            for rid in rids:
                pending = self.driver.pending.get(rid)
                if pending is not None:
                    await pending.done.wait()

    @rule(conn=conns, thread=st.integers(0, 15),
          request=st.sampled_from(["join_thread", "get_history", "user_message", "leave_thread"]), plan=contents())
    @recorded
    def probe(self, conn: ConnRef, thread: int, request: str, plan: ContentPlan) -> None:
        """Name any thread: one beyond the boundary is a probe (it must look like one that does not exist)."""
        ref = self._thread(thread)
        if ref is None:
            return
        if not self.has(request):
            # Drawn all the same (the adapter is fixed for the run, so the program is too).
            self.outcome = f"skipped: the service has no {request}"
            return
        thread = ref  # type: ignore[assignment]
        if request == "join_thread":
            self._join_any(conn, thread)
        elif request == "leave_thread":
            self._leave_any(conn, thread)
        elif request == "user_message":
            self._send_any(conn, thread, plan)
        else:
            self._read(conn, thread, None)

    # Bad input, in three rules of their own budgets, so each kind comes up often enough
    # in every run (one rule drawing among all of them left single kinds unsent for whole runs).

    @precondition(within_budget("bad_token"))
    @rule(tenant=st.integers(0, 3))
    @recorded
    def bad_token(self, tenant: int) -> None:
        """Connect with every kind of credential that must be refused, all at once. (A
        drawn kind left most kinds unsent for whole runs: Hypothesis favours the first of a list.)
        Then with a valid one on another path of the host, and with credentials both ways at once."""
        kinds = dict.fromkeys(self.session.credentials.kind_for(k) for k in (*BAD_TOKEN_KINDS, *EXTRA_BAD_KINDS))
        # Half the kinds go in the header and half in the query, the halves swapping at each call:
        # a service may check a credential one way and not the other.
        ways = ("header", "query") if self.calls["bad_token"] % 2 else ("query", "header")
        opened = self._connect_refused_all(self._tenant(tenant), "alice",
                                           [(kind, ways[i % 2]) for i, kind in enumerate(kinds)])
        # The handshake's own rules, with valid credentials. Nothing more is drawn (another rule
        # would change every program a seed generates): the path cycles through the kinds.
        turn = tenant + self.calls["bad_token"] - 1
        path = OTHER_PATH_KINDS[turn % len(OTHER_PATH_KINDS)]
        # And with a credential that must be refused, which must still get the path's answer (404).
        bad = list(kinds)[turn % len(kinds)]
        opened += [f"{path} path" + ("" if kind == "valid" else f" with {kind}")
                   for kind in self._other_path(self._tenant(tenant), path, ("valid", bad))]
        opened += self._both_ways(self._tenant(tenant), self._tenant(tenant + 1))
        expiring = (self._expiring_token(self._tenant(tenant)) + self._other_claims_token(self._tenant(tenant))
                    if self.calls["bad_token"] == 1 else "")
        self.outcome = (f"{len(kinds)} refused credentials, another path, both ways{expiring} tried"
                        + (f"; OPENED: {', '.join(opened)}" if opened else ""))

    def _server_clock_offset(self) -> float | None:
        """The server's clock minus the client's, from the newest welcome's ``server_time`` (behind
        by the welcome's one-way trip); None without a plausible one."""
        welcomed = [c for c in self.driver.conns.values() if c.welcome and c.welcome_t is not None]
        if not welcomed:
            return None
        newest = max(welcomed, key=lambda c: c.welcome_t or 0.0)
        server_time = (newest.welcome or {}).get("server_time")
        if isinstance(server_time, bool) or not isinstance(server_time, (int, float)):
            return None
        offset = server_time - (newest.welcome_t or 0.0) - (time.time() - time.monotonic())
        return offset if abs(offset) <= float(self.model.limits.get("clock_skew_ms", 300_000)) / 1000.0 else None

    def _expiring_token(self, tenant: TenantRef) -> str:
        """PROTOCOL.md: "`exp` is compared as a real number (a token that expires in half a second
        is still valid)". Connect with a token whose exp is the last thousandth of the server's
        current second, 0.2 to 1 s away by the server's clock (as the newest welcome gave it):
        a server that compares whole seconds has already passed it. A refusal that came back
        more than 0.1 s before exp is a violation. Without the secret: not run (see not_run)."""
        uid = self._user_id(tenant, "alice")
        offset = self._server_clock_offset()
        if self.session.credentials.secret is None or offset is None:
            return ""
        name = self._name("x")
        refused: list[tuple[float, float, str]] = []

        async def connect() -> None:
            now = time.time() + offset
            if now % 1 > 0.8:
                await trio.sleep(1.0 - now % 1 + 0.005)  # the next second, so at least 0.2 s is left
                now = time.time() + offset
            exp = float(int(now)) + 0.999
            token = self.session.credentials.expiring(tenant.tid, uid, exp) or ""
            result = await self.driver.connect(name, tenant.tid, uid, token, "header", "valid")
            if isinstance(result, Conn):
                await self.driver.disconnect(name, False)
            else:
                refused.append((exp, time.time() + offset, result.reason))

        self._call(connect)
        if refused and refused[0][1] < refused[0][0] - 0.1:
            exp, at, reason = refused[0]
            self.checker.record(Violation(
                "liveness", f"a token valid for another {exp - at:.2f} s was refused at the handshake ({reason}): "
                            "exp is compared as a real number, not in whole seconds",
                {"connection": name, "tenant": tenant.tid, "user": uid, "exp": exp, "refused_at_server_clock": at},
                check="valid_token_accepted"))
        return ", a token expiring within the second"

    def _other_claims_token(self, tenant: TenantRef) -> str:
        """PROTOCOL.md: "other claims are ignored". Connect with a valid token that also names an
        audience and an issuer, with not-before and issued-at an hour ahead (`tokens.other_claims`),
        as identity providers mint them: a server that checks them (a JWT library's defaults)
        refuses it. Without the secret: not run (see not_run)."""
        uid = self._user_id(tenant, "alice")
        token = self.session.credentials.with_other_claims(tenant.tid, uid)
        if token is None:
            return ""
        name = self._name("x")
        result = self._call(self.driver.connect, name, tenant.tid, uid, token, "header", "valid")
        if isinstance(result, Conn):
            self._call(self.driver.disconnect, name, False)
        else:
            self.checker.record(Violation(
                "liveness", f"a valid token that also carries other claims was refused at the handshake "
                            f"({result.reason}): other claims are ignored",
                {"connection": name, "tenant": tenant.tid, "user": uid,
                 "other_claims": sorted(other_claims(0.0))}, check="valid_token_accepted"))
        return ", a token with other claims"

    def _other_path(self, tenant: TenantRef, path: str, kinds: tuple[str, ...]) -> list[str]:
        """Connect with credentials of ``kinds`` (``valid`` or one that must be refused) to another
        path of the service's host, which must refuse them all, one after the other (so a server
        that breaks both rules is named the same way on every run); the kinds that opened."""
        uid = self._user_id(tenant, "alice")
        url = self.session.adapter.other_path(self.driver.url, path)
        tries = [(self._name("x"), kind, self._credential(tenant.tid, uid, kind)) for kind in kinds]
        opened: list[str] = []

        async def one(name: str, kind: str, token: str) -> None:
            label = "other_path" if kind == "valid" else f"other_path:{kind}"
            result = await self.driver.connect(name, tenant.tid, uid, token, "header", label, url=url)
            if isinstance(result, Conn):
                opened.append(kind)
                await self.driver.disconnect(name, False)

        async def in_turn() -> None:
            for name, kind, token in tries:
                await one(name, kind, token)

        self._call(in_turn)
        return [kind for kind in kinds if kind in opened]

    def _both_ways(self, tenant: TenantRef, other: TenantRef) -> list[str]:
        """Where the service takes a credential both ways at once, the header's counts: a valid header
        with another identity's valid token in the query is welcomed as the header's identity, and a
        refused header with a valid query is refused. Returns what opened that must not have."""
        if "both" not in self.session.adapter.credential_ways:
            return []
        uid, other_uid = self._user_id(tenant, "alice"), self._user_id(other, "bob")
        query = self._credential(other.tid, other_uid)
        kind = self.session.credentials.kind_for("wrong_key")
        opened = []
        for header, header_kind in ((self._credential(tenant.tid, uid), "valid"),
                                    (self._credential(tenant.tid, uid, kind), kind)):
            name = self._name("x")
            result = self._call(functools.partial(self.driver.connect, name, tenant.tid, uid, header, "both", header_kind,
                                                  query_token=query))
            if isinstance(result, Conn):
                self._call(self.driver.disconnect, name, False)
                if header_kind != "valid":
                    opened.append(f"{kind} header with a valid query")
            elif header_kind == "valid":
                self.checker.record(Violation("liveness", f"a valid token was refused at the handshake ({result.reason})",
                                              {"connection": name, "tenant": tenant.tid, "user": uid, "via": "both"},
                                              check="valid_token_accepted"))
        return opened

    @precondition(within_budget("bad_frame"))
    @rule(conn=conns, closing=closing_frames())
    @recorded
    def bad_frame(self, conn: ConnRef, closing: str | None) -> None:
        """Send every kind of malformed frame the service's format has, one after the other, then,
        when drawn, one the service must answer by closing (an oversized one)."""
        if not self._open(conn):
            return
        sent: list[tuple[str, BadFrame]] = []
        for kind in BAD_FRAME_KINDS:
            if kind in CLOSING_KINDS:
                continue  # one that closes the connection goes last, when drawn
            made = self.session.adapter.bad_frame(kind, self.session.next_req_id())
            if made is None:
                continue  # no such frame in this service's format
            sent.append((kind, made))
        if closing is not None:
            made = self.session.adapter.bad_frame(closing, self.session.next_req_id())
            if made is not None:
                sent.append((closing, made))

        # Right behind the oversized one, a ping: the server closes after too_large, so answering
        # it shows at once that the connection stayed open (without waiting out the close's limit).
        after = self.session.next_req_id() if closing is not None and self.has("ping") else None

        async def one_by_one() -> None:  # one call into the driver's loop for all of them
            # Those whose id the service can read first, and their answers awaited: an error
            # without `re` is then known to answer one of them (PROTOCOL.md: "`re` is echoed
            # whenever the request had a string `id`"), not one of the unreadable frames after.
            answered = []
            for kind, (message, rid, readable, expect) in sorted(sent, key=lambda s: s[1].readable is not True):
                if readable is not True and answered:
                    await self.driver.settle(self._found, only=answered)
                    answered = []
                pending = await self.driver.send_raw(conn.name, message, note=kind, req_id=rid, readable=readable,
                                                     expect=expect)
                if readable is True and pending is not None:
                    answered.append(pending)
            if after is not None:
                await self.driver.send(conn.name, "ping", after, {})

        self._call(one_by_one)
        event(f"bad frames{' and ' + closing if closing else ''}")
        self.outcome = f"{conn.name} sent {len(sent)} malformed frames ({', '.join(kind for kind, _ in sent)})"

    @precondition(within_budget("bad_name"))
    @rule(conn=conns, name=bad_assistant_names())
    @recorded
    def bad_name(self, conn: ConnRef, name: str | AtLimit) -> None:
        """Start an agent under a name the service must refuse."""
        self._bad_name(conn, name)

    @rule(
        conns_=st.lists(conns, min_size=1, max_size=4),
        threads_=st.lists(st.integers(0, 15), min_size=1, max_size=4),
        kinds=st.lists(st.sampled_from(["start_agent", "user_message", "get_history", "join_thread", "ping",
                                         "list_threads", "leave_thread"]),
                       min_size=2, max_size=6),
        plan=contents(),
    )
    @recorded
    def burst(self, conns_: list[ConnRef], threads_: list[int], kinds: list[str], plan: ContentPlan) -> None:
        """Fire several operations at the same instant, on several connections."""
        ops = []
        for i, kind in enumerate(kinds):
            conn = conns_[i % len(conns_)]
            thread = self._thread(threads_[i % len(threads_)])
            if not self.has(kind):
                continue
            if kind not in ("start_agent", "ping", "list_threads") and (thread is None or thread.thread_id is None or self._crosses(conn, thread)):
                continue
            if not self._open(conn):
                continue
            assert thread is not None or kind in ("start_agent", "ping", "list_threads")
            if kind == "start_agent":
                fields: dict[str, Any] = {"assistant": "helper"}
            elif kind == "user_message":
                fields = {"thread_id": thread.thread_id, "content": self._marker_content(plan)}
            elif kind in ("ping", "list_threads"):
                fields = {}
            else:
                fields = {"thread_id": thread.thread_id}
            ops.append((conn.name, kind, self.session.next_req_id(), fields))

        async def fire() -> None:
            t = time.monotonic()
            async with trio.open_nursery() as n:
                for name, kind, rid, fields in ops:
                    n.start_soon(self.driver.send, name, kind, rid, fields, t)

        self._call(fire)
        event(f"burst of {len(ops)}")
        self.outcome = f"burst: {', '.join(f'{c}:{k}' for c, k, _, _ in ops) or 'nothing open'}"

    @precondition(lambda self: self.step_no - self.settled_at >= 3 and within_budget("settle")(self))
    @rule()
    @recorded
    def settle(self) -> None:
        """Wait until every request is answered; then each party lists its threads, on its first open
        connection: with nothing of this example in flight, each thread's message count has one
        right value, so a count that is wrong is wrong every time the program runs."""
        self.settled_at = self.step_no
        left = self._call(self.driver.settle, self._found)
        self._copies_arrived()
        self.outcome = f"settled ({len(left)} still pending)"
        if not self.has("list_threads"):
            return
        first: dict[tuple[str, str | None], str] = {}
        for name in sorted(self.driver.conns, key=lambda n: (len(n), n)):  # c2 before c10: the order they opened
            if self.driver.conns[name].open and name in self.model.conns and self.model.conns[name].token_kind == "valid":
                first.setdefault(self.model.party_of(name), name)

        async def list_each() -> None:
            t = time.monotonic()
            pendings = [await self.driver.send(name, "list_threads", self.session.next_req_id(), {}, t)
                        for name in first.values()]
            await self.driver.settle(self._found, only=[p for p in pendings if p is not None])

        if first:
            self._call(list_each)
            self.outcome += f"; {len(first)} listed their threads"

    # Not before step CRASH_AFTER: a crash closes every connection of the example, so an
    # early one leaves the rest of it nothing joined to talk in (a step count, never a server
    # answer, so the same seed draws the same program).
    @precondition(lambda self: self.allow_crash and self.crashes < MAX_CRASHES and self.counts["th"] > 0
                  and self.step_no >= CRASH_AFTER)
    @rule(gentle=st.booleans())
    @recorded
    def crash_and_restart(self, gentle: bool = False) -> None:
        """SIGKILL the server mid-flight (or, ``gentle``, SIGTERM it: a shutdown, which closes every
        connection with 1001), and start it again on the same storage."""
        s = self.session
        # Its clients come back, as real ones do: every connection of the example open at the
        # kill reconnects under its own name, as the same user the same way, and joins its
        # threads again, so the rest of the example talks across the restart (not only the
        # connections opened after it).
        back = [(name, c.tenant, c.user, c.via) for name, c in self.driver.conns.items()
                if c.open and name.startswith("c")]
        self._call(self.driver.note, "crash", None, {"url": s.target.url, "gentle": gentle})
        self.crashes += 1
        if gentle:
            s.target.stop()  # waits for the server to exit; the driver's loop reads the closes meanwhile
        else:
            s.target.kill()
        self._call(self.driver.wait_closed)
        s.target.restart()
        assert s.target.url is not None
        self.driver.url = s.target.url
        self._call(self.driver.note, "restart", None, {"url": s.target.url})
        event("crash and restart")
        again = self._reconnect(back)
        self.outcome = (f"server {'shut down' if gentle else 'killed'} and restarted at {s.target.url}; "
                        f"{', '.join(again) or 'nothing'} reconnected")

    def _reconnect(self, back: list[tuple[str, str, str, str]]) -> list[str]:
        """Open each (name, tenant, user, via) again at once, then join its threads again; the names
        that opened."""
        tokens = [self._credential(tenant, user) for _, tenant, user, _ in back]

        refused: list[tuple[int, Refused]] = []

        async def arrive() -> list[str]:
            opened: list[str] = []

            async def one(i: int) -> None:
                name, tenant, user, via = back[i]
                result = await self.driver.connect(name, tenant, user, tokens[i], via)
                if isinstance(result, Refused):
                    refused.append((i, result))
                else:
                    opened.append(name)

            async with trio.open_nursery() as n:
                for i in range(len(back)):
                    n.start_soon(one, i)
            if self.has("join_thread"):
                pendings = []
                for name in sorted(opened):
                    for thread in self.joined.get(name, []):
                        if thread.thread_id is not None:
                            pendings.append(await self.driver.send(name, "join_thread", self.session.next_req_id(),
                                                                   {"thread_id": thread.thread_id}))
                for pending in pendings:
                    if pending is not None:
                        await self.driver.wait(pending)
            return sorted(opened)

        opened = self._call(arrive) if back else []
        for i, result in sorted(refused, key=lambda r: r[0]):
            name, tenant, user, via = back[i]
            self.checker.record(Violation("liveness", f"a valid token was refused at the handshake ({result.reason})",
                                          {"connection": name, "tenant": tenant, "user": user, "via": via},
                                          check="valid_token_accepted"))
        return opened

    # -- invariants ------------------------------------------------------------------
    #
    # Every invariant is checked the moment a frame arrives (props.invariants, run by
    # the Checker in the driver's loop). They are *raised* at the end of the example,
    # after everything in flight has settled: a frame that arrives a millisecond
    # later or sooner must not move the failure to another step, or Hypothesis sees
    # a different program each time and cannot shrink (a "flaky" data error).
    # Only a dead server or a broken harness stops an example at once.

    @invariant()
    def server_alive(self) -> None:
        self.driver.raise_errors()
        died = self.session.target.died()
        if died and not any(f.violation.invariant == "liveness" and "exited" in f.violation.title
                            for f in self.checker.found):
            self._call(self.driver.note, "died", None, {"reason": died})
        for found in self.checker.found:
            if found.violation.invariant == "liveness" and "exited" in found.violation.title:
                self.raised = found.violation
                raise found.violation

    def _copies_arrived(self) -> None:
        """Wait until every watcher's copy of each answered turn (or of one whose requester hung
        up, once a history read showed its reply stored) has come (``Model.owed_copies``), or
        until each missing one is late (``timing.fanout_lag_ms`` after the requester's own reply,
        or that read); note each that is still missing then for ``fanout_reaches_members``. With
        a server that fans out, the copies have come by then, so this waits only for a fault."""
        late: list[OwedCopy] = []

        def ready() -> bool:
            owed = self.model.owed_copies()
            now = time.monotonic()
            late[:] = [o for o in owed if o.due <= now]
            return self._found() or len(late) == len(owed)

        lag = float(self.model.limits.get("fanout_lag_ms", 1000)) / 1000.0

        async def wait() -> None:
            await self.driver.until(ready, time.monotonic() + lag)  # no copy is due later than that
            if late:
                # The loop may have been busy until now: let the readers take what is already in the
                # sockets, and ask again, so only a copy that is still missing is noted.
                await trio.sleep(0.1)
                await self.driver.until(ready, time.monotonic())
            for o in late:
                await self.driver.note("copy_missing", o.conn, {
                    "request": o.req.req_id, "missing": list(o.missing),
                    "waited_s": round(time.monotonic() - (o.due - lag), 3),
                    "limit_ms": self.model.limits.get("fanout_lag_ms", 1000)})

        self._call(wait)

    def _found(self) -> bool:
        """Whether the checks have found a violation in this example (waits can end early)."""
        return bool(self.checker.found)

    def raise_found(self) -> None:
        """Raise the first violation found in this example (the first thing that went wrong),
        naming the other invariants it also broke."""
        self.driver.raise_errors()
        if self.checker.found:
            first = self.checker.found[0].violation
            others = {f.violation.invariant: f.violation.title for f in self.checker.found[1:]
                      if f.violation.invariant != first.invariant}
            if others:
                first.evidence.setdefault("also_broken", others)
            self.raised = first
            raise first

    # -- the end of an example ----------------------------------------------------------

    def audit(self) -> None:
        """Settle, then read every thread's history once more from a fresh connection of its tenant
        (of its owner, where threads are private to their user)."""
        self._call(self.driver.settle, self._found)
        if self.checker.found:
            return  # settling showed something broken (a reply that never came): that is the finding
        by_party: dict[tuple[str, str | None], list[ThreadRef]] = {}
        for ref in self.refs.values():
            if isinstance(ref, ThreadRef) and ref.thread_id is not None:
                by_party.setdefault((ref.tenant.tid, ref.owner if self.user_scoped else None), []).append(ref)
        if not by_party or self.session.target.died():
            return
        for (tid, owner), refs in by_party.items():
            name = f"audit{len(self.driver.conns)}"
            # A user of its own where tenants are generated; the first provisioned one otherwise;
            # the owner itself where only the owner may read.
            if owner is not None:
                auditor = owner
            else:
                auditor = self.identities.user_at(tid, 0) if self.identities is not None else "auditor"
            token = self._credential(tid, auditor)
            conn = self._call(self.driver.connect, name, tid, auditor, token, "header")
            if not isinstance(conn, Conn):
                continue
            for ref in refs:
                self._audit_thread(name, ref)
            self._call(self.driver.disconnect, name, False)
        # The reads showed which turns have ended, those whose requester hung up among them: each
        # watcher's copy of them is owed now.
        if not self.checker.found:
            self._copies_arrived()
        self._call(self.driver.settle, self._found)

    def _audit_thread(self, conn: str, ref: ThreadRef) -> None:
        deadline = time.monotonic() + self.driver.reply_timeout_s
        while True:
            pending = self._call(self.driver.send, conn, "get_history", self.session.next_req_id(), {"thread_id": ref.thread_id})
            reply = self._call(self.driver.wait, pending) if pending else None
            if reply is None or reply.type != "history":
                return
            msgs = [m for m in reply.data.get("messages", []) if isinstance(m, dict)]
            if not msgs or msgs[-1].get("role") != "user" or self.checker.found:
                return  # answered, or something already broke: no point waiting for the reply
            if time.monotonic() > deadline:
                self._call(self.driver.note, "audit_unanswered", conn, {
                    "thread_id": ref.thread_id, "message_id": msgs[-1].get("message_id"),
                    "waited_s": self.driver.reply_timeout_s})
                return
            self._call(self.driver.pause, 0.1)

    def teardown(self) -> None:
        try:
            if self.raised is None and self.harness_error is None and not self.driver.errors and not self.checker.found:
                self.audit()
            self.raise_found()
        finally:
            self._call(self.driver.close_all)
            self.driver.forget_closed()
            st_ = self.session.stats
            st_["examples"] = st_.get("examples", 0) + 1
            st_["steps"] = st_.get("steps", 0) + len(self.program)
            # Every example's program (generated or a replay), by its tenants' prefix: the one
            # that ran before a leak that spans examples.
            self.session.example_programs[self.prefix] = list(self.program)
            if currently_in_test_context():  # generated by Hypothesis, not a replay of the shrinker
                self.session.fingerprint_program(self.program)
                fold_example(st_.setdefault("coverage", {}), self.program, self.model)
            for entry in self.program:
                rules = st_.setdefault("rules", {})
                rules[entry["rule"]] = rules.get(entry["rule"], 0) + 1
            for op, values in self.model.samples.items():
                self.session.samples.setdefault(op, []).extend(values)
            if self.identities is not None:
                # The tenants the run used: with identities, only provisioned ones.
                st_["tenants"] = sorted(set(st_.get("tenants", [])) | {t.tid for t in self.tenant_list})
            self.session.last_program = {
                "program": list(self.program),
                "violation": self.raised.to_json() if self.raised is not None else None,
                "prefix": self.prefix,
            }
            if self.raised is not None:
                self.session.failures.append(self.session.last_program)
            self.session.example_done()
