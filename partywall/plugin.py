"""The pytest plugin (entry point ``pytest11``): settings, profiles, the run, the report.

Every option of the ``partywall`` command is a pytest option too, named by
the rule of `partywall.config` (``--server-url`` is ``--partywall-server-url``,
``--profile`` is ``--partywall-profile``, and so on), with the same layers
beneath it (packaged defaults, the project's ``[tool.partywall]``,
``PARTYWALL_<OPTION>`` variables). The plugin registers the Hypothesis
profiles of the settings and loads the one in force, and gives the
properties a session-scoped ``partywall_session`` fixture: the target started
(or reached), the driver running, the run's seed, registry and report.

The plugin owns one `Run` per pytest session, kept in ``config.stash`` under
`RUN_KEY`: the settings, the profile, the seed, the `Session` once it exists,
and the reason the run could not be made, if any. The ``partywall`` command
reads it back through the same key; nothing else is shared.

Hypothesis profiles and the ``CI`` variable: Hypothesis loads a built-in
profile named ``ci`` whenever ``CI`` is set. partywall does the same with
its own ``ci`` profile (fixed seed, no example database, deadline off)
unless a profile is named in any layer; ``--hypothesis-profile`` names one
too.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from partywall import config as configmod
from partywall.errors import HarnessError, Violation
from partywall.session import Session, session_from_settings

#: The profile of the 100-user benchmark; not one a project configures.
BENCH_PROFILE = "bench"
#: Each mode of a session: what it runs, and the pytest option that makes a session of it (none: the properties).
MODE_JOBS = {"run": ("the properties", ""), "bench": ("the bench", f"--hypothesis-profile={BENCH_PROFILE}"),
             "replay": ("a replay", "--partywall-replay FILE")}


def _switch(to: str, now: str) -> str:
    """What to change on the command line to turn a session of mode ``now`` into one of mode ``to``."""
    parts = ([f"add {MODE_JOBS[to][1]}"] if MODE_JOBS[to][1] else []) + (
        [f"leave out {MODE_JOBS[now][1]}"] if MODE_JOBS[now][1] else [])
    return " and ".join(parts)


@attrs.define(eq=False)
class Run:
    """One pytest session of partywall: what the plugin, the properties and the CLI share."""

    settings: configmod.Settings
    profile: str
    """The Hypothesis profile in force (``bench`` for the benchmark)."""
    seed: int
    """The run's one seed: markers, and Hypothesis's generation."""
    mode: str = attrs.field(validator=attrs.validators.in_({"run", "bench", "replay"}))
    session: Session | None = None
    """The suite's session, once a property asked for it."""
    error: str | None = None
    """Why the run could not be made or was cut short (exit 2); None when it ran."""
    on_example: Callable[[Session], None] | None = None
    """Called after each example (the CLI's progress line)."""
    report_written: bool = False
    """The JSON report is written already (a sharded bench's launcher writes its own, whatever happens)."""

    def fail(self, message: str) -> None:
        """Record that the run could not be made (the first reason wins)."""
        self.error = self.error or message
        if self.session is not None:
            self.session.error = self.session.error or message

    @property
    def violations(self) -> list[Any]:
        return list(self.session.violations) if self.session is not None else []


RUN_KEY = pytest.StashKey[Run]()


def get_run(config: pytest.Config) -> Run | None:
    """The plugin's `Run` of this pytest session (None when the plugin did not configure one)."""
    return config.stash.get(RUN_KEY, None)


