"""The pytest plugin (entry point ``pytest11``): targets, profiles, the run, the report.

It adds the target options (``--server-url``, ``--server-cmd``,
``--auth-secret``) and partywall's own (``--partywall-seed``,
``--partywall-report``, ``--partywall-set``, ``--partywall-replay``), registers
the Hypothesis profiles from ``[tool.partywall.profiles]``, and gives the
properties a session-scoped ``partywall_session`` fixture: the target started
(or reached), the driver running, the run's seed, registry and report.

Hypothesis profiles and the ``CI`` variable: Hypothesis loads a built-in
profile named ``ci`` whenever ``CI`` is set. partywall registers its own
``ci`` profile under that same name, so under ``CI=true`` the built-in one is
replaced by partywall's (fixed seed, no example database, deadline off), and
``--hypothesis-profile`` (or ``partywall run --profile``) always wins.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from partywall import config as configmod
from partywall.adapter import Adapter
from partywall.errors import HarnessError
from partywall.session import Session
from partywall.target import make_target

_STATE: dict[str, Any] = {}


def register_profiles(cfg: dict[str, Any]) -> None:
    """Register dev, ci, nightly and bench with Hypothesis from the config."""
    common: dict[str, Any] = dict(
        deadline=None,  # a step's network time is checked by the `timing` invariant, not here
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=True,
    )
    for name, prof in cfg.get("profiles", {}).items():
        db = DirectoryBasedExampleDatabase(".hypothesis/examples") if prof.get("database") else None
        settings.register_profile(
            name,
            max_examples=int(prof.get("max_examples", 25)),
            stateful_step_count=int(prof.get("stateful_step_count", 30)),
            derandomize=bool(prof.get("derandomize", False)),
            database=db,
            # Hypothesis's shrinker re-runs the machine hundreds of times, which against a
            # live server takes minutes; props.runner shrinks the recorded program by
            # replay instead, within [tool.partywall] shrink_seconds.
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
            verbosity=Verbosity.normal,
            **common,
        )
    settings.register_profile("bench", max_examples=1, database=None, phases=[Phase.explicit, Phase.generate], **common)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("partywall", "partywall: the server under test and the run")
    group.addoption("--server-url", default=None, help="test a running server at ws://HOST:PORT/ws (no crash checks)")
    group.addoption("--server-cmd", default=None, help="start the server with `sh -c CMD`; it prints `listening on ws://HOST:PORT/ws`")
    group.addoption("--auth-secret", default=None, help="HS256 secret of --server-url/--server-cmd (or env PARTYWALL_AUTH_SECRET)")
    group.addoption("--server-pid", type=int, default=None, help="pid of a --server-url server, for its CPU and memory")
    group.addoption("--partywall-seed", type=int, default=None, help="the run's seed (markers, and Hypothesis's when the profile is not derandomized)")
    group.addoption("--partywall-report", default=None, help="write the JSON report here")
    group.addoption("--partywall-set", action="append", default=[], metavar="KEY=VALUE", help="override a [tool.partywall] value")
    group.addoption("--partywall-replay", default=None, help="replay this failure file step by step")
    group.addoption("--partywall-replay-dir", default=None, help="where failure replay files go (default .partywall/replays)")
    group.addoption("--partywall-adapter", default=None, metavar="MODULE:CLASS",
                    help="a partywall.adapter.Adapter subclass for a server with another wire format")
    group.addoption("--partywall-list-invariants", action="store_true", help="print the invariants and run nothing")
    group.addoption("--partywall-users", type=int, default=None, help="bench: number of users")
    group.addoption("--partywall-shard", default=None, metavar="K/N", help="bench: run shard K of N of the plan's users")
    group.addoption("--partywall-junit", default=None, help="bench: write JUnit XML here")
    group.addoption("--partywall-html", default=None, help="bench: write the HTML report here")


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's plugin loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    try:
        cfg = configmod.load(config.getoption("partywall_set") or [])
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from exc
    _STATE["cfg"] = cfg
    register_profiles(cfg)
    profile = config.getoption("hypothesis_profile", None)
    if not profile and os.environ.get("CI"):
        profile = "ci"
        settings.load_profile("ci")  # explicit: partywall's ci, not Hypothesis's built-in one
    # One seed for the run: --partywall-seed, else the profile's fixed seed, else random.
    # It seeds the markers and, through --hypothesis-seed (read by Hypothesis's plugin
    # after this hook), generation: the same seed gives the same generated workload.
    prof_cfg = cfg.get("profiles", {}).get(profile or "dev", {})
    seed = config.getoption("partywall_seed")
    if seed is None:
        seed = prof_cfg.get("seed") if profile != "bench" else cfg.get("bench", {}).get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
    _STATE["seed"] = int(seed)
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(seed)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The replay runner runs only when asked for; the bench only under its profile."""
    replay = config.getoption("partywall_replay")
    bench = settings._current_profile == "bench"  # noqa: SLF001 - the profile pytest loaded
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        is_replay = item.get_closest_marker("partywall_replay") is not None
        is_bench = item.get_closest_marker("partywall_bench") is not None
        if replay:
            wanted = is_replay
        elif bench:
            wanted = is_bench
        else:
            wanted = not is_replay and not is_bench
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"partywall: profile {settings._current_profile}, config {configmod.config_path()}"]  # noqa: SLF001


