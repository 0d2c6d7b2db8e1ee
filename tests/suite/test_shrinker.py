"""The shrinker, stage by stage, against scripted replays.

Rules: no sockets and no server. `shrink_program` is given a `Scripted`
replay, a plain function that decides from the candidate program alone
whether it fails, with which invariant and during which step, and records
every candidate it is given; and a fake clock, so nothing depends on how fast
the machine is. Programs are written as `TenantMachine` records them (rule,
arguments through the machine's own `encode_arg`, ``then``, ``made``), and
the scripted replay refuses a step naming a connection no earlier step made,
as `replay` does. Each test asserts the exact program the shrinker returns
and what it refused, and each fails when the stage it names is taken out of
the shrinker (the tests say how: by the result, or by the order and number of
the replays). No wall-clock bounds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from partywall_props import runner
from partywall_props.machine import ConnRef, TenantMachine, TenantRef, UserRef, encode_arg
from partywall_props.runner import shrink, shrink_program
from partywall_strategies import ContentPlan

from partywall.errors import HarnessError, Violation
from partywall.session import Session

Step = dict[str, Any]
Program = list[Step]
#: What the scripted server does with a candidate: None (it passes), or the invariant
#: broken and the index of the step during which it was seen (the replay stops there).
Verdict = Callable[[Program], "tuple[str, int] | tuple[str, int, str] | None"]

T0 = TenantRef("t0", "pw3f2a1ce0-Acme")
T1 = TenantRef("t1", "pw3f2a1ce0-acme")
C0 = ConnRef("c0", UserRef("alice", T0, "alice"))
C1 = ConnRef("c1", UserRef("bob", T0, "bob"))
C2 = ConnRef("c2", UserRef("alice", T1, "alice"))
C3 = ConnRef("c3", UserRef("alice", T1, "alice"))
SHORT = ContentPlan("short", "")
NEVER = 60.0  # a budget the frozen clock never uses up


def frozen() -> float:
    return 0.0


def step(rule: str, made: Iterable[str] = (), **args: Any) -> Step:
    """A step as `recorded` writes it."""
    return {"rule": rule, "args": {k: encode_arg(v) for k, v in args.items()}, "then": "recorded",
            "made": list(made)}


def world(first: str = "acme", second: str = "globex", via: str = "header") -> Step:
    """The opening step (plain arguments: the `SIMPLER` values, so it is left as it is)."""
    return step("world", made=["t0", "t1", "c0", "c1", "c2", "th0", "th1"], first=first, second=second, via=via)


def key(s: Step) -> str:
    """What a step is, ignoring what it did (``then``, which the shrinker rewrites)."""
    return json.dumps([s["rule"], s["args"]], sort_keys=True)


def keys(program: Program) -> list[str]:
    return [key(s) for s in program]


def has(program: Program, s: Step) -> bool:
    return key(s) in keys(program)


def refs(value: Any) -> list[str]:
    if isinstance(value, dict) and "ref" in value:
        return [value["ref"]]
    if isinstance(value, dict):
        return [r for v in value.values() for r in refs(v)]
    if isinstance(value, list | tuple):
        return [r for v in value for r in refs(v)]
    return []


class Clock:
    """A clock that moves only when a replay runs (one second each)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """Stands in for `replay` against a live server: the verdict decides, every run is kept."""

    def __init__(self, verdict: Verdict, clock: Clock | None = None) -> None:
        self.verdict = verdict
        self.clock = clock
        self.runs: list[Program] = []
        """Each candidate as it was given (copies: the shrinker rewrites ``then`` afterwards)."""
        self.answers: list[str | None] = []
        """For each run: the invariant it broke, None when it passed, "refused" on HarnessError."""

    def __call__(self, candidate: Program) -> tuple[Violation | None, list[str]]:
        self.runs.append(copy.deepcopy(candidate))
        if self.clock is not None:
            self.clock.now += 1.0
        made: set[str] = set()
        for s in candidate:
            missing = [r for r in refs(s["args"]) if r not in made]
            if missing:
                self.answers.append("refused")
                raise HarnessError(f"the replay refers to {missing[0]!r}, which no earlier step made.")
            made.update(s["made"])
        verdict = self.verdict(candidate)
        self.answers.append(None if verdict is None else verdict[0])
        if verdict is None:
            return None, [f"replayed {s['rule']}" for s in candidate]
        invariant, at, *check = verdict
        # Like `replay`: it stops after the step during which the violation was seen.
        return (Violation(invariant, f"{invariant} broken (scripted)", {"step": at + 1},
                          check=check[0] if check else "scripted"),
                [f"replayed {s['rule']}" for s in candidate[: at + 1]])

    def runs_of(self, program: Program) -> list[str | None]:
        """The answers to every run of exactly this program, in order."""
        return [a for c, a in zip(self.runs, self.answers, strict=True) if keys(c) == keys(program)]