def register_profiles(table: dict[str, Any]) -> None:
    """Register every profile of the settings, and the bench's, with Hypothesis."""
    common: dict[str, Any] = dict(
        deadline=None,  # a step's network time is checked by the `timing` invariant, not here
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=True,
    )
    for name, prof in table["profiles"].items():
        db = DirectoryBasedExampleDatabase(".hypothesis/examples") if prof["database"] else None
        settings.register_profile(
            name,
            max_examples=int(prof["max_examples"]),
            stateful_step_count=int(prof["stateful_step_count"]),
            derandomize=bool(prof["derandomize"]),
            database=db,
            # Hypothesis's shrinker re-runs the machine hundreds of times, which against a
            # live server takes minutes; partywall_props.runner shrinks the recorded program
            # by replay instead, within [tool.partywall] shrink_seconds. Nor is there a target
            # phase: its hill-climbing tries one changed choice at a time, a whole example each,
            # without bound under a profile of fewer than 1,000 examples (the ci profile, 74 s
            # against the clean server, ran past 15 minutes in it against one planted fault).
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            verbosity=Verbosity.normal,
            **common,
        )
    settings.register_profile(BENCH_PROFILE, max_examples=1, database=None,
                              phases=[Phase.explicit, Phase.generate], **common)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("partywall", "partywall: the server under test and the run")
    for opt in configmod.OPTIONS:
        opt.add_to(group.addoption, pytest=True)
    group.addoption("--partywall-replay", default=None, metavar="FILE", help="replay this failure file step by step")
    group.addoption("--partywall-list-invariants", action="store_true", help="print the invariants and run nothing")
    group.addoption("--partywall-list-checks", action="store_true",
                    help="with --partywall-list-invariants: each invariant's checks too")


def _runs_properties(config: pytest.Config, given: dict[str, Any]) -> bool:
    """Whether this pytest session runs partywall's properties.

    The plugin is installed wherever partywall is, so it stays out of every
    other session: it loads no Hypothesis profile and fixes no seed for a
    team's own tests. It takes part when a partywall option is given or the
    arguments name the properties (``--pyargs partywall_props`` or their folder).
    """
    if given or config.getoption("partywall_replay") or config.getoption("partywall_list_invariants"):
        return True
    if config.getoption("hypothesis_profile", None) == BENCH_PROFILE:
        return True
    spec = importlib.util.find_spec("partywall_props")  # finds the folder without importing it
    home = Path(next(iter(spec.submodule_search_locations))).resolve() if spec and spec.submodule_search_locations else None
    for arg in config.args:
        name = str(arg).split("::")[0]
        if name == "partywall_props" or name.startswith("partywall_props."):
            return True
        path = Path(name).resolve()
        if home is not None and (path == home or home in path.parents):
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's plugin loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    given = configmod.from_namespace(vars(config.option), pytest=True)
    if not _runs_properties(config, given):
        return
    named = config.getoption("hypothesis_profile", None)
    bench = named == BENCH_PROFILE
    if named and not bench:
        given.setdefault("profile", named)
    try:
        found = configmod.resolve(given)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    register_profiles(found.table)
    profile = BENCH_PROFILE if bench else str(found.get("profile"))
    settings.load_profile(profile)
    # One seed for the run: --seed, else the profile's (or the bench plan's) fixed seed, else
    # random. It seeds the markers and, through --hypothesis-seed (read by Hypothesis's plugin
    # after this hook), generation: the same seed gives the same generated workload.
    seed = found.get("seed")
    if seed is None:
        seed = found["bench"]["seed"] if bench else found.profile(profile).get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(seed)
    mode = "replay" if config.getoption("partywall_replay") else ("bench" if bench else "run")
    for name in given:  # an option of another job would be read by nothing: say so, as the CLI does
        modes = [m for m in MODE_JOBS if m in configmod.OPTION[name].commands]
        if mode in modes:
            continue
        flag = configmod.OPTION[name].pytest_flag
        if not modes:
            raise pytest.UsageError(f"{flag} is an option of other commands than pytest's.")
        job = MODE_JOBS[modes[0]][0]
        raise pytest.UsageError(f"{flag} is an option of {job}, and this session runs {MODE_JOBS[mode][0]}: "
                                f"{_switch(modes[0], mode)} to run {job}.")
    config.stash[RUN_KEY] = Run(settings=found, profile=profile, seed=int(seed), mode=mode)
    config.addinivalue_line("markers", "partywall_replay: the replay runner; runs only with --partywall-replay")
    config.addinivalue_line("markers", "partywall_bench: the 100-user benchmark; runs under the bench profile")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The replay runner runs only when asked for; the bench only under its profile."""
    run = get_run(config)
    if run is None:
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        is_replay = item.get_closest_marker("partywall_replay") is not None
        is_bench = item.get_closest_marker("partywall_bench") is not None
        wanted = {"replay": is_replay, "bench": is_bench, "run": not is_replay and not is_bench}[run.mode]
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = get_run(config)
    if run is None:
        return []
    where = run.settings.project_file or configmod.DEFAULTS_SOURCE
    return [f"partywall: profile {run.profile}, seed {run.seed}, settings from {where}"]


@pytest.fixture(scope="session")
def partywall_run(request: pytest.FixtureRequest) -> Run:
    """The plugin's `Run` of this pytest session."""
    run = get_run(request.config)
    if run is None:
        pytest.fail("partywall's plugin takes part only in sessions that run its properties: "
                    "name them (pytest --pyargs partywall_props) or pass a --partywall-* option.")
    return run


