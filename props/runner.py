"""Running a machine as a property: failures kept, re-run, written as replay files.

Against a real server a shrunk failure may not reproduce on the next try, and
Hypothesis then raises a flaky-failure error. A leak seen once is real, so
the runner never loses it: it takes the violation from the run's record, not
from the exception, re-runs the shrunk program a few times to say how often
it reproduces, and writes a replay file for `partywall replay`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test
from partywall_props.invariants import percentile_violations
from partywall_props.machine import ConnRef, TenantMachine, ThreadRef
from partywall_strategies import AtLimit, ContentPlan

from partywall.errors import HarnessError, Violation
from partywall.session import Session

REPRODUCE_RUNS = 3


def run_property(session: Session, machine: type[TenantMachine] = TenantMachine) -> None:
    """Run the machine under the current Hypothesis profile; shrink, report and re-raise any violation."""
    try:
        # A factory, so each example's machine gets this run's session (Hypothesis's public API).
        run_state_machine_as_test(lambda: machine(session), settings=settings())
    except HarnessError:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure is reported below, then re-raised
        failure = session.failures[0] if session.failures else None
        if failure is None or failure["violation"] is None:
            raise
        found = Violation(**failure["violation"])
        # Examples generated until the failure (the replays of shrinking count as examples too).
        session.stats["found_at_example"] = session.stats.get("examples", 0)
        budget = float(session.config.get("shrink_seconds", 40))
        # A leak of an earlier example's data: that example's program runs first in every
        # candidate and re-run, so what the server kept of it is there again.
        before = earlier_programs(session, found)
        program, violation, k = shrink(session, machine, failure["program"], found, budget, before=before)
        # What the shrunk program's leak came from may be another example (a candidate or re-run
        # of the shrinker that ran just before it): the replay file runs that one first.
        leaked_from = earlier_programs(session, violation)
        if leaked_from and leaked_from != before:
            before = leaked_from  # the re-runs, as the replay file will run it
            k = sum(1 for _ in range(REPRODUCE_RUNS)
                    if _same(replay(session, machine, program, before=before)[0], found))
        earlier = earlier_example(violation.evidence) or earlier_example(found.evidence)
        failure = {**failure, "program": program, "violation": violation.to_json(), "before": before}
        path = write_replay(session, failure, f"{k}/{REPRODUCE_RUNS}")
        detail = (f"Shrunk from {session.stats.get('found_steps')} to {len(program)} steps "
                  f"in {session.stats.get('shrink_s')} s; reproduced {k}/{REPRODUCE_RUNS} on re-runs.\n"
                  + (f"What leaked is of tenant {earlier!r}, of an earlier example, which the server still "
                     + (f"held when this one ran: the replay runs that example's program ({len(before[0])} steps) "
                        "first.\n" if before else
                        "held when this one ran: this example's program alone may not bring it back.\n")
                     if earlier else "")
                  + f"Replay: partywall replay {path}\n{format_program(program)}")
        session.report(violation, f"{k}/{REPRODUCE_RUNS}", str(path), detail)
        raise Violation(violation.invariant, f"{violation.title}\n\n{detail}", violation.evidence,
                        violation.check) from (exc if not isinstance(exc, Violation) else None)
    finally:
        session.stats["steps_per_second"] = _rate(session)
    for v in percentile_violations(session.samples, session.config["timing"]):
        session.report(v)
    bad = [v for v in session.violations if v.violation.invariant == "timing" and "p95" in v.violation.title]
    if bad:
        raise bad[0].violation


#: A tenant id the session made: its run and example (`Session.next_prefix`).
_EXAMPLE_TENANT = re.compile(r"^pw[0-9a-f]+e(\d+)-")


def earlier_example(evidence: dict[str, Any]) -> str | None:
    """The tenant whose data leaked, when it is of an earlier example than the connection it
    reached (a leak across examples, which no program of one example replays); else None."""
    owner = _EXAMPLE_TENANT.match(str(evidence.get("owner_tenant", "")))
    here = _EXAMPLE_TENANT.match(str(evidence.get("tenant", "")))
    if owner is None or here is None or int(owner.group(1)) >= int(here.group(1)):
        return None
    return str(evidence["owner_tenant"])


def earlier_programs(session: Session, violation: Violation) -> list[list[dict[str, Any]]]:
    """The program of the earlier example whose data the violation found leaked, as a list of
    programs to run first (empty when the leak is within one example, or its program is unknown)."""
    earlier = earlier_example(violation.evidence)
    program = session.example_programs.get(prefix_of(earlier)) if earlier else None
    return [program] if program else []


def prefix_of(tenant: str) -> str:
    """The example's tenant prefix (`Session.next_prefix`) of a tenant id the session made."""
    found = _EXAMPLE_TENANT.match(tenant)
    return found.group(0) if found else ""