def when_all(*needed: Step, invariant: str = "isolation") -> Verdict:
    """Fails when every needed step is in the candidate, seen during the last of them."""

    def verdict(candidate: Program) -> tuple[str, int] | None:
        at = [keys(candidate).index(key(s)) for s in needed if has(candidate, s)]
        return (invariant, max(at)) if len(at) == len(needed) else None

    return verdict


def found(program: Program, invariant: str = "isolation", step: int | None = None) -> Violation:
    """The violation the generating run saw (by default during the program's last step)."""
    return Violation(invariant, f"{invariant} broken while generating",
                     {"step": len(program) if step is None else step}, check="scripted")


# A thread in the second tenant (A), and the first tenant naming it (B): the leak.
A = step("start_agent", made=["th2"], conn=C2, assistant="helper")
B = step("probe", conn=C0, thread=2, request="get_history", plan=SHORT)


def fillers(positions: Iterable[int]) -> dict[int, Step]:
    """Unrelated steps: agent starts at every third position, probes elsewhere."""
    out: dict[int, Step] = {}
    threads = iter(range(3, 8))
    for p in positions:
        if p % 3 == 0:
            out[p] = step("start_agent", made=[f"th{next(threads)}"], conn=C0 if p % 2 else C1, assistant="support")
        else:
            out[p] = step("probe", conn=C1 if p % 2 else C2, thread=p % 2, request="join_thread",
                          plan=ContentPlan("short", f"filler {p}"))
    return out


def test_shrinker_keeps_exactly_the_two_steps_that_fail_together() -> None:
    """Delta debugging (halves first) from world + 20 steps to world + the two steps that matter."""
    steps = fillers(p for p in range(1, 21) if p not in (3, 20)) | {3: A, 20: B}
    program = [world()] + [steps[p] for p in range(1, 21)]
    before = copy.deepcopy(program)
    server = Scripted(when_all(A, B))

    best, violation, stats = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert keys(best) == keys([world(), A, B])
    assert violation.invariant == "isolation" and violation.title == "isolation broken (scripted)"
    assert stats["found_steps"] == 21 and stats["shrunk_steps"] == 3
    assert program == before  # the shrinker works on copies
    # Both kinds of step hold a needed one, so dropping a kind never reproduces. The first
    # candidate holding both kinds is the delta stage's first: steps 1-10 removed at once
    # (one at a time, it would be steps 2-20).
    delta = [c for c in server.runs if {s["rule"] for s in c[1:]} == {"start_agent", "probe"}]
    assert keys(delta[0]) == keys([world()] + [steps[p] for p in range(11, 21)])


def test_shrinker_refuses_a_candidate_that_fails_another_invariant() -> None:
    """Without A the probe still fails, but as a protocol error: that must not replace the leak."""
    other = step("talk", conn=C1, i=0, plan=SHORT)

    def verdict(candidate: Program) -> tuple[str, int] | None:
        if not has(candidate, B):
            return None
        return ("isolation" if has(candidate, A) else "protocol"), keys(candidate).index(key(B))

    program = [world(), other, A, other, other, B]
    server = Scripted(verdict)

    best, violation, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert keys(best) == keys([world(), A, B])
    assert violation.invariant == "isolation"
    # Proposed three times (as B's slice, a dropped kind, a dropped step); as a slice it must fail
    # the same way every time, so one run refused it for good.
    assert server.runs_of([world(), B]) == ["protocol"]


