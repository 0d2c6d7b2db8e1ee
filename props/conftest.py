"""The invariant listing (a hook of the property package, which defines the invariants)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("partywall_list_invariants", False):
        return
    from partywall_props.invariants import INVARIANTS

    verbose = bool(config.getoption("partywall_list_checks", False))
    checks = INVARIANTS.select()
    for name in INVARIANTS.names:
        print(f"{name:<13} {INVARIANTS.doc(name)}")
        if verbose:  # each registered check under its invariant (docs/coverage.md names them)
            for inv in (c for c in checks if c.name == name):
                print(f"    {inv.check:<26} {' '.join((inv.fn.__doc__ or '').split())}")
    config.hook.pytest_deselected(items=list(items))
    items[:] = []
