"""Markers of the property modules (the plugin selects by them), and the invariant listing."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "partywall_replay: the replay runner; runs only with --partywall-replay")
    config.addinivalue_line("markers", "partywall_bench: the 100-user benchmark; runs under the bench profile")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("partywall_list_invariants", False):
        return
    from props.invariants import INVARIANTS

    for name in INVARIANTS.names:
        print(f"{name:<13} {INVARIANTS.doc(name)}")
    config.hook.pytest_deselected(items=list(items))
    items[:] = []


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under the bench profile, ``-n N`` hands the bench test to every worker.

    xdist's default scheduling gives the one bench test to one worker; the
    bench is sharded instead, each worker running its share of the plan's
    users (worker gwK runs shard K of N), so every worker must run it.
    """
    from hypothesis import settings

    if settings._current_profile != "bench":  # noqa: SLF001 - the profile pytest loaded
        return None
    from xdist.scheduler import EachScheduling

    return EachScheduling(config, log)