def test_shrinker_refuses_a_candidate_that_another_check_of_the_invariant_catches() -> None:
    """Without A the probe still breaks isolation, but another check finds it: not the same bug."""
    other = step("talk", conn=C1, i=0, plan=SHORT)

    def verdict(candidate: Program) -> tuple[str, int, str] | None:
        if not has(candidate, B):
            return None
        return "isolation", keys(candidate).index(key(B)), "scripted" if has(candidate, A) else "another_check"

    program = [world(), other, A, other, other, B]
    server = Scripted(verdict)

    best, violation, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert keys(best) == keys([world(), A, B])
    assert (violation.invariant, violation.check) == ("isolation", "scripted")
    assert server.runs_of([world(), B]) == ["isolation"]


def test_shrinker_retries_a_candidate_that_passed_once() -> None:
    """A flaky server: the minimal program fails every other run, starting with a pass."""
    extra = step("start_agent", made=["th3"], conn=C1, assistant="support")
    minimal = [world(), A, B]
    runs = 0

    def verdict(candidate: Program) -> tuple[str, int] | None:
        nonlocal runs
        failing = when_all(A, B)(candidate)
        if failing is not None and keys(candidate) == keys(minimal):
            runs += 1
            return failing if runs % 2 == 0 else None
        return failing

    program = [world(), A, extra, B]
    server = Scripted(verdict)

    best, violation, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert keys(best) == keys(minimal)
    assert violation.invariant == "isolation"
    assert server.runs_of(minimal) == [None, "isolation"]  # passed once, retried, failed: kept


def test_shrinker_keeps_the_original_when_no_candidate_reproduces() -> None:
    """A failure that never comes back: every candidate is run three times, then given up on."""
    program = [world(), A, step("start_agent", made=["th3"], conn=C1, assistant="support"), B]
    before = copy.deepcopy(program)
    seen = found(program)
    server = Scripted(lambda candidate: None)

    best, violation, stats = shrink_program(program, seen, server, NEVER, clock=frozen)

    assert best == before and violation is seen
    assert stats["found_steps"] == stats["shrunk_steps"] == 4
    assert server.runs and set(server.answers) == {None}
    assert keys(server.runs[0]) == keys([world(), B])  # B's slice: it must fail every time, so one pass ends it
    assert (len(server.runs) - 1) % 3 == 0
    for i in range(1, len(server.runs), 3):  # each other candidate three times in a row, and never again
        assert keys(server.runs[i]) == keys(server.runs[i + 1]) == keys(server.runs[i + 2])
        assert all(keys(server.runs[i]) != keys(server.runs[j]) for j in range(i))


def test_shrinker_stops_at_the_budget_with_the_best_so_far() -> None:
    """Five seconds of one-second replays: the leak's slice (one passing run: it needs talk[1]),
    every read at once (kept), every talk at once (three passing runs); then the shrinker stops."""
    read = [step("read_history", conn=C0, thread=t, limit=None) for t in range(6)]
    talk = [step("talk", conn=C0, i=i, plan=SHORT) for i in range(4)]
    settle = step("settle")
    leak = step("probe", conn=C0, thread=1, request="join_thread", plan=SHORT)
    program = [world(), read[0], talk[0], read[1], settle, read[2], talk[1], read[3],
               talk[2], settle, read[4], talk[3], read[5], leak]
    clock = Clock()
    server = Scripted(when_all(talk[1], leak), clock)

    best, _, stats = shrink_program(program, found(program), server, 5.0, clock=clock)

    assert server.answers == [None, "isolation"] + [None] * 3
    assert keys(server.runs[0]) == keys([world(), leak])
    # The settle steps and the other talks would go next.
    assert keys(best) == keys([world(), talk[0], settle, talk[1], talk[2], settle, talk[3], leak])
    assert stats["shrink_s"] == 5.0  # the injected clock, not the wall's


def test_shrinker_drops_a_whole_kind_of_step_in_one_replay() -> None:
    """Every history read goes in the first replay."""
    reads = [step("read_history", conn=C1, thread=t, limit=3) for t in range(8)]
    program = [world(), *reads[:4], A, *reads[4:], B]
    server = Scripted(when_all(A, B))

    best, _, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    # First B's slice, which lacks A (one passing run); then every read goes in one replay.
    assert keys(server.runs[0]) == keys([world(), B]) and server.answers[0] is None
    assert keys(server.runs[1]) == keys([world(), A, B]) and server.answers[1] == "isolation"
    assert keys(best) == keys([world(), A, B])


