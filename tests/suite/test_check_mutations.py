"""Every check is needed by some recorded-history test: neuter it and `test_invariants.py` fails.

Rules: one mutant per check function, taken from the registry at collection
time (so a check registered later is covered without editing this file),
plus the run-level `percentile_violations`. A mutant replaces that one check
with one that finds nothing and runs `test_invariants.py` in-process
(pytester's ``inline_run``); at least one of its tests must fail, or the
check is one no test depends on and the mutant's id names it. The swap is
made by a plugin of the inner run, which proves it took effect: the inner run
imports the very `partywall_props.invariants` module object this one does,
and the neutered check is called. Everything is put back when the inner run
ends, and checked to be. A control runs the same file with nothing neutered
and requires it to pass. No sockets, no subprocesses.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import partywall_props.invariants as invariants_module
import pytest
from partywall_props.invariants import INVARIANTS

from partywall.checks import Invariant

pytest_plugins = ["pytester"]

SUITE = Path(__file__).with_name("test_invariants.py")
PERCENTILES = invariants_module.percentile_violations


@attrs.frozen
class Mutant:
    """One check to neuter: a registered one (``registered``), or a plain function of the module."""

    check: str
    fn: Callable[..., Any]
    registered: Invariant | None = None


def mutants() -> list[Mutant]:
    found = [Mutant(inv.check, inv.fn, inv) for inv in INVARIANTS.select()]
    found.append(Mutant(PERCENTILES.__name__, PERCENTILES))
    return found


class Neuter:
    """A plugin of the inner run: ``mutant``'s check finds nothing while the inner session lasts.

    A registered check is swapped where the `Checker` reads it, the registry's
    stored `Invariant`; every module-level name bound to the check's function
    (its own module's, and those the collected test modules imported) is
    rebound too, so a test that calls the function directly gets the neutered
    one. With no mutant the plugin only checks the module identity.
    """

    def __init__(self, mutant: Mutant | None) -> None:
        self.mutant = mutant
        self.calls = 0
        self.module_identity: list[tuple[str, bool]] = []
        """(collected test module, whether it sees this process's invariants module and registry)."""
        self._patch = pytest.MonkeyPatch()

    def neutered(self, *args: Any, **kwargs: Any) -> Iterator[Any] | list[Any]:
        self.calls += 1
        assert self.mutant is not None
        return [] if self.mutant.registered is None else iter(())

    def _swap(self, module: ModuleType) -> None:
        assert self.mutant is not None
        for name, value in list(vars(module).items()):
            if value is self.mutant.fn:
                self._patch.setattr(module, name, self.neutered)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.mutant is None:
            return
        inv = self.mutant.registered
        if inv is not None:
            stored = INVARIANTS._by_name[inv.name]
            swapped = [attrs.evolve(i, fn=self.neutered) if i is inv else i for i in stored]
            self._patch.setitem(INVARIANTS._by_name, inv.name, swapped)
        self._swap(invariants_module)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        seen: dict[str, ModuleType] = {}
        for item in items:
            module = item.getparent(pytest.Module)
            if module is not None:
                seen.setdefault(module.nodeid, module.obj)
        for nodeid, module_obj in seen.items():
            same = sys.modules.get(invariants_module.__name__) is invariants_module and all(
                value is INVARIANTS for value in vars(module_obj).values() if isinstance(value, type(INVARIANTS))
            )
            self.module_identity.append((nodeid, same))
            if self.mutant is not None:
                self._swap(module_obj)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back everything swapped (again is harmless)."""
        self._patch.undo()


def run_suite(pytester: pytest.Pytester, config: pytest.Config, plugin: Neuter) -> pytest.HookRecorder:
    args = [str(SUITE), "-q", "-p", "no:cacheprovider"]
    if config.pluginmanager.has_plugin("timeout"):
        args.append("--timeout=0")  # the inner run must not take over the outer test's alarm
    recorder = pytester.inline_run(*args, plugins=[plugin])
    assert recorder.getfailedcollections() == [], "test_invariants.py did not collect"
    assert plugin.module_identity, "the inner run collected no test module"
    assert all(same for _, same in plugin.module_identity), (
        f"the inner run did not use this process's {invariants_module.__name__}: {plugin.module_identity}"
    )
    return recorder


def assert_restored(original: list[Invariant]) -> None:
    assert INVARIANTS.select() == original, "the registry was not restored"
    assert all(getattr(invariants_module, inv.check, inv.fn) is inv.fn for inv in original)
    assert invariants_module.percentile_violations is PERCENTILES
    assert invariants_module.percentile_violations is PERCENTILES


@pytest.mark.parametrize("mutant", mutants(), ids=lambda m: m.check)
def test_check_needed_by_a_recorded_history(pytester: pytest.Pytester, request: pytest.FixtureRequest,
                                            mutant: Mutant) -> None:
    original = INVARIANTS.select()
    plugin = Neuter(mutant)
    try:
        recorder = run_suite(pytester, request.config, plugin)
    finally:
        plugin.restore()
    assert_restored(original)
    assert plugin.calls > 0, (
        f"{mutant.check} was never called in test_invariants.py with the swap in place"
        + ("" if mutant.registered is None else " (the swap did not take effect)")
    )
    passed, _, failed = recorder.listoutcomes()
    assert failed, (
        f"no test of test_invariants.py fails when {mutant.check} finds nothing: "
        f"all {len(passed)} passed; add a recorded history that {mutant.check} must flag"
    )


def test_check_mutations_control_passes_unmutated(pytester: pytest.Pytester,
                                                  request: pytest.FixtureRequest) -> None:
    original = INVARIANTS.select()
    recorder = run_suite(pytester, request.config, Neuter(None))
    passed, skipped, failed = recorder.listoutcomes()
    assert not failed, [r.nodeid for r in failed]
    assert passed and not skipped
    assert_restored(original)


def test_check_names_are_unique() -> None:
    checks = [m.check for m in mutants()]
    assert len(set(checks)) == len(checks), "two checks share a function name: reports and mutant ids would be ambiguous"