@pytest.fixture(scope="session")
def partywall_config(partywall_run: Run) -> dict[str, Any]:
    """``[tool.partywall]`` as every layer leaves it."""
    return partywall_run.settings.table


@pytest.fixture(scope="session")
def partywall_session(partywall_run: Run) -> Iterator[Session]:
    """The run: target started or reached, seed fixed, report kept."""
    run = partywall_run
    try:
        session = session_from_settings(run.settings, seed=run.seed, profile=run.profile, on_example=run.on_example)
    except HarnessError as exc:
        run.fail(str(exc))
        pytest.exit(f"partywall: {exc}", returncode=2)
    run.session = session
    try:
        session.start(observer=lambda ev, frame: None)
    except HarnessError as exc:
        run.fail(str(exc))
        session.target.stop()
        pytest.exit(f"partywall: {exc}", returncode=2)
    try:
        yield session
    finally:
        session.close()


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """A test that fails with anything but a violation is the harness's failure, not the server's."""
    run = get_run(item.config)
    excinfo = call.excinfo
    if run is None or excinfo is None or excinfo.errisinstance((Violation, pytest.skip.Exception, pytest.exit.Exception)):
        return
    # Violations come back through the session's record; anything else (an adapter that raised,
    # a bug of partywall's own) is the reason the run could not be made.
    lines = str(excinfo.value).strip().splitlines()
    run.fail(f"{item.name} stopped with {excinfo.typename}: {lines[0] if lines else '(no message)'}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run = get_run(session.config)
    if run is None:
        return
    path = run.settings.get("report")
    if not path:
        return
    if run.report_written:
        return
    if run.session is not None:
        if run.session.bench_report is None:  # the bench writes its own report
            run.session.error = run.session.error or run.error
            run.session.write_report(path)
    elif run.error is not None or exitstatus != 0:
        # Nothing ran here and something went wrong. (An xdist controller, whose workers
        # ran the properties and wrote the reports, has neither and writes nothing.)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(error_report(run.error or f"pytest stopped with exit status {int(exitstatus)}"),
                                         indent=2) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under the bench profile, ``-n N`` hands the bench test to every worker.

    xdist's default scheduling gives the one bench test to one worker; the
    bench is sharded instead, each worker running its share of the plan's
    users (worker gwK runs shard K of N), so every worker must run it.
    """
    run = get_run(config)
    if run is None or run.mode != "bench":
        return None
    from xdist.scheduler import EachScheduling

    return EachScheduling(config, log)


def error_report(message: str) -> dict[str, Any]:
    """The JSON report of a run that could not be made."""
    return {"ok": False, "error": message, "violations": [], "not_run": []}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from partywall.console import summary_lines

    run = get_run(terminalreporter.config)
    if run is None or run.session is None or run.mode == "bench":
        return
    terminalreporter.write_sep("-", "partywall")
    for line in summary_lines(run, verbose=True):
        terminalreporter.write_line(line)