def test_shrinker_simplifies_arguments_the_failure_does_not_need() -> None:
    """Any message breaks it: the world's tenants and the message take the simplest values."""
    message = step("talk", conn=C0, i=5, plan=ContentPlan("around_8k", "x" * 8192))
    program = [world(first="Acme", second="acme", via="query"), step("read_history", conn=C1, thread=0, limit=3),
               message]
    server = Scripted(lambda c: ("protocol", [s["rule"] for s in c].index("talk"))
                      if any(s["rule"] == "talk" for s in c) else None)

    best, _, _ = shrink_program(program, found(program, "protocol"), server, NEVER, clock=frozen)

    assert [s["args"] for s in best] == [
        {"first": "acme", "second": "globex", "via": "header"},
        {"conn": {"ref": "c0"}, "i": 0, "plan": {"content": ["short", ""]}},
    ]


def test_shrinker_keeps_arguments_the_failure_needs() -> None:
    """Breaks only for a message one byte over the limit between tenants equal but for case."""

    def verdict(candidate: Program) -> tuple[str, int] | None:
        first, second = candidate[0]["args"]["first"], candidate[0]["args"]["second"]
        talk = [i for i, s in enumerate(candidate) if s["rule"] == "talk"
                and s["args"]["plan"]["content"][0] == "one_over"]
        return ("protocol", talk[0]) if talk and first != second and first.lower() == second.lower() else None

    message = step("talk", conn=C0, i=5, plan=ContentPlan("one_over", "x" * 16385))
    program = [world(first="Acme", second="acme", via="query"), step("read_history", conn=C1, thread=0, limit=3),
               message]
    server = Scripted(verdict)

    best, _, _ = shrink_program(program, found(program, "protocol"), server, NEVER, clock=frozen)

    assert [s["args"] for s in best] == [
        {"first": "Acme", "second": "acme", "via": "header"},
        {"conn": {"ref": "c0"}, "i": 0, "plan": {"content": ["one_over", "x" * 16385]}},
    ]
    # Each kept value was tried and refused (three runs each: a pass is retried).
    assert server.runs_of([world(first="acme", second="acme", via="query"), message]) == [None] * 3
    assert server.runs_of([world(first="Acme", second="globex", via="query"), message]) == [None] * 3


def test_shrinker_cuts_after_the_step_the_violation_was_seen_in() -> None:
    """Seen during step 8 of 21: the first replay is steps 1-8."""
    steps = fillers(p for p in range(1, 21) if p not in (3, 7)) | {3: A, 7: B}
    program = [world()] + [steps[p] for p in range(1, 21)]
    server = Scripted(when_all(A, B))

    best, _, _ = shrink_program(program, found(program, step=8), server, NEVER, clock=frozen)

    assert keys(server.runs[0]) == keys(program[:8]) and server.answers[0] == "isolation"
    assert keys(best) == keys([world(), A, B])


def test_shrinker_tries_the_failing_step_with_only_the_steps_that_made_what_it_names() -> None:
    """The step that saw it reads on c3, whose connect came 12 steps earlier: one replay of those
    two steps (and the world) replaces a removal per filler."""
    connect = step("connect", made=["c3"], tenant=1, uid="alice", via="header")
    read = step("read_history", conn=C3, thread=1, limit=None)
    steps = fillers(p for p in range(1, 15) if p != 2) | {2: connect}
    program = [world()] + [steps[p] for p in range(1, 15)] + [read]
    server = Scripted(when_all(connect, read))

    best, _, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert [keys(run) for run in server.runs[:3]] == [keys([world(), connect, read])] * 3
    assert server.answers[:3] == ["isolation"] * 3  # taken only after failing in each of three runs
    assert keys(best) == keys([world(), connect, read])
    assert len(server.runs) < 10  # one per filler removed would be 13 at least


