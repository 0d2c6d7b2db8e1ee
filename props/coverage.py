"""What a run reached: the coverage summary written to the report after each run.

Folded from each generated example's program (its rules and drawn arguments)
and model (what was sent and answered): which operations were sent and how
often, the races (bursts fired at one instant and their size, probes across
tenants and users, the most requests in flight at once), the states
(connections, threads and tenants per example, crashes) and the sizes
(message size classes, malformed frame kinds, refused token kinds). Budgets
and weights of the state machine are tuned by it (README: "What a run
reaches").
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from partywall_props.model import Model


def fold_example(coverage: dict[str, Any], program: list[dict[str, Any]], model: Model) -> None:
    """Add one example's program and model to the run's ``coverage`` (a JSON-ready dict)."""
    count = _counter(coverage, "operations")
    for req in model.reqs.values():
        count[req.type.split(":")[0] if req.type.startswith("raw:") else req.type] += 1
    count["connect"] += len(model.conns)
    races = _counter(coverage, "races")
    sizes = _counter(coverage, "sizes")
    bad = _counter(coverage, "bad_input")
    for step in program:
        args = step["args"]
        plan = args.get("plan")
        if isinstance(plan, dict) and "content" in plan and step["rule"] in ("talk", "probe", "burst"):
            sizes[plan["content"][0]] += 1
        for plan in args.get("plans", []):
            sizes[plan["content"][0]] += 1
        if step["rule"] == "burst":
            races[f"burst of {min(len(args.get('kinds', [])), 6)}"] += 1
        elif step["rule"] == "bad_token":
            bad["token: every kind"] += 1
        elif step["rule"] == "bad_frame":
            bad[f"frame: every kind{', then ' + args['closing'] if args.get('closing') else ''}"] += 1
        elif step["rule"] == "bad_name":
            bad["name"] += 1  # one bucket: names are many
    for probe in {id(p): p for p in model.probes.values()}.values():
        races[f"probe across {'tenants' if probe.get('whose', 'another tenant') == 'another tenant' else 'users'}"] += 1
    races["max in flight"] = max(races.get("max in flight", 0), _max_in_flight(model))
    states = _counter(coverage, "states")
    states["examples"] += 1
    states["crashes"] += model.crashes
    for key, value in (("max connections in an example", len(model.conns)),
                       ("max threads in an example", len(model.threads)),
                       ("max steps in an example", len(program)),
                       ("max tenants in an example", len({c.tenant for c in model.conns.values()}))):
        states[key] = max(states.get(key, 0), value)
    for key, value in _counter(coverage, "operations").items():
        coverage["operations"][key] = value


def _counter(coverage: dict[str, Any], key: str) -> Counter[str]:
    found = coverage.get(key)
    if not isinstance(found, Counter):
        found = coverage[key] = Counter(found or {})
    return found


def _max_in_flight(model: Model) -> int:
    """The most requests of this example in flight at one instant (sent, not yet answered)."""
    edges = []
    for req in model.reqs.values():
        edges.append((req.t, 1))
        if req.done_t is not None:
            edges.append((req.done_t, -1))
    peak = level = 0
    for _, step in sorted(edges):
        level += step
        peak = max(peak, level)
    return peak
