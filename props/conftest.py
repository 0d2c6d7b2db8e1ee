"""The invariant listing (a hook of the property package, which defines the invariants)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("partywall_list_invariants", False):
        return
    from partywall_props.invariants import INVARIANTS

    for name in INVARIANTS.names:
        print(f"{name:<13} {INVARIANTS.doc(name)}")
    config.hook.pytest_deselected(items=list(items))
    items[:] = []