def test_shrinker_refuses_a_slice_that_fails_only_now_and_then() -> None:
    """The slice fails once in three (a race): not taken, though the normal stages would take it."""
    connect = step("connect", made=["c3"], tenant=1, uid="alice", via="header")
    read = step("read_history", conn=C3, thread=1, limit=None)
    other = step("start_agent", made=["th3"], conn=C1, assistant="helper")
    program = [world(), connect, other, read]
    runs = 0

    def verdict(candidate: Program) -> tuple[str, int] | None:
        nonlocal runs
        failing = when_all(connect, read)(candidate)
        if failing is not None and not has(candidate, other):
            runs += 1
            return failing if runs % 3 == 2 else None  # passes, fails, passes...
        return failing

    server = Scripted(verdict)

    best, _, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert server.runs_of([world(), connect, read]) == [None]  # the slice: one pass, refused for good
    assert keys(best) == keys(program)


def test_shrinker_never_removes_the_opening_world_step() -> None:
    """Even when the failure does not need it (a restart that loses the server, no refs involved)."""
    crash = step("crash_and_restart")
    program = [world(), step("settle"), crash, step("settle")]
    server = Scripted(lambda c: ("liveness", keys(c).index(key(crash))) if has(c, crash) else None)

    best, _, _ = shrink_program(program, found(program, "liveness", step=3), server, NEVER, clock=frozen)

    assert keys(best) == keys([world(), crash])
    assert all(c[0]["rule"] == "world" for c in server.runs)


def test_shrinker_treats_a_refused_replay_as_an_invalid_candidate() -> None:
    """A step naming a connection a removed step made: the replay refuses it, once, and that step stays."""
    connect = step("connect", made=["c3"], tenant=1, uid="alice", via="header")
    read = step("read_history", conn=C3, thread=0, limit=None)
    other_read = step("read_history", conn=C0, thread=1, limit=None)
    talk = [step("talk", conn=C0, i=0, plan=ContentPlan("short", f"m{i}")) for i in range(3)]
    program = [world(), talk[0], other_read, connect, talk[1], talk[2], read]
    server = Scripted(when_all(read))

    best, _, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert keys(best) == keys([world(), connect, read])
    assert server.runs_of([world(), read]) == ["refused"]  # removing the connect: proposed twice, run once
    refused = [i for i, a in enumerate(server.answers) if a == "refused"]
    for i in refused:  # and never run again straight away
        assert i + 1 == len(server.runs) or keys(server.runs[i + 1]) != keys(server.runs[i])


def test_shrinker_records_what_each_kept_step_did() -> None:
    """A kept program ends where its replay stopped, and each step's ``then`` is from that replay."""
    reads = [step("read_history", conn=C1, thread=t, limit=None) for t in range(2)]
    program = [world(), *reads, B, step("settle")]
    before = copy.deepcopy(program)
    server = Scripted(when_all(B))

    best, _, _ = shrink_program(program, found(program), server, NEVER, clock=frozen)

    assert keys(best) == keys([world(), B])
    assert [s["then"] for s in best] == ["replayed world", "replayed probe"]
    assert program == before


SETTLE = step("settle")


def flaky_unless_settled(*, settled_fails: bool) -> Verdict:
    """A and B fail together, but only every other run (a race), unless a settle comes right before B:
    then always (``settled_fails``: a read that is wrong whenever it comes after the commits) or
    never (a failure that needs the race)."""
    runs = 0

    def verdict(candidate: Program) -> tuple[str, int] | None:
        nonlocal runs
        failing = when_all(A, B)(candidate)
        if failing is None:
            return None
        at = keys(candidate).index(key(B))
        if candidate[at - 1]["rule"] == "settle":
            return failing if settled_fails else None
        runs += 1
        return failing if runs % 2 else None

    return verdict


def test_shrinker_waits_before_the_failing_step_when_the_program_reproduces_only_sometimes() -> None:
    """Reproduced 1 of 3 times: a settle before B makes it 3 of 3, and no later stage removes it."""
    extra = step("start_agent", made=["th3"], conn=C1, assistant="support")
    program = [world(), A, extra, B]
    server = Scripted(flaky_unless_settled(settled_fails=True))

    best, violation, stats = shrink_program(program, found(program), server, NEVER, clock=frozen,
                                            reproduce=3, steady="settle")

    assert keys(best) == keys([world(), A, SETTLE, B])
    assert stats["reproduced"] == 3 and stats["shrunk_steps"] == 4 and violation.invariant == "isolation"
    assert all("_pinned" not in s for s in best)  # the mark stays inside the shrinker
    # The program without the wait reproduced less often; the wait went in before B, and every
    # later candidate (shrinking again around it) kept it.
    assert server.runs_of([world(), A, B])[-3:].count("isolation") < 3
    first_wait = next(i for i, run in enumerate(server.runs) if has(run, SETTLE))
    assert all(has(run, SETTLE) for run in server.runs[first_wait:])
    assert keys(server.runs[first_wait]) == keys([world(), A, SETTLE, B])


