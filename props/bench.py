"""The fixed-seed benchmark: a seeded plan of users, and the workload that runs it.

The seed suite's "100 user test" drew nothing from a seed, so two runs never
did the same thing and could not be compared. Here a `Plan` is a pure
function of ``(seed, users, tenants, messages_per_user)``: which tenant each
user belongs to, its user id (tenants share ids: every tenant has an
``alice``), the assistant it starts, whether its token goes in the header or
the query, and the text of each message (non-ASCII included). Its
`Plan.fingerprint` is the SHA-256 of its canonical JSON, so two reports with
one fingerprint ran the same plan. What is particular to one run (the tenant
prefix that keeps runs apart on a shared server, the markers, request ids)
is not part of the plan.

`run_bench` runs the plan's users (or one shard of them) through the suite's
own `Driver`, with every event going through the same invariants as the
state machine (`partywall_props.invariants`): a leak, a lost message or a misrouted
reply fails the benchmark just as a slow start-up does. Each user, all at
once from one intended instant: connect, start an agent, send its messages
(each carrying a marker; waiting for the whole reply each time), read its
history, disconnect, reconnect, read it again. Every latency is measured
from when its request was meant to go out; failures and time-outs are
counted beside the percentiles; the server's process is sampled by pid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

import attrs
import trio
from partywall_props.invariants import INVARIANTS
from partywall_props.model import Model

from partywall import __version__
from partywall.adapter import Frame
from partywall.checks import Checker
from partywall.driver import Driver, Refused
from partywall.errors import HarnessError, Violation
from partywall.history import Event
from partywall.resources import ResourceSampler
from partywall.session import Session
from partywall.stats import min_samples_for, summarize

#: Bumped whenever plan generation changes, so an old fingerprint can never match a new plan.
PLAN_VERSION = 1

#: The client-side latencies of the report, in the order people read them.
METRICS = ("connect", "agent_startup", "first_chunk", "response", "history", "reconnect")
#: Resource sampling period. A 100-user run against the reference server
#: takes about a second, so a coarser period would draw a CPU curve of four
#: points; psutil's reading costs well under a millisecond, so 20 readings a
#: second of two processes cost the client about 1 % of a core.
SAMPLE_INTERVAL_S = 0.05
#: The server's own account of agent start-up (``startup_ms``), reported beside the client's.
SERVER_STARTUP = "server_startup"

# Tenants and users share names across tenants on purpose: PROTOCOL.md says
# `alice` of one tenant and `alice` of another are two people, and a server
# that keys anything by user id alone shows it here. Some are non-ASCII,
# because ids are code points compared byte for byte.
TENANT_NAMES = ("acme", "globex", "initech", "umbrella", "hooli", "Ünïcorp", "東京商事", "stark", "wayne", "Ωmega",
                "vandelay", "soylent")
USER_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
              "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "zoë", "José", "李雷",
              "Жанна", "Ærin")
ASSISTANTS = ("helper", "support", "analyst", "writer", "planner", "coder", "Résumé-bot", "助手")
_WORDS_ASCII = ("the", "agent", "please", "summarise", "report", "quarterly", "numbers", "for", "our", "team",
                "and", "check", "invoice", "shipping", "status", "today", "draft", "reply", "customer", "budget")
_WORDS_OTHER = ("naïve", "Grüße", "日本語", "привет", "Ελλάδα", "مرحبا", "façade", "straße", "한국어", "🚀",
                "café", "ångström", "€100", "שלום")


def _nth_name(names: Sequence[str], k: int) -> str:
    """The k-th name of a list, with a numeric suffix once the list runs out (alice, ..., alice2)."""
    base = names[k % len(names)]
    return base if k < len(names) else f"{base}{k // len(names) + 1}"


def _body(rng: random.Random) -> str:
    words = [rng.choice(_WORDS_ASCII + _WORDS_OTHER) for _ in range(rng.randint(3, 12))]
    # At least one non-ASCII word in every message: UTF-8 must survive the round trip every time.
    words[rng.randrange(len(words))] = rng.choice(_WORDS_OTHER)
    return " ".join(words)


@attrs.frozen
class PlannedUser:
    """One user of the plan and everything it will do."""

    index: int = attrs.field(validator=attrs.validators.instance_of(int))
    """Position in the plan, from 0; shard k of n runs the users with index % n == k."""
    tenant: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The tenant's name in the plan; a run prefixes it so that runs never share tenants."""
    user: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The user id inside its tenant (every tenant has an alice)."""
    assistant: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The assistant name it starts an agent of (names repeat across tenants)."""
    via: str = attrs.field(validator=attrs.validators.in_(("header", "query")))
    """Where its token goes: the Authorization header or the ``token`` query parameter."""
    messages: tuple[str, ...] = attrs.field(converter=lambda v: tuple(str(x) for x in v))
    """The text of each message; the run puts a fresh marker in front of each."""

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "tenant": self.tenant, "user": self.user, "assistant": self.assistant,
                "via": self.via, "messages": list(self.messages)}


