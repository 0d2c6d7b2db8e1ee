"""The properties partywall checks, run through pytest.

`test_tenants_stay_apart` generates interleavings of tenants connecting,
starting agents, talking, reading and disconnecting, drives them
concurrently against the target, and checks every invariant on every frame.
The replay runner runs only with ``--partywall-replay FILE``.
"""

from __future__ import annotations

import json

import pytest
from partywall_props.machine import TenantMachine
from partywall_props.runner import format_program, replay, run_property

from partywall.session import Session


def test_tenants_stay_apart(partywall_session: Session) -> None:
    run_property(partywall_session, TenantMachine)


@pytest.mark.partywall_replay
def test_replay(partywall_session: Session, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    path = request.config.getoption("partywall_replay")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    program = data["program"]
    was = data.get("violation") or {}

    def show(i: int, step: dict, now: str) -> None:
        with capsys.disabled():
            print(f"step {i:>2} {step['rule']}")
            print(f"   then: {step.get('then')}")
            print(f"   now:  {now}")

    before = data.get("before") or []
    with capsys.disabled():
        print(f"\nreplaying {path}: {len(program)} steps; recorded violation: [{was.get('invariant')}] {was.get('title')}")
        print(format_program(program))
        if before:
            print(f"before it, as step 0: the program of the earlier example whose data leaked "
                  f"({len(before[0])} steps, the file's 'before'), as it ran then")
    caught, _ = replay(partywall_session, TenantMachine, program, show, before=before)
    with capsys.disabled():
        print(f"now: {'[' + caught.invariant + '] ' + caught.title if caught else 'no violation'}")
    if caught is not None:
        partywall_session.report(caught, None, path)
        raise caught