def test_shrinker_without_a_steady_rule_keeps_the_program_that_reproduces_only_sometimes() -> None:
    """The same server, no ``steady``: the shrinker cannot add the wait, and says how often it reproduced."""
    program = [world(), A, step("start_agent", made=["th3"], conn=C1, assistant="support"), B]
    server = Scripted(flaky_unless_settled(settled_fails=True))

    best, _, stats = shrink_program(program, found(program), server, NEVER, clock=frozen, reproduce=3)

    assert keys(best) == keys([world(), A, B]) and stats["reproduced"] < 3
    assert not any(s["rule"] == "settle" for run in server.runs for s in run)


def test_shrinker_adds_no_wait_to_a_program_that_always_reproduces() -> None:
    """Reproduced 3 of 3: no candidate with a wait is run."""
    program = [world(), A, step("start_agent", made=["th3"], conn=C1, assistant="support"), B]
    server = Scripted(when_all(A, B))

    best, _, stats = shrink_program(program, found(program), server, NEVER, clock=frozen,
                                    reproduce=3, steady="settle")

    assert keys(best) == keys([world(), A, B]) and stats["reproduced"] == 3
    assert server.runs_of([world(), A, B])[-3:] == ["isolation"] * 3
    assert not any(s["rule"] == "settle" for run in server.runs for s in run)


def test_shrinker_drops_a_wait_that_makes_the_failure_go_away() -> None:
    """A failure that needs the race: the program with the wait passes once, and is not taken."""
    program = [world(), A, step("start_agent", made=["th3"], conn=C1, assistant="support"), B]
    server = Scripted(flaky_unless_settled(settled_fails=False))

    best, _, stats = shrink_program(program, found(program), server, NEVER, clock=frozen,
                                    reproduce=3, steady="settle")

    assert keys(best) == keys([world(), A, B]) and stats["reproduced"] < 3
    assert server.runs_of([world(), A, SETTLE, B]) == [None]  # one try: a steadier program fails at once


def test_shrinker_records_its_figures_in_session_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    """`shrink`, the live caller's entry, replays with `replay` and fills ``session.stats``."""
    program = [world(), A, step("start_agent", made=["th3"], conn=C1, assistant="support"), B]
    server = Scripted(when_all(A, B))
    session = cast(Session, SimpleNamespace(stats={"steps": 40}))

    def scripted_replay(s: Session, machine: type[TenantMachine], candidate: Program,
                        before: Any = ()) -> tuple[Violation | None, list[str]]:
        assert s is session and machine is TenantMachine and before == ()
        return server(candidate)

    monkeypatch.setattr(runner, "replay", scripted_replay)

    best, violation, reproduced = shrink(session, TenantMachine, program, found(program), NEVER)

    assert keys(best) == keys([world(), A, B]) and violation.invariant == "isolation"
    assert reproduced == runner.REPRODUCE_RUNS  # a failure of the program alone: no waiting step added
    assert list(session.stats) == ["steps", "found_steps", "shrink_s", "shrunk_steps"]
    assert session.stats["found_steps"] == 4 and session.stats["shrunk_steps"] == 3
    assert isinstance(session.stats["shrink_s"], float)


class Recorder:
    """A machine that records the rules run on it, for `replay` (no server: each rule only says so)."""

    ran: list[tuple[str, str]] = []

    def __init__(self, session: Session) -> None:
        self.prefix = f"e{len({p for p, _ in Recorder.ran})}"
        self.refs: dict[str, Any] = {}
        self.outcome = ""
        self.checker = SimpleNamespace(found=False)

    def __getattr__(self, rule: str) -> Any:
        def run(**kwargs: Any) -> None:
            Recorder.ran.append((self.prefix, rule))
            self.outcome = f"ran {rule}"
        return run

    def server_alive(self) -> None:
        pass

    def teardown(self) -> None:
        Recorder.ran.append((self.prefix, "teardown"))