def _profile_name() -> str:
    return str(settings._current_profile)  # noqa: SLF001


@pytest.fixture(scope="session")
def partywall_config() -> dict[str, Any]:
    """[tool.partywall] with the command line's overrides."""
    return _STATE["cfg"]


@pytest.fixture(scope="session")
def partywall_session(request: pytest.FixtureRequest, partywall_config: dict[str, Any]) -> Iterator[Session]:
    """The run: target started or reached, seed fixed, report kept."""
    opt = request.config.getoption
    profile = _profile_name()
    seed = _STATE["seed"]
    replay_dir = Path(opt("partywall_replay_dir") or ".partywall/replays")
    try:
        target = make_target(
            server_url=opt("server_url"),
            server_cmd=opt("server_cmd"),
            auth_secret=opt("auth_secret"),
            server_pid=opt("server_pid"),
        )
    except HarnessError as exc:
        _fail_run(request.config, str(exc))
        raise
    try:
        adapter = load_adapter(opt("partywall_adapter"))
    except HarnessError as exc:
        _fail_run(request.config, str(exc))
        pytest.exit(f"partywall: {exc}", returncode=2)
    session = Session(config=partywall_config, target=target, seed=seed, profile=profile, replay_dir=replay_dir,
                      adapter=adapter)
    _STATE["session"] = session
    if not target.can_crash:
        session.not_run_check("crash_and_restart", f"the {target.kind} target was not started by the suite, so it cannot be crashed")
    try:
        session.start(observer=lambda ev, frame: None)
    except HarnessError as exc:
        _fail_run(request.config, str(exc))
        session.target.stop()
        pytest.exit(f"partywall: {exc}", returncode=2)
    try:
        yield session
    finally:
        session.close()


def load_adapter(spec: str | None) -> Adapter:
    """The adapter named ``MODULE:CLASS`` (protocol v1's when None)."""
    if not spec:
        return Adapter()
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise HarnessError(f"--partywall-adapter {spec!r}: cannot load it ({exc}); expected MODULE:CLASS.") from exc
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise HarnessError(f"--partywall-adapter {spec!r} is not a subclass of partywall.adapter.Adapter.")
    return cls()


def _fail_run(config: pytest.Config, message: str) -> None:
    _STATE["error"] = message
    if "session" in _STATE:
        _STATE["session"].error = message


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("partywall_report", None)
    run: Session | None = _STATE.get("session")
    if path and run is not None and getattr(run, "bench_report", None) is None:
        run.write_report(path)
    elif path and run is None and "error" in _STATE:
        import json

        Path(path).write_text(json.dumps({"ok": False, "error": _STATE["error"], "violations": [], "not_run": []}, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    run: Session | None = _STATE.get("session")
    if run is None:
        return
    frames = sum(1 for e in run.history if e.kind == "frame")
    st = run.stats
    terminalreporter.write_sep("-", "partywall")
    terminalreporter.write_line(
        f"profile {run.profile}, seed {run.seed}, target {run.target.kind} {run.target.url}: "
        f"{st.get('examples', 0)} examples, {st.get('steps', 0)} steps, {len(run.history)} events, {frames} frames"
    )
    if st.get("rules"):
        terminalreporter.write_line("rules run: " + ", ".join(f"{k} {v}" for k, v in sorted(st["rules"].items())))
    for item in run.not_run:
        terminalreporter.write_line(f"not run: {item['check']}: {item['reason']}")
    for v in run.violations:
        terminalreporter.write_line(f"VIOLATION [{v.violation.invariant}] {v.violation.title} (reproduced {v.reproduced}; replay: {v.replay})")


def run_state() -> dict[str, Any]:
    """The plugin's state, for the CLI that ran pytest in-process."""
    return _STATE

