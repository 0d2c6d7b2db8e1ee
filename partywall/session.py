"""One run of the suite: its target, driver, history, registry, seed and report.

The pytest plugin makes one `Session` per pytest run and hands it to the
properties as the ``partywall_session`` fixture. Everything a failure report
needs to be replayed (seed, profile, target, run id) lives here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from partywall import __version__
from partywall.adapter import KNOWN_OPERATIONS, Adapter, load_adapter
from partywall.credentials import (
    Credentials,
    Identities,
    MintedCredentials,
    ProvisionedCredentials,
    from_settings,
    secretless_option,
)
from partywall.driver import Driver, Observer
from partywall.errors import Violation
from partywall.history import History
from partywall.markers import MarkerMint, Registry
from partywall.target import Target, make_target


@attrs.define(eq=False)
class ReportedViolation:
    violation: Violation
    reproduced: str | None = None
    replay: str | None = None
    detail: str = ""
    """What a reader needs beyond the title: how it was shrunk, the program, the replay command."""

    def to_json(self) -> dict[str, Any]:
        return {**self.violation.to_json(), "reproduced": self.reproduced, "replay": self.replay}


@attrs.define(eq=False)
class Session:
    """The run: shared by every example and every property of one pytest session."""

    config: dict[str, Any]
    """[tool.partywall] with command-line overrides applied."""
    target: Target
    seed: int
    profile: str
    replay_dir: Path
    run_id: str = attrs.field(factory=lambda: secrets.token_hex(3))
    """A per-process nonce in tenant prefixes and request ids: two runs with one seed never share tenants."""
    history: History = attrs.field(factory=History)
    registry: Registry = attrs.field(factory=Registry)
    driver: Driver | None = None
    adapter: Adapter = attrs.field(factory=Adapter)
    """How frames go on the wire (protocol v1 unless --partywall-adapter names another)."""
    credentials: Credentials = attrs.field(
        default=attrs.Factory(lambda self: MintedCredentials(self.target.secret), takes_self=True))
    """Where each identity's credential comes from (`partywall.credentials`); by default, tokens
    minted with the target's secret."""
    identities: Identities | None = None
    """The pre-provisioned tenants and users of --identities: examples reuse them instead of fresh tenants."""
    mint: MarkerMint = attrs.field(init=False)
    started: float = attrs.field(factory=time.time)
    violations: list[ReportedViolation] = attrs.field(factory=list)
    not_run: list[dict[str, str]] = attrs.field(factory=list)
    error: str | None = None
    stats: dict[str, Any] = attrs.field(factory=dict)
    samples: dict[str, list[float]] = attrs.field(factory=dict)
    """Latencies in ms per operation over the whole run (for percentile limits)."""
    last_program: dict[str, Any] | None = None
    """The step program of the example that ran last (after a failure: the shrunk one)."""
    failures: list[dict[str, Any]] = attrs.field(factory=list)
    example_programs: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    """Each generated example's program by its tenant prefix: what ran before a leak that spans examples."""
    bench_report: dict[str, Any] | None = None
    """The bench's own report, once the bench has run; the plugin then leaves the report file to it."""
    on_example: Callable[[Session], None] | None = None
    """Called after each example of the state machine (a progress line)."""
    _req: Any = attrs.field(factory=itertools.count, repr=False)
    _example: Any = attrs.field(factory=itertools.count, repr=False)
    _programs: Any = attrs.field(factory=hashlib.sha256, repr=False)

    def __attrs_post_init__(self) -> None:
        self.mint = MarkerMint(self.seed)

    @property
    def can_crash(self) -> bool:
        return self.target.can_crash

    def start(self, observer: Observer) -> Driver:
        self.target.start()
        assert self.target.url is not None
        self.driver = Driver(
            self.target.url,
            history=self.history,
            observer=observer,
            adapter=self.adapter,
            reply_timeout_s=float(self.config["reply_timeout_s"]),
            connect_timeout_s=float(self.config["connect_timeout_s"]),
            # wss:// only: the certificate is checked as --ca-file / --insecure say (the
            # report records it under target.tls); a failing check is a HarnessError here.
            ssl_context=self.target.tls.context(),
        ).start()
        return self.driver

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.target.stop()

    def next_req_id(self) -> str:
        """Request ids are unique per run, so a stray ``re`` is traced to its sender."""
        return f"q{self.run_id}-{next(self._req)}"

    def next_prefix(self) -> str:
        """A tenant prefix unique to this run and example."""
        return f"pw{self.run_id}e{next(self._example)}-"

    def not_run_check(self, check: str, reason: str) -> None:
        if not any(n["check"] == check for n in self.not_run):
            self.not_run.append({"check": check, "reason": reason})

    def fingerprint_program(self, program: list[dict[str, Any]]) -> None:
        """Fold an example's generated program (its rules and drawn arguments, not what the server
        answered) into the run's fingerprint: two runs with one seed against correct servers
        generate the same programs, so their fingerprints are equal."""
        drawn = [[step["rule"], step["args"]] for step in program]
        self._programs.update(json.dumps(drawn, sort_keys=True, ensure_ascii=True).encode())
        self._programs.update(b"\n")
        self.stats["program_fingerprint"] = self._programs.hexdigest()[:16]

    def example_done(self) -> None:
        """The state machine finished an example (its counts are in `stats`)."""
        if self.on_example is not None:
            self.on_example(self)

    def report(self, violation: Violation, reproduced: str | None = None, replay: str | None = None,
               detail: str = "") -> None:
        self.violations.append(ReportedViolation(violation, reproduced, replay, detail))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.error is None and not self.violations,
            "error": self.error,
            "violations": [v.to_json() for v in self.violations],
            "not_run": self.not_run,
            "partywall_version": __version__,
            "profile": self.profile,
            "seed": self.seed,
            "run_id": self.run_id,
            "target": self.target.describe(),
            "credentials": self.credentials.describe(),
            "duration_s": round(time.time() - self.started, 3),
            "stats": self.stats,
        }

    def write_report(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON report, making its folder if need be (as the bench's report does)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False, default=str) + "\n")


def session_from_settings(found: Any, *, seed: int, profile: str,
                          on_example: Callable[[Session], None] | None = None) -> Session:
    """The target, adapter and credentials the settings (`partywall.config.Settings`) name, as one
    Session, not yet started; what the service or the credentials make impossible is in ``not_run``.

    HarnessError when an option is wrong or a credential cannot be had.
    """
    target = make_target(
        server_url=found.get("server_url"),
        server_cmd=found.get("server_cmd"),
        auth_secret=found.get("auth_secret"),
        server_pid=found.get("server_pid"),
        ready_timeout_s=float(found["server_ready_timeout_s"]),
        credentials_from=secretless_option(found.get),
        ca_file=found.get("ca_file"),
        insecure=bool(found.get("insecure")),
    )
    adapter = load_adapter(found.get("adapter"))
    credentials, identities = from_settings(
        secret=target.secret, token_cmd=found.get("token_cmd"), identities=found.get("identities"),
        timeout_s=float(found["token_cmd_timeout_s"]))
    if isinstance(credentials, ProvisionedCredentials):
        credentials.prefetch()  # a token command that fails stops the run now, not mid-example
    session = Session(config=found.table, target=target, seed=seed, profile=profile,
                      replay_dir=Path(found.get("replay_dir")), adapter=adapter, credentials=credentials,
                      identities=identities, on_example=on_example)
    for op in sorted(KNOWN_OPERATIONS - adapter.operations):
        session.not_run_check(f"operation {op}", f"the {adapter.name} adapter declares no {op}, so the "
                                                 "suite sends none and checks nothing of it")
    sem = adapter.semantics
    if not adapter.history_limit:
        session.not_run_check("get_history limit", f"the {adapter.name} adapter says get_history takes no limit, so "
                                                   "history is only read whole")
    if sem.fanout == "requester":
        session.not_run_check("fan-out copies", f"the {adapter.name} adapter declares fan-out to nobody but the "
                                                "requester, so only that none arrives is checked (fanout_to_members)")
    if not target.can_crash:
        session.not_run_check("crash_and_restart",
                              f"the {target.kind} target was not started by the suite, so it cannot be crashed")
    for check, reason in credentials.not_run():
        session.not_run_check(check, reason)
    return session