def test_replay_runs_the_earlier_example_first_as_an_example_of_its_own() -> None:
    """``before``: each earlier program on its own machine, torn down, then the program."""
    Recorder.ran = []
    session = cast(Session, SimpleNamespace())
    earlier = [step("world"), step("settle")]

    caught, outcomes = runner.replay(session, cast(type[TenantMachine], Recorder), [step("world"), step("talk")],
                                     before=[earlier])

    assert caught is None and outcomes == ["ran world", "ran talk"]
    assert Recorder.ran == [("e0", "world"), ("e0", "settle"), ("e0", "teardown"),
                            ("e1", "world"), ("e1", "talk"), ("e1", "teardown")]


def test_a_violation_of_the_earlier_example_counts_only_when_the_replay_is_shown() -> None:
    """Shrinking ignores it (it is not the candidate's); `partywall replay` reports it: exit 1."""

    class Leaky(Recorder):
        def teardown(self) -> None:
            super().teardown()
            if self.prefix == "e0":
                raise Violation("isolation", "leaked in the earlier example", {})

    session = cast(Session, SimpleNamespace())
    for show, expected in ((None, None), (lambda *a: None, "leaked in the earlier example")):
        Recorder.ran = []
        caught, outcomes = runner.replay(session, cast(type[TenantMachine], Leaky), [step("world")], show,
                                         before=[[step("world")]])
        assert (caught.title if caught else None) == expected and outcomes == ["ran world"]


def test_shrink_runs_every_candidate_after_the_earlier_example(monkeypatch: pytest.MonkeyPatch) -> None:
    program = [world(), A, step("start_agent", made=["th3"], conn=C1, assistant="support"), B]
    server = Scripted(when_all(A, B))
    session = cast(Session, SimpleNamespace(stats={}))
    earlier = [world(), step("settle")]
    befores: list[Any] = []

    def scripted_replay(s: Session, machine: type[TenantMachine], candidate: Program,
                        before: Any = ()) -> tuple[Violation | None, list[str]]:
        befores.append(before)
        return server(candidate)

    monkeypatch.setattr(runner, "replay", scripted_replay)

    best, _, _ = shrink(session, TenantMachine, program, found(program), NEVER, before=[earlier])

    assert keys(best) == keys([world(), A, B])
    assert befores and all(b == [earlier] for b in befores)


@pytest.mark.parametrize(("owner", "here", "earlier"), [
    ("pw3ecac3e5-acme", "pw3ecac3e7-acme", True),    # leaked from example 5 into example 7
    ("pw3ecac3e7-globex", "pw3ecac3e7-acme", False),  # within one example
    ("pw3ecac3e12-acme", "pw3ecac3e7-acme", False),  # a later example's (not a leak across time)
    ("acme-prod", "globex-prod", False),              # provisioned tenants: no example in their names
])
def test_a_leak_from_an_earlier_example_is_named(owner: str, here: str, earlier: bool) -> None:
    """A finding whose data is of an earlier example says so: no program of one example replays it."""
    found = runner.earlier_example({"owner_tenant": owner, "tenant": here})
    assert found == (owner if earlier else None)
    assert runner.earlier_example({"tenant": here}) is None


def test_the_program_run_first_is_the_one_of_the_example_whose_data_leaked() -> None:
    """`earlier_programs` finds it by the leaked data's tenant prefix, among every example that ran."""
    five, six = [world(), A], [world(), B]
    session = cast(Session, SimpleNamespace(example_programs={"pw3ecac3e5-": five, "pw3ecac3e6-": six}))

    def leak(owner: str) -> Violation:
        return Violation("isolation", "leak", {"owner_tenant": owner, "tenant": "pw3ecac3e7-acme"})

    assert runner.earlier_programs(session, leak("pw3ecac3e5-globex")) == [five]
    assert runner.earlier_programs(session, leak("pw3ecac3e6-acme")) == [six]
    assert runner.earlier_programs(session, leak("pw3ecac3e7-globex")) == []  # within one example
    assert runner.earlier_programs(session, leak("pw3ecac3e4-acme")) == []  # a program not kept