@attrs.frozen
class Plan:
    """The whole seeded workload; build it with `Plan.generate`."""

    seed: int
    """The seed every choice is drawn from."""
    users: int
    """How many users the plan has (all shards together)."""
    tenants: int
    """How many tenants the users are spread over."""
    messages_per_user: int
    """Messages each user sends (each waits for the previous reply)."""
    members: tuple[PlannedUser, ...] = attrs.field(repr=False)
    """The users, by index."""

    @classmethod
    def generate(cls, seed: int, users: int, tenants: int, messages_per_user: int) -> Plan:
        """The plan of a seed: the same arguments give the same plan in any process, on any machine."""
        for name, value, least in (("users", users, 1), ("tenants", tenants, 1),
                                   ("messages_per_user", messages_per_user, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise HarnessError(f"the bench plan needs {name} to be an integer >= {least} (got {value!r}).")
        # A string seed goes through SHA-512 in random.seed, never through the
        # per-process salted hash() that made the seed suite irreproducible.
        rng = random.Random(f"partywall-bench-plan/{PLAN_VERSION}/{seed}")
        # Spread users over tenants evenly but not by index order: deal a
        # shuffled deck, so a shard (index % n) still sees every tenant.
        order = list(range(users))
        rng.shuffle(order)
        tenant_of = {user: pos % tenants for pos, user in enumerate(order)}
        taken: dict[int, int] = {}
        members = []
        for i in range(users):
            t = tenant_of[i]
            k = taken.get(t, 0)
            taken[t] = k + 1
            members.append(PlannedUser(
                index=i,
                tenant=_nth_name(TENANT_NAMES, t),
                user=_nth_name(USER_NAMES, k),
                assistant=rng.choice(ASSISTANTS),
                via=rng.choice(("header", "query")),
                messages=tuple(_body(rng) for _ in range(messages_per_user)),
            ))
        return cls(seed, users, tenants, messages_per_user, tuple(members))

    @classmethod
    def from_config(cls, bench: Mapping[str, Any], *, seed: int | None = None, users: int | None = None) -> Plan:
        """The plan ``[tool.partywall.bench]`` describes, with the command line's seed and user count."""
        return cls.generate(
            int(bench["seed"] if seed is None else seed),
            int(bench["users"] if users is None else users),
            int(bench["tenants"]),
            int(bench["messages_per_user"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "seed": self.seed, "users": self.users, "tenants": self.tenants,
                "messages_per_user": self.messages_per_user, "members": [m.to_json() for m in self.members]}

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the plan (sorted keys, no spaces, UTF-8)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def shard(self, index: int, count: int) -> tuple[PlannedUser, ...]:
        """The users shard ``index`` (0-based) of ``count`` runs."""
        if not 0 <= index < count:
            raise HarnessError(f"shard {index + 1}/{count} does not exist; K/N needs 1 <= K <= N.")
        return tuple(m for m in self.members if m.index % count == index)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1-based K, as people count) → ``(K - 1, N)``."""
    k, sep, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index = count = 0
    if not sep or count < 1 or not 1 <= index <= count:
        raise HarnessError(f"--shard (--partywall-shard) expects K/N with 1 <= K <= N, e.g. 2/4 (got {text!r}).")
    return index - 1, count


def xdist_shard(workerinput: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """Shard of this pytest-xdist worker (gw0 of 4 → (0, 4)), or None outside xdist.

    Read from the worker's own ``config.workerinput``, not from the
    environment, which a process started by a test under xdist inherits.
    """
    if not workerinput:
        return None
    worker, count = str(workerinput.get("workerid", "")), workerinput.get("workercount")
    if not worker.startswith("gw") or not count:
        return None
    return int(worker[2:]), int(count)


# ---------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------

_LATENCY_SUFFIXES = {"_p50_ms": "p50", "_p95_ms": "p95", "_p99_ms": "p99", "_max_ms": "max"}


def _threshold_kind(name: str) -> tuple[str, str, str]:
    """(source, key, direction) of a threshold name; the grammar `merge_bench_reports` re-evaluates."""
    if name == "violations":
        return "violations", "", "max"
    if name == "server_peak_rss_mib":
        return "server", "rss_mib_peak", "max"
    if name.endswith("_success_rate"):
        return "success_rate", name[: -len("_success_rate")], "min"
    for suffix, key in _LATENCY_SUFFIXES.items():
        if name.endswith(suffix):
            return "latency", f"{name[: -len(suffix)]}.{key}", "max"
    raise HarnessError(
        f"unknown bench threshold {name!r} in [tool.partywall.bench.thresholds]; known forms: "
        "<metric>_p50_ms / _p95_ms / _p99_ms / _max_ms, <metric>_success_rate, server_peak_rss_mib, violations."
    )


def evaluate_thresholds(limits: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {limit, actual, ok[, n]}}``; an unmeasured figure fails (no data is not a pass)."""
    out: dict[str, dict[str, Any]] = {}
    for name, limit in limits.items():
        source, key, direction = _threshold_kind(name)
        entry: dict[str, Any] = {"limit": limit}
        actual: Any
        if source == "violations":
            actual = len([v for v in report["violations"] if v.get("invariant") != "timing"])
        elif source == "server":
            actual = (report.get("server") or {}).get(key)
            if actual is None:
                entry["note"] = ("the server's process was not sampled; pass --server-pid for a server "
                                 "the suite did not start")
        elif source == "success_rate":
            actual = report["success_rate"].get(key)
        else:
            metric, stat = key.split(".")
            figures = report["latency_ms"].get(metric) or {}
            actual = figures.get(stat)
            entry["n"] = figures.get("n", 0)
        entry["actual"] = actual
        entry["ok"] = actual is not None and (actual <= limit if direction == "max" else actual >= limit)
        out[name] = entry
    return out


def threshold_violations(thresholds: Mapping[str, Mapping[str, Any]]) -> list[Violation]:
    """A `timing` violation, with actual and limit, for every threshold that failed."""
    out = []
    for name, t in thresholds.items():
        if t["ok"] or name == "violations":
            # A breach of `violations` is the violations themselves, listed already.
            continue
        actual, limit = t["actual"], t["limit"]
        if actual is None:
            title = f"{name}: not measured, so it cannot be shown within the limit {limit}"
        else:
            relation = "is below" if name.endswith("_rate") else "exceeds"
            # Milliseconds and MiB to 0.1; a rate exactly (0.995 must not read as 1.0).
            shown = round(actual, 1) if isinstance(actual, float) and not name.endswith("_rate") else actual
            title = f"{name}: actual {shown} {relation} limit {limit}"
        evidence = {"threshold": name, "actual": actual, "limit": limit}
        if "n" in t:
            evidence["n"] = t["n"]
        if "note" in t:
            evidence["note"] = t["note"]
        out.append(Violation("timing", title, evidence, check=f"threshold_{name}"))
    return out


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class FrameClock:
    """The driver's observer during the bench: every event goes to the checks,
    and the arrival time of each reply frame is kept by request id, so a
    latency ends when its frame was read, not when the waiting task resumed."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.by_req: dict[str, list[tuple[str, float]]] = {}
        self.welcome: dict[str, float] = {}
        self.frames = 0

    def __call__(self, ev: Event, frame: Frame | None) -> None:
        # Times first: a failing check must not cost the measurement.
        if ev.kind == "frame":
            self.frames += 1
            if ev.req_id is not None:
                self.by_req.setdefault(ev.req_id, []).append((ev.op, ev.t))
            elif ev.op == "welcome" and ev.conn is not None:
                self.welcome[ev.conn] = ev.t
        self.checker(ev, frame)


@attrs.define(eq=False)
class UserRun:
    """What one user did in this run."""

    planned: PlannedUser
    tenant: str
    """The tenant id on the wire: the run's prefix + the plan's tenant name (or a provisioned tenant)."""
    uid: str
    """The user id on the wire: the plan's (or a provisioned user of the tenant)."""
    step: str = "waiting"
    """The metric of the step under way (for a user stopped by its time budget)."""
    ok: bool = True
    """Every step succeeded."""
    finished: bool = False


class Progress:
    """One status line on the terminal while the bench runs.

    On a terminal the line is redrawn in place (``\\r``) at most every
    ``interval`` seconds; elsewhere (a CI log) a line is printed at most
    every ``log_every`` seconds, so logs stay short.
    """

    def __init__(self, total: int, stream: TextIO | None = None, *, interval: float = 0.25,
                 log_every: float = 5.0) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.log_every = log_every
        self._last_log = -math.inf
        self._width = 0

    def show(self, counts: Mapping[str, int], elapsed: float, final: bool = False) -> None:
        line = (f"bench: {elapsed:5.1f} s  connected {counts['connected']}/{self.total}  "
                f"agents started {counts['started']}  users done {counts['done']}  "
                f"failed {counts['failed']}  requests in flight {counts['in_flight']}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        elif final or elapsed - self._last_log >= self.log_every:
            self.stream.write(line + "\n")
            self._last_log = elapsed
        self.stream.flush()


class BenchRun:
    """One run of a plan's users against the session's target (see `run_bench`)."""

    def __init__(self, session: Session, plan: Plan, members: Sequence[PlannedUser], *, prefix: str,
                 progress: Progress | None, sample_interval_s: float = SAMPLE_INTERVAL_S) -> None:
        if session.driver is None:
            raise HarnessError("the bench needs a started session (its driver is not running).")
        self.session = session
        self.driver: Driver = session.driver
        self.plan = plan
        bench = session.config["bench"]
        self.timeout_s = float(bench["request_timeout_s"])
        self.connect_timeout_s = float(session.config["connect_timeout_s"])
        self.limits = dict(bench.get("thresholds", {}))
        for name in self.limits:
            _threshold_kind(name)  # an unknown threshold is refused before anything runs
        self.progress = progress
        self.sample_interval_s = sample_interval_s
        self.users = [UserRun(m, *self._identity(m, prefix)) for m in members]
        for u in self.users:
            if not session.adapter.valid_id(u.tenant):
                raise HarnessError(f"the tenant id {u.tenant!r} is not a valid id (1-64 code points, no "
                                   "whitespace); use a shorter tenant prefix.")
        self.conn_prefix = "b" + prefix
        # Per-operation limits of [tool.partywall.timing] are the state
        # machine's; the bench judges time by its percentile thresholds
        # (one slow start-up of 100 is allowed by a p95 gate), so the model
        # gets none and `timing` violations come only from the thresholds.
        self.checker = Checker(Model(session.registry, limits={}, adapter=session.adapter), INVARIANTS.select(),
                               session.history)
        self.clock = FrameClock(self.checker)
        self.samples: dict[str, list[float]] = {m: [] for m in (*METRICS, SERVER_STARTUP)}
        self.overhead: list[float] = []
        self.failures: dict[str, int] = {m: 0 for m in METRICS}
        self.failure_log: list[dict[str, Any]] = []
        self.timeline: dict[str, list[list[Any]]] = {"connect": [], "agent_startup": []}
        self.counts = {"connected": 0, "started": 0, "done": 0, "failed": 0}
        self.origin = 0.0
        self.t_go = 0.0
        self.credentials: dict[tuple[str, str], str] = {}
        """Each identity's credential, asked for before the clock starts (see `run`)."""

    def _identity(self, m: PlannedUser, prefix: str) -> tuple[str, str]:
        """(tenant, user) on the wire for a planned user.

        Without --identities: the run's prefix + the plan's tenant, and the plan's user id.
        With it: the plan's k-th tenant is the k-th provisioned one and its j-th user the
        tenant's j-th provisioned user, both cyclically (so several planned users may share
        one identity, as several devices of one person do).
        """
        ids = self.session.identities
        if ids is None:
            return prefix + m.tenant, m.user
        tenant_no = {_nth_name(TENANT_NAMES, t): t for t in range(self.plan.tenants)}[m.tenant]
        user_no = {_nth_name(USER_NAMES, k): k for k in range(self.plan.users)}[m.user]
        tenant = ids.tenant_at(tenant_no).id
        return tenant, ids.user_at(tenant, user_no)

    def _fetch_credentials(self) -> dict[tuple[str, str], str]:
        """Every identity's credential, before the clock starts: a token command takes time of its own."""
        wanted = sorted({(u.tenant, u.uid) for u in self.users})
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="partywall-credentials") as pool:
            got = list(pool.map(lambda key: self.session.credentials.for_identity(*key), wanted))
        return dict(zip(wanted, got, strict=True))

    # -- bookkeeping -------------------------------------------------------------

    def _ok(self, metric: str, ms: float) -> None:
        self.samples[metric].append(ms)

    def _fail(self, user: UserRun, metric: str, reason: str) -> None:
        self.failures[metric] += 1
        user.ok = False
        # Every failure is counted; the first 200 are kept with their reason
        # (a run where everything fails should not write a report of megabytes).
        if len(self.failure_log) < 200:
            self.failure_log.append({"user": user.planned.index, "tenant": user.tenant, "user_id": user.uid,
                                     "metric": metric, "reason": reason})

    def _span(self, kind: str, user: UserRun, t0: float, t1: float | None, ok: bool) -> None:
        self.timeline[kind].append([user.planned.index, round(t0 - self.origin, 4),
                                    None if t1 is None else round(t1 - self.origin, 4), ok])

    # -- the workload -----------------------------------------------------------

    async def _request(self, conn: str, req_type: str, fields: dict[str, Any],
                       t: float) -> tuple[Frame | None, list[tuple[str, float]], str]:
        """Send a request meant to go out at ``t``; wait for its final reply until ``t`` + the limit.

        Returns (final frame or None, (frame type, arrival time) of each reply frame, why it failed).
        """
        req_id = self.session.next_req_id()
        pending = await self.driver.send(conn, req_type, req_id, fields, t=t)
        if pending is None:
            return None, [], "the connection was closed before the request was sent"
        with trio.move_on_after(max(0.0, t + self.timeout_s - time.monotonic())):
            await pending.done.wait()
        final = pending.final
        times = self.clock.by_req.pop(req_id, [])
        if final is None:
            why = ("the connection closed before the reply" if pending.done.is_set()
                   else f"no reply within {self.timeout_s:g} s (time-out)")
            return None, times, why
        if final.type == "error":
            return final, times, f"error {final.data.get('code')!r}: {str(final.data.get('message'))[:120]}"
        return final, times, ""

    def _is_open(self, conn: str) -> bool:
        c = self.driver.conns.get(conn)
        return c is not None and c.open

    async def _connect(self, user: UserRun, name: str, t0: float, metric: str) -> bool:
        p = user.planned
        token = self.credentials.get((user.tenant, user.uid))
        if token is None:
            token = await self.session.credentials.for_identity_async(user.tenant, user.uid)
        result = await self.driver.connect(name, user.tenant, user.uid, token, p.via)
        if isinstance(result, Refused):
            t1 = time.monotonic()
            if metric == "connect":
                self._span("connect", user, t0, t1, False)
            self._fail(user, metric, f"the handshake failed: {result.reason}")
            # A handshake time-out is already a `liveness` violation of the
            # checks (the driver records it as info); a refusal of a valid
            # token is one too, but only the bench knows the token was valid.
            if result.status is not None or not result.reason.startswith("no welcome within"):
                self.checker.record(Violation(
                    "liveness", f"a valid token was refused at the handshake ({result.reason})",
                    {"connection": name, "tenant": user.tenant, "user": user.uid, "via": p.via},
                    check="valid_token_accepted"))
            return False
        t1 = self.clock.welcome.get(name, time.monotonic())
        self._ok(metric, (t1 - t0) * 1000.0)
        if metric == "connect":
            self._span("connect", user, t0, t1, True)
        return True

    async def _read_history(self, user: UserRun, conn: str, thread: str, t: float) -> float | None:
        user.step = "history"
        final, times, why = await self._request(conn, "get_history", {"thread_id": thread}, t)
        t_done = next((ft for typ, ft in times if typ == "history"), None)
        if final is None or final.type != "history" or t_done is None:
            self._fail(user, "history", why or f"answered with {final.type if final else None!r}")
            return None
        self._ok("history", (t_done - t) * 1000.0)
        return t_done

    async def _flow(self, user: UserRun) -> None:
        p = user.planned
        name = f"{self.conn_prefix}{p.index}"
        user.step = "connect"
        if not await self._connect(user, name, self.t_go, "connect"):
            return
        self.counts["connected"] += 1
        try:
            await self._session_of(user, name)
        finally:
            # Shielded: a user stopped by its time budget still closes its connection.
            with trio.CancelScope(shield=True):
                await self.driver.disconnect(name)

    async def _session_of(self, user: UserRun, name: str) -> None:
        p = user.planned
        # The agent is meant to start the moment the welcome is read: the user has nothing else to do.
        t_sent = self.clock.welcome.get(name, time.monotonic())
        user.step = "agent_startup"
        final, times, why = await self._request(name, "start_agent", {"assistant": p.assistant}, t_sent)
        t_started = next((ft for typ, ft in times if typ == "agent_started"), None)
        if final is None or final.type != "agent_started" or t_started is None:
            self._span("agent_startup", user, t_sent, None, False)
            self._fail(user, "agent_startup", why or f"answered with {final.type if final else None!r}")
            return
        client_ms = (t_started - t_sent) * 1000.0
        self._ok("agent_startup", client_ms)
        self._span("agent_startup", user, t_sent, t_started, True)
        self.counts["started"] += 1
        server_ms = final.data.get("startup_ms")
        if isinstance(server_ms, (int, float)) and not isinstance(server_ms, bool):
            self._ok(SERVER_STARTUP, float(server_ms))
            self.overhead.append(client_ms - float(server_ms))
        thread = str(final.data["thread_id"])

        # Each message is meant to go out when the previous reply is complete (a
        # closed-loop user without think time), and is measured from then.
        t_next = t_started
        for body in p.messages:
            if not self._is_open(name):
                return
            user.step = "response"
            content = f"{self.session.mint.next()} {body}"
            final, times, why = await self._request(name, "user_message", {"thread_id": thread, "content": content},
                                                    t_next)
            first = next((ft for typ, ft in times if typ == "agent_chunk"), None)
            done = next((ft for typ, ft in times if typ == "agent_response"), None)
            if final is not None and final.type == "agent_response" and done is not None:
                # A reply of zero chunks is allowed; then the response is the first sign of life.
                self._ok("first_chunk", ((first if first is not None else done) - t_next) * 1000.0)
                self._ok("response", (done - t_next) * 1000.0)
                t_next = done
            else:
                if first is not None:
                    self._ok("first_chunk", (first - t_next) * 1000.0)
                else:
                    self._fail(user, "first_chunk", why or f"answered with {final.type if final else None!r}")
                self._fail(user, "response", why or f"answered with {final.type if final else None!r}")
                t_next = time.monotonic()

        if not self._is_open(name):
            return
        t_read = await self._read_history(user, name, thread, t_next)
        if t_read is None and not self._is_open(name):
            return

        # Disconnect, come back on a new connection, and read the thread again:
        # what was committed must still be there, and nothing of anyone else.
        user.step = "reconnect"
        await self.driver.disconnect(name)
        again = name + "r"
        t_back = time.monotonic()
        if not await self._connect(user, again, t_back, "reconnect"):
            return
        try:
            t_ready = self.clock.welcome.get(again, time.monotonic())
            await self._read_history(user, again, thread, t_ready)
        finally:
            with trio.CancelScope(shield=True):
                await self.driver.disconnect(again)

    def _budget_s(self) -> float:
        # A backstop only: every wait is already bounded by request_timeout_s.
        # Connect and reconnect, start-up, messages, two history reads, plus closes.
        return 2 * self.connect_timeout_s + self.timeout_s * (3 + self.plan.messages_per_user) + 15.0

    async def _user(self, user: UserRun) -> None:
        with trio.move_on_after(self._budget_s()) as scope:
            await self._flow(user)
        if scope.cancelled_caught:
            self._fail(user, user.step, f"the user's whole flow exceeded its budget of {self._budget_s():g} s")
        user.finished = True
        self.counts["done"] += 1
        if not user.ok:
            self.counts["failed"] += 1

    def _show(self, final: bool = False) -> None:
        if self.progress is not None:
            self.progress.show({**self.counts, "in_flight": len(self.driver.pending)},
                               time.monotonic() - self.origin, final)

    async def _show_progress(self) -> None:
        assert self.progress is not None
        while True:  # ends when the run cancels it
            self._show()
            await trio.sleep(self.progress.interval)

    async def _run_all(self) -> None:
        async with trio.open_nursery() as outer:
            if self.progress is not None:
                outer.start_soon(self._show_progress)
            async with trio.open_nursery() as users:
                # The one instant every user means to connect at. The tasks
                # start when this task next yields, microseconds later; the
                # gap (and any queueing in the client) counts in `connect`.
                self.t_go = time.monotonic()
                for user in self.users:
                    users.start_soon(self._user, user)
            outer.cancel_scope.cancel()
        self._show(final=True)

    # -- driving it from the caller's thread ------------------------------------

    def run(self) -> dict[str, Any]:
        self.credentials = self._fetch_credentials()
        driver = self.driver
        saved = (driver.observer, driver.reply_timeout_s)
        driver.observer = self.clock
        # The driver's watchdog flags a request as timed out (a `liveness`
        # violation) after this long: in the bench that is request_timeout_s.
        driver.reply_timeout_s = self.timeout_s
        server_pid = self.session.target.server_pid()
        self.origin = time.monotonic()
        started_at = time.time()
        server = ResourceSampler(server_pid, self.sample_interval_s, t0=self.origin) if server_pid else None
        client = ResourceSampler(os.getpid(), self.sample_interval_s, t0=self.origin)
        if server is not None:
            server.start()
        client.start()
        try:
            try:
                driver.call(self._run_all)
            except Exception as exc:
                # The server's faults arrive as recorded events and violations, never
                # as exceptions here; an exception is the suite's own bug: exit 2.
                raise HarnessError(f"the bench workload failed inside the suite: {exc!r}") from exc
            died = self.session.target.died()
            if died:
                # Through the invariants: `liveness` reports a server that exited by itself.
                driver.call(driver.note, "died", None, {"reason": died})
        finally:
            server_summary = server.stop() if server is not None else None
            client_summary = client.stop()
            driver.observer, driver.reply_timeout_s = saved
        driver.raise_errors()  # a check that crashed is a bug of the suite: exit 2, not a verdict
        wall = time.monotonic() - self.origin
        return self._report(started_at, wall, server_pid, server, server_summary, client, client_summary)

    # -- the report -------------------------------------------------------------

    def _expected(self, metric: str) -> int:
        per_user = {"connect": 1, "agent_startup": 1, "first_chunk": self.plan.messages_per_user,
                    "response": self.plan.messages_per_user, "history": 2, "reconnect": 1}[metric]
        return per_user * len(self.users)

    def _report(self, started_at: float, wall: float, server_pid: int | None, server: ResourceSampler | None,
                server_summary: dict[str, Any] | None, client: ResourceSampler,
                client_summary: dict[str, Any]) -> dict[str, Any]:
        latency: dict[str, Any] = {}
        success: dict[str, Any] = {}
        for metric in METRICS:
            entry = summarize(self.samples[metric], self.failures[metric], histogram=True)
            attempts = entry["n"] + entry["failures"]
            # Steps a user never reached because an earlier one failed: neither a
            # success nor a failure of this step, so shown apart, not hidden.
            entry["not_attempted"] = self._expected(metric) - attempts
            latency[metric] = entry
            success[metric] = entry["n"] / attempts if attempts else None
        latency[SERVER_STARTUP] = summarize(self.samples[SERVER_STARTUP], 0, histogram=True)
        success["overall"] = sum(u.ok for u in self.users) / len(self.users) if self.users else None
        # Histograms take no negative values; client-seen start-up below the
        # server's own figure would mean a clock problem, and then the exact
        # figures are kept without one.
        overhead = summarize(self.overhead, 0, histogram=bool(self.overhead) and min(self.overhead) >= 0)
        overhead.pop("failures")

        violations = [f.violation for f in self.checker.found]
        report: dict[str, Any] = {
            "ok": False,
            "error": None,
            "users": len(self.users),
            "plan_users": self.plan.users,
            "seed": self.plan.seed,
            "plan_fingerprint": self.plan.fingerprint(),
            "plan": {"tenants": self.plan.tenants, "messages_per_user": self.plan.messages_per_user,
                     "version": PLAN_VERSION},
            "profile": "bench",
            "partywall_version": __version__,
            "target": self.session.target.describe(),
            "started_at": round(started_at, 3),
            "duration_s": round(wall, 3),
            "request_timeout_s": self.timeout_s,
            "latency_ms": latency,
            "success_rate": success,
            "measurement_overhead_ms": overhead,
            "server": server_summary,
            "client": client_summary,
            "thresholds": {},
            "violations": [{**v.to_json(), "reproduced": None, "replay": None} for v in violations],
            "failures": self.failure_log,
            "timeline": self.timeline,
            "samples": {"server": server.samples if server is not None else [], "client": client.samples},
            "counts": {"history_events": len(self.session.history), "frames": self.clock.frames},
        }
        if server is None:
            report["server_note"] = ("the server's pid is unknown (a server on another machine, or one the "
                                     "suite did not start and was not told the pid of): pass --server-pid")
        thresholds = evaluate_thresholds(self.limits, report)
        report["thresholds"] = thresholds
        timing = threshold_violations(thresholds)
        report["violations"] += [{**v.to_json(), "reproduced": None, "replay": None} for v in timing]
        for v in [*violations, *timing]:
            self.session.report(v)
        report["ok"] = not report["violations"] and all(t["ok"] for t in thresholds.values())
        return report


def run_prefix(session: Session) -> str:
    """The tenant prefix of this run.

    Shards of one sharded run share it (pytest-xdist gives its workers one
    test-run id; separate processes can be given ``PARTYWALL_BENCH_RUN``), so
    a plan's tenant really holds users driven by several load generators;
    otherwise it is unique to the run, and repeated runs against one server
    never meet each other's tenants.
    """
    shared = os.environ.get("PARTYWALL_BENCH_RUN") or os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if shared:
        return f"pwb{hashlib.sha256(shared.encode()).hexdigest()[:8]}-"
    return session.next_prefix()


def run_bench(session: Session, plan: Plan, *, shard: tuple[int, int] | None = None,
              progress: Progress | bool = True) -> dict[str, Any]:
    """Run the plan's users (shard ``(index, count)`` of them) and return the bench report.

    ``progress`` True draws the status line on stderr; a `Progress` draws it
    where that says; False draws none.
    """
    members = plan.shard(*shard) if shard is not None else plan.members
    if not members:
        raise HarnessError(f"shard {shard[0] + 1}/{shard[1]} of a {plan.users}-user plan has no users; "  # type: ignore[index]
                           "use fewer shards than users.")
    if progress is True:
        progress = Progress(len(members))
    run = BenchRun(session, plan, members, prefix=run_prefix(session), progress=progress or None)
    report = run.run()
    if shard is not None:
        report["shard"] = {"index": shard[0], "count": shard[1]}
    return report


def error_report(plan: Plan | None, message: str, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """The report of a bench that could not be made: ``ok`` false, ``error`` says why."""
    report: dict[str, Any] = {
        "ok": False, "error": message, "users": 0, "seed": plan.seed if plan else None,
        "plan_fingerprint": plan.fingerprint() if plan else None, "latency_ms": {}, "success_rate": {},
        "server": None, "client": None, "thresholds": {}, "violations": [], "timeline": {}, "samples": {},
    }
    if shard is not None:
        report["shard"] = {"index": shard[0], "count": shard[1]}
    return report


# ---------------------------------------------------------------------------
# The terminal summary
# ---------------------------------------------------------------------------


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _rate(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def format_summary(report: Mapping[str, Any]) -> str:
    """A short table of the report for the terminal."""
    if report.get("error"):
        return f"partywall bench could not run: {report['error']}"
    target = report.get("target") or {}
    verdict = "PASSED" if report.get("ok") else "FAILED"
    shard = report.get("shard")
    shard_text = f", shard {shard['index'] + 1}/{shard['count']}" if shard else ""
    lines = [
        f"partywall bench {verdict}: {report['users']} users{shard_text}, seed {report['seed']}, "
        f"plan {str(report['plan_fingerprint'])[:12]}, {target.get('kind')} {target.get('url')}, "
        f"{report['duration_s']:.2f} s",
        f"{'metric':<15}{'n':>6}{'fail':>6}{'success':>9}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}  (ms)",
    ]
    success = report.get("success_rate") or {}
    for name, e in (report.get("latency_ms") or {}).items():
        note = ""
        n = e.get("n") or 0
        if 0 < n < min_samples_for(99):
            note = "  p95=max" if n < min_samples_for(95) else "  p99=max"
        lines.append(f"{name:<15}{n:>6}{e.get('failures', 0):>6}{_rate(success.get(name)):>9}"
                     f"{_ms(e.get('p50')):>10}{_ms(e.get('p95')):>10}{_ms(e.get('p99')):>10}{_ms(e.get('max')):>10}{note}")
    over = report.get("measurement_overhead_ms") or {}
    if over.get("n"):
        lines.append(f"measurement overhead (client start-up - server startup_ms): p50 {_ms(over.get('p50'))}, "
                     f"p95 {_ms(over.get('p95'))}, max {_ms(over.get('max'))} ms over n = {over['n']}")
    lines.append(f"users who completed every step: {_rate(success.get('overall'))}")
    for who in ("server", "client"):
        res = report.get(who)
        if isinstance(res, Mapping) and res.get("samples"):
            lines.append(f"{who} pid {res.get('pid')}: CPU peak {_ms(res.get('cpu_percent_peak'))} % / mean "
                         f"{_ms(res.get('cpu_percent_mean'))} % of one core, RSS peak {_ms(res.get('rss_mib_peak'))} MiB, "
                         f"open files peak {res.get('open_files_peak')}, threads {res.get('threads_peak')} "
                         f"({res.get('samples')} samples)")
        else:
            lines.append(f"{who}: not sampled")
    for name, t in (report.get("thresholds") or {}).items():
        actual = t.get("actual")
        shown = _ms(actual) if isinstance(actual, float) and not name.endswith("_rate") else actual
        lines.append(f"threshold {name}: actual {shown}, limit {t.get('limit')}: {'ok' if t.get('ok') else 'FAILED'}")
    violations = report.get("violations") or []
    for v in violations[:10]:
        lines.append(f"VIOLATION [{v.get('invariant')}] {v.get('title')}")
    if len(violations) > 10:
        lines.append(f"... and {len(violations) - 10} more violations; every one is in the JSON report")
    return "\n".join(lines)