def _same(caught: Violation | None, found: Violation) -> bool:
    """The same finding: the same invariant and, where it is known, the same check, so that
    shrinking and re-runs cannot slide onto another bug under the same invariant."""
    return (caught is not None and caught.invariant == found.invariant
            and (found.check is None or caught.check == found.check))


#: Simpler values to try for a step's plain arguments, by argument name.
SIMPLER: dict[str, list[Any]] = {
    "first": ["acme"], "second": ["globex"], "base": ["acme"], "uid": ["alice"], "assistant": ["helper"],
    "via": ["header"], "abrupt": [False], "limit": [None], "i": [0], "then": ["stay"],
    "plan": [{"content": ["short", ""]}],
}


#: Marks the waiting step `shrink_program` put in (its ``steady``): no later stage removes it.
PINNED = "_pinned"
#: The machine's rule that waits until every request is answered (and then lists each party's threads).
STEADY = "settle"

#: Runs a candidate program: (the violation it raised or None, each step's outcome);
#: raises HarnessError when the candidate is not a valid program. `replay`, bound to a session.
Replay = Callable[[list[dict[str, Any]]], tuple[Violation | None, list[str]]]


def shrink(session: Session, machine: type[TenantMachine], program: list[dict[str, Any]], found: Violation,
           budget_s: float, before: Sequence[list[dict[str, Any]]] = ()) -> tuple[list[dict[str, Any]], Violation, int]:
    """Shrink a failing program by replaying candidates against the server, within a time budget;
    (the program, its violation, how many of `REPRODUCE_RUNS` re-runs of it failed the same way).

    Hypothesis's own shrinker re-runs the whole machine hundreds of times;
    against a live server at 0.1-1 s a run that takes longer than a proof
    may. This one is delta debugging over steps (remove halves, quarters...,
    single steps), then simpler argument values, keeping a candidate only if
    it fails with the *same invariant* (so shrinking cannot slide onto
    another bug), and stops when the budget is spent, keeping the best so far.
    The work is `shrink_program`'s; this runs its candidates with `replay`
    (each after the programs ``before``, unchanged) and records the steps
    found and kept and the seconds taken in ``session.stats``.
    """
    session.stats["found_steps"] = len(program)
    best, best_v, stats = shrink_program(program, found, lambda candidate: replay(session, machine, candidate,
                                                                                  before=before),
                                         budget_s, reproduce=REPRODUCE_RUNS,
                                         steady=STEADY if hasattr(machine, STEADY) else None)
    reproduced = stats.pop("reproduced")
    session.stats.update(stats)
    return best, best_v, reproduced


