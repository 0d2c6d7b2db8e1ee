"""The bench's workload: the users of a seeded plan, all at once, against the session's target.

`run_bench` runs the plan's users (`partywall_props.plan`, or one shard of
them) through the suite's own `Driver`, with every event going through the
same invariants as the state machine (`partywall_props.invariants`): a
leak, a lost message or a misrouted reply fails the benchmark just as a
slow start-up does. Each user, all at once from one intended instant:
connect, start an agent, send its messages (each carrying a marker; waiting
for the whole reply each time), read its history, disconnect, reconnect,
read it again. Every latency is measured from when its request was meant
to go out; failures and time-outs are counted beside the percentiles; the
server's process is sampled by pid. The result is a
`partywall.benchreport.BenchReport`, judged against the thresholds by the
harness's one set of rules (`partywall.thresholds`).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

import attrs
import trio
from partywall_props.invariants import INVARIANTS
from partywall_props.model import Model
from partywall_props.plan import PLAN_VERSION, TENANT_NAMES, USER_NAMES, Plan, PlannedUser, nth_name

from partywall import thresholds as thresholdsmod
from partywall.adapter import Frame
from partywall.benchreport import BenchReport, LatencySummary, Resources, ShardInfo, ViolationEntry
from partywall.checks import Checker
from partywall.driver import Conn, Driver, Refused
from partywall.errors import HarnessError, Violation
from partywall.history import Event
from partywall.resources import ResourceSampler
from partywall.session import Session

__all__ = ["METRICS", "SERVER_STARTUP", "BenchRun", "FrameClock", "Plan", "PlannedUser", "Progress", "UserRun",
           "error_report", "run_bench", "run_prefix"]

#: The client-side latencies of the report, in the order people read them.
METRICS = ("connect", "agent_startup", "first_chunk", "response", "history", "reconnect")
#: Resource sampling period. A 100-user run against the reference server
#: takes about a second, so a coarser period would draw a CPU curve of four
#: points; psutil's reading costs well under a millisecond, so 20 readings a
#: second of two processes cost the client about 1 % of a core.
SAMPLE_INTERVAL_S = 0.05
#: The server's own account of agent start-up (``startup_ms``), reported beside the client's.
SERVER_STARTUP = "server_startup"


class FrameClock:
    """The driver's observer during the bench: every event goes to the checks. Latencies end
    at arrival times the driver takes as each frame comes off its socket, before the
    checks see it (a request's in ``Pending.times``, a welcome's in ``Conn.welcome_t``),
    so neither the checks nor the waiting task's wake-up count in them."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.frames = 0

    def __call__(self, ev: Event, frame: Frame | None) -> None:
        if ev.kind == "frame":
            self.frames += 1
        self.checker(ev, frame)

    @staticmethod
    def arrived(conn: Conn | None) -> float:
        """When ``conn``'s welcome came off its socket (the driver takes it there, before the
        checks see the frame); now, for a connection that has none."""
        t = conn.welcome_t if conn is not None else None
        return time.monotonic() if t is None else t


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
        # An unknown threshold or a limit that is no number is refused before anything runs.
        self.limits = thresholdsmod.check_limits(bench.get("thresholds", {}))
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
        tenant_no = {nth_name(TENANT_NAMES, t): t for t in range(self.plan.tenants)}[m.tenant]
        user_no = {nth_name(USER_NAMES, k): k for k in range(self.plan.users)}[m.user]
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
        times = pending.times  # arrival times, taken as each frame came off the socket
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
        t1 = self.clock.arrived(self.driver.conns.get(name))
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
        t_sent = self.clock.arrived(self.driver.conns.get(name))
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
            t_ready = self.clock.arrived(self.driver.conns.get(again))
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

    def run(self, start_gate: Callable[[], None] | None = None) -> BenchReport:
        self.credentials = self._fetch_credentials()
        if start_gate is not None:
            # A shard of a launched run (partywall.launch): everything is ready; every
            # shard's clock starts when the launcher says go to all of them at once.
            start_gate()
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
                client_summary: dict[str, Any]) -> BenchReport:
        latency: dict[str, LatencySummary] = {}
        success: dict[str, float | None] = {}
        for metric in METRICS:
            entry = LatencySummary.of(self.samples[metric], self.failures[metric])
            # Steps a user never reached because an earlier one failed: neither a
            # success nor a failure of this step, so shown apart, not hidden.
            entry.not_attempted = self._expected(metric) - entry.attempts
            latency[metric] = entry
            success[metric] = entry.n / entry.attempts if entry.attempts else None
        latency[SERVER_STARTUP] = LatencySummary.of(self.samples[SERVER_STARTUP], 0)
        success["overall"] = sum(u.ok for u in self.users) / len(self.users) if self.users else None
        # Histograms take no negative values; client-seen start-up below the
        # server's own figure would mean a clock problem, and then the exact
        # figures are kept without one.
        overhead = LatencySummary.of(self.overhead, None,
                                     histogram=bool(self.overhead) and min(self.overhead) >= 0)

        found = [f.violation for f in self.checker.found]
        report = BenchReport(
            users=len(self.users),
            plan_users=self.plan.users,
            seed=self.plan.seed,
            plan_fingerprint=self.plan.fingerprint(),
            plan={"tenants": self.plan.tenants, "messages_per_user": self.plan.messages_per_user,
                  "version": PLAN_VERSION},
            target=self.session.target.describe(),
            started_at=round(started_at, 3),
            duration_s=round(wall, 3),
            request_timeout_s=self.timeout_s,
            latency_ms=latency,
            success_rate=success,
            measurement_overhead_ms=overhead,
            server=Resources.from_json(server_summary, "server"),
            client=Resources.from_json(client_summary, "client"),
            violations=[ViolationEntry.of(v) for v in found],
            failures=self.failure_log,
            timeline=self.timeline,
            samples={"server": server.samples if server is not None else [], "client": client.samples},
            counts={"history_events": len(self.session.history), "frames": self.clock.frames},
        )
        if server is None:
            report.server_note = ("the server's pid is unknown (a server on another machine, or one the "
                                  "suite did not start and was not told the pid of): pass --server-pid")
        report.note_saturation(float(self.session.config["bench"]["client_cpu_saturated_percent"]))
        timing = report.judge(self.limits)
        for v in [*found, *timing]:
            self.session.report(v)
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
              progress: Progress | bool = True, start_gate: Callable[[], None] | None = None) -> BenchReport:
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
    report = run.run(start_gate)
    if shard is not None:
        report.shard = ShardInfo(*shard)
    return report


def error_report(plan: Plan | None, message: str, shard: tuple[int, int] | None = None) -> BenchReport:
    """The report of a bench that could not be made: ``ok`` false, ``error`` says why."""
    return BenchReport.of_error(message, seed=plan.seed if plan else None,
                                plan_fingerprint=plan.fingerprint() if plan else None,
                                shard=ShardInfo(*shard) if shard is not None else None)