def shrink_program(program: list[dict[str, Any]], found: Violation, run: Replay, budget_s: float,
                   clock: Callable[[], float] = time.monotonic, *, reproduce: int = 0, steady: str | None = None,
                   ) -> tuple[list[dict[str, Any]], Violation, dict[str, Any]]:
    """The shrunk program, its violation, and ``found_steps``, ``shrunk_steps`` and ``shrink_s``
    (and ``reproduced``, with ``reproduce``).

    In order: cut the steps after the one during which the violation was seen
    (``found.evidence["step"]``, 1-based); keep only that step and the steps that
    made what it names (`slice_of`), if that fails in each of three runs; drop
    every step of one rule at once,
    rule by rule; remove halves, quarters... single steps; try the `SIMPLER`
    argument values. The opening `world` step is never removed. A candidate is
    kept only if ``run`` raises the same finding with it (`_same`: the invariant
    and the check), tried up to three
    times (a failure against a live server may not reproduce every time; one
    refused is not run again when another stage proposes it), and
    is kept as far as ``run`` got (its outcomes, written into each step's
    ``then``); a candidate ``run`` refuses with HarnessError is not a valid
    program. The cut always runs; after it, once ``clock`` reaches the budget
    no further candidate is started and the best so far is returned.

    With ``reproduce``, the result is then run that many times, and
    ``reproduced`` counts the runs that failed the same way (these runs are
    not bounded by the budget). When not all did and ``steady`` names a rule
    without arguments that waits until every request is answered, the budget
    left goes on a steadier program: that step put just before the one that
    saw the violation, kept if the program still fails, shrunk again around
    it (it stays), and taken instead if it reproduces more often. What the
    violation is seen in then no longer depends on how fast earlier replies came.
    ``run`` and ``clock`` are its only contact with the world (tests script both).
    """
    deadline = clock() + budget_s
    started = clock()
    best, best_v = list(program), found

    refused: set[str] = set()

    def fails(candidate: list[dict[str, Any]], tries: int = 3,
              every_time: bool = False) -> tuple[Violation, list[dict[str, Any]]] | None:
        """(the violation, the steps that ran) when the candidate breaks the same invariant (with
        ``every_time``: in each of the ``tries`` runs)."""
        # A candidate refused once is not run again when another stage proposes it.
        key = json.dumps([[step["rule"], step["args"], PINNED in step] for step in candidate], sort_keys=True,
                         default=str)
        if key in refused:
            return None
        # Up to three tries: against a live server a failing program may pass by chance
        # (a race lost, random ids that happened to sort right); one lucky pass must not
        # undo a step. A candidate that fails at the first try costs one run.
        for _ in range(tries):
            try:
                caught, outcomes = run(candidate)
            except HarnessError:
                refused.add(key)
                return None  # a step refers to something a removed step made: not a valid program
            if _same(caught, found) != every_time:
                break  # decided: one failure is enough, or (``every_time``) one pass is one too many
        if not _same(caught, found):
            refused.add(key)
            return None
        ran = candidate[: len(outcomes)]  # a replay stops at the step that broke it
        for step, outcome in zip(ran, outcomes, strict=True):
            step["then"] = outcome  # what each step did in the run that is kept
        assert caught is not None
        return caught, ran

    # First cut everything after the step during which the violation was seen: later
    # steps cannot have caused it. Cheap, and usually most of the shrinking.
    seen_at = found.evidence.get("step")
    if isinstance(seen_at, int) and 0 < seen_at < len(best):
        result = fails([dict(step) for step in best[:seen_at]])
        if result is not None:
            best_v, best = result
    # The opening `world` step makes what every later step refers to: it stays.
    first = 1 if best and best[0]["rule"] == "world" else 0
    # Then the step that saw it with only the steps that made what it names: often the whole
    # cause, found in a few runs instead of one run per step removed (each of which, when what
    # broke is a missing reply, waits out the reply limit). So big a jump is taken only if it
    # fails every time: a slice that fails now and then would trade a program that fails for
    # what it does for one that fails for how fast the server was.
    seen = seen_at if isinstance(seen_at, int) and first < seen_at <= len(best) else len(best)
    if seen > first and clock() < deadline:
        sliced = slice_of(best[:seen], first)
        result = fails(sliced, every_time=True) if len(sliced) < len(best) else None
        if result is not None:
            best_v, best = result

    def smaller(best: list[dict[str, Any]], best_v: Violation) -> tuple[list[dict[str, Any]], Violation]:
        # Drop whole kinds of step at once (every ping, every bad frame, every crash...):
        # one run each, and most kinds have nothing to do with the failure.
        for kind in sorted({step["rule"] for step in best[first:]}, key=lambda k: -sum(st["rule"] == k for st in best)):
            if clock() >= deadline:
                break
            candidate = [dict(step) for i, step in enumerate(best)
                         if i < first or step["rule"] != kind or PINNED in step]
            result = fails(candidate) if len(candidate) < len(best) else None
            if result is not None:
                best_v, best = result
        chunk = max(1, (len(best) - first) // 2)
        while chunk >= 1 and clock() < deadline:
            i, removed = first, False
            while i < len(best) and clock() < deadline:
                if any(PINNED in step for step in best[i:i + chunk]):
                    i += chunk
                    continue
                candidate = [dict(step) for step in best[:i] + best[i + chunk:]]
                result = fails(candidate) if candidate else None
                if result is not None:
                    (best_v, best), removed = result, True
                else:
                    i += chunk
            if not removed:
                chunk //= 2
        for idx in range(len(best)):
            if idx >= len(best):
                break
            for name, value in list(best[idx]["args"].items()):
                for simpler in SIMPLER.get(name, []):
                    if clock() >= deadline or value == simpler:
                        break
                    candidate = [dict(s, args=dict(s["args"])) for s in best]
                    candidate[idx]["args"][name] = simpler
                    result = fails(candidate)
                    if result is not None and len(result[1]) > idx:
                        best_v, best = result
        return best, best_v

    def reproduced(program: list[dict[str, Any]]) -> int:
        return sum(1 for _ in range(reproduce) if _same(run([dict(step) for step in program])[0], found))

    best, best_v = smaller(best, best_v)
    stats: dict[str, Any] = {"found_steps": len(program)}
    if reproduce:
        k = reproduced(best)
        # The kept program ends at the step that saw the violation: wait for everything before it.
        if (k < reproduce and steady is not None and clock() < deadline and len(best) - 1 > first
                and best[-2]["rule"] != steady):
            wait = {"rule": steady, "args": {}, "then": None, "made": [], PINNED: True}
            result = fails([dict(step) for step in best[:-1]] + [wait, dict(best[-1])], tries=1)
            if result is not None:
                steadier, steadier_v = smaller(result[1], result[0])
                k_steadier = reproduced(steadier)
                if k_steadier > k:
                    best, best_v, k = steadier, steadier_v, k_steadier
        stats["reproduced"] = k
    best = [{key: value for key, value in step.items() if key != PINNED} for step in best]
    stats.update({"shrink_s": round(clock() - started, 1), "shrunk_steps": len(best)})
    return best, best_v, stats


def _names(value: Any) -> set[str]:
    """The objects (connections, threads, tenants...) a recorded argument names."""
    if isinstance(value, dict) and "ref" in value:
        return {str(value["ref"])}
    if isinstance(value, dict):
        return {n for v in value.values() for n in _names(v)}
    if isinstance(value, list):
        return {n for v in value for n in _names(v)}
    return set()


def slice_of(program: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
    """The program's first ``first`` steps, its last step, and, in order, every step that made
    something the last step names, or names something a kept step needs (copies)."""
    keep, needed = {len(program) - 1}, _names(program[-1]["args"])
    for i in range(len(program) - 2, first - 1, -1):
        if needed & set(program[i].get("made", ())):
            keep.add(i)
            needed |= _names(program[i]["args"])
    return [dict(step) for i, step in enumerate(program) if i < first or i in keep]


def _rate(session: Session) -> float | None:
    steps = session.stats.get("steps", 0)
    return round(steps / max(1e-9, time.time() - session.started), 1) if steps else None


def format_program(program: list[dict[str, Any]]) -> str:
    lines = []
    for i, step in enumerate(program, 1):
        args = ", ".join(f"{k}={_show(v)}" for k, v in step["args"].items())
        lines.append(f"  {i:>2}. {step['rule']}({args})  # {step.get('then') or ''}")
    return "\n".join(lines)


def _show(v: Any) -> str:
    if isinstance(v, dict) and "ref" in v:
        return str(v["ref"])
    if isinstance(v, dict) and "content" in v:
        size, text = v["content"]
        return f"ContentPlan({size!r}, {text!r})" if len(text) < 40 else f"ContentPlan({size!r}, {text[:37]!r}...)"
    if isinstance(v, dict) and "at_limit" in v:
        return repr(AtLimit(*v["at_limit"]))
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def decode_arg(value: Any, refs: dict[str, Any]) -> Any:
    """A recorded argument as a value; ``refs`` maps recorded names to this run's objects."""
    if isinstance(value, dict) and "ref" in value:
        if value["ref"] not in refs:
            raise HarnessError(f"the replay refers to {value['ref']!r}, which no earlier step made.")
        return refs[value["ref"]]
    if isinstance(value, dict) and "content" in value:
        return ContentPlan(*value["content"])
    if isinstance(value, dict) and "at_limit" in value:
        return AtLimit(*value["at_limit"])
    if isinstance(value, list):
        return [decode_arg(v, refs) for v in value]
    return value


def replay(session: Session, machine_cls: type[TenantMachine], program: list[dict[str, Any]],
           show: Any = None, before: Sequence[list[dict[str, Any]]] = ()) -> tuple[Violation | None, list[str]]:
    """Run a recorded program step by step; return the violation it raises (or None) and each step's outcome.

    The programs ``before`` run first, each as an example of its own, as the
    examples before a leak that spans examples did. While shrinking (no
    ``show``) what they raise is not this program's finding; shown step by
    step (``partywall replay``), it is told as step 0, and returned when the
    program itself raises nothing: the server broke an invariant all the same."""
    earlier_caught: Violation | None = None
    for earlier in before:
        caught, _ = _replay_one(session, machine_cls, earlier, None)
        earlier_caught = earlier_caught or caught
        if show is not None:
            show(0, {"rule": "(the earlier example)", "then": f"{len(earlier)} steps"},
                 f"ran; {'[' + caught.invariant + '] ' + caught.title if caught else 'no violation'}")
    caught, outcomes = _replay_one(session, machine_cls, program, show)
    return (caught or (earlier_caught if show is not None else None)), outcomes


def _replay_one(session: Session, machine_cls: type[TenantMachine], program: list[dict[str, Any]],
                show: Any) -> tuple[Violation | None, list[str]]:
    m = machine_cls(session)
    outcomes: list[str] = []
    caught: Violation | None = None
    alias: dict[str, Any] = {}
    try:
        for i, step in enumerate(program, 1):
            rule = getattr(m, step["rule"], None)
            if rule is None:
                raise HarnessError(f"the replay names a rule {step['rule']!r} this machine does not have.")
            kwargs = {k: decode_arg(v, alias) for k, v in step["args"].items()}
            before = set(m.refs)
            rule(**kwargs)
            made = [name for name in m.refs if name not in before]
            # Steps removed by shrinking shift the names later steps get; map the
            # names the original run recorded onto the objects made now.
            for old, new in zip(step.get("made", made), made, strict=False):
                alias[old] = m.refs[new]
            outcomes.append(m.outcome)
            if show is not None:
                show(i, step, m.outcome)
            m.server_alive()
            if show is None and m.checker.found:
                break  # shrinking: the violation is in; the remaining steps cannot undo it
    except Violation as v:
        caught = v
    finally:
        try:
            m.teardown()
        except Violation as v:
            caught = caught or v
    return caught, outcomes


def write_replay(session: Session, failure: dict[str, Any], reproduced: str) -> Path:
    session.replay_dir.mkdir(parents=True, exist_ok=True)
    v = failure["violation"]
    path = session.replay_dir / f"{v['invariant']}-{session.seed}-{session.run_id}.json"
    path.write_text(json.dumps({
        "format": "partywall-replay/1",
        "machine": "partywall_props.machine:TenantMachine",
        "seed": session.seed,
        "profile": session.profile,
        "run_id": session.run_id,
        "target": session.target.describe(),
        "violation": v,
        "reproduced": reproduced,
        "program": failure["program"],
        "before": failure.get("before", []),
        "replay": f"partywall replay {path}",
    }, indent=2, ensure_ascii=True, default=str) + "\n")
    return path


__all__ = ["ConnRef", "ThreadRef", "replay", "run_property", "write_replay"]
