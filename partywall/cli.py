"""The ``partywall`` command: its arguments, and how each command runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from partywall import __version__
from partywall import config as configmod
from partywall.adapter import load_adapter
from partywall.credentials import from_settings, secretless_option
from partywall.errors import HarnessError
from partywall.target import SECRET_ENV, make_target

DESCRIPTION = """\
Property-based tests that a multi-tenant WebSocket agent service keeps its
tenants apart under concurrency, and a fixed-seed start-up benchmark.

With no target option every command runs against a fresh embedded reference
server. Settings come, each layer over the one before, from partywall's
defaults, [tool.partywall] of your pyproject.toml, PARTYWALL_<OPTION>
variables, and the command line (`partywall config` shows the result).

exit status: 0 every invariant held, 1 a violation was found,
2 the run could not be made (bad option or settings, unreachable server,
an error of partywall or of an adapter); the JSON report says why.
"""

PROPERTIES = "partywall_props"
#: The entry-point group the bench's workload registers in (pyproject.toml): ``partywall bench``
#: calls it with the settings, without pytest, and without importing the properties by name.
BENCH_ENTRY_POINTS = "partywall.bench"


def _add_options(p: argparse.ArgumentParser, command: str) -> None:
    for opt in configmod.OPTIONS:
        if command in opt.commands:
            opt.add_to(p.add_argument)
    if command in {"run", "bench", "replay"}:
        p.add_argument("-v", "--verbose", action="store_true", help="show the rules run and the full text of any failure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partywall", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"partywall {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the stateful isolation suite against a server",
                         description="Generate interleavings of tenants connecting, starting agents, talking, "
                                     "reading and disconnecting, and check every invariant on every frame.")
    _add_options(run, "run")
    run.add_argument("--list-invariants", action="store_true", help="print the invariants and exit")
    run.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARG", help="extra arguments for pytest, after --")

    bench = sub.add_parser("bench", help="the fixed-seed 100-user agent start-up benchmark",
                           description="Run the seeded plan of users at once and gate on its thresholds.")
    _add_options(bench, "bench")

    merge = sub.add_parser("merge", help="merge the shard reports of one bench run and gate on the whole",
                           description="Merge bench reports of the shards of one run (--shard K/N, made by any "
                                       "launcher) into one report: percentiles from the merged histograms, "
                                       "thresholds judged on the merged figures. Exit 0 when the merged gate "
                                       "holds, 1 when it fails, 2 when the reports are not one whole run.")
    merge.add_argument("reports", nargs="+", metavar="REPORT", help="a shard's JSON report (partywall bench --report)")
    _add_options(merge, "merge")

    rp = sub.add_parser("replay", help="re-run a failure file step by step")
    rp.add_argument("file", help="a replay file written by a failing run")
    _add_options(rp, "replay")

    cfg = sub.add_parser("config", help="print the settings in force and where each came from",
                         description="Every setting, its value and its source; secrets are masked.")
    _add_options(cfg, "config")

    doc = sub.add_parser("doctor", help="try each operation once and show what the adapter made of the answers",
                         description="Reach the target with the adapter and credentials given, send each "
                                     "operation the adapter declares once, and print every answer and whether "
                                     "the adapter understood it: the first command to run while writing an adapter.")
    _add_options(doc, "doctor")

    sub.add_parser("serve", help="start the reference server (a random secret unless one is given)",
                   description="Every option goes to the reference server; `partywall serve --help` lists them.",
                   add_help=False)

    tok = sub.add_parser("token", help="print a token for manual use with any WebSocket client")
    tok.add_argument("--tenant", required=True)
    tok.add_argument("--user", required=True)
    tok.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    tok.add_argument("--secret", help=f"the HS256 secret (default ${SECRET_ENV})")
    return parser


def _given(ns: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, by name."""
    return configmod.from_namespace(vars(ns), [o.name for o in configmod.OPTIONS if hasattr(ns, o.name)])


def _pytest_options(given: dict[str, Any]) -> list[str]:
    """The same options, spelled for the plugin (which resolves them by the same rule)."""
    args: list[str] = []
    for name, value in given.items():
        flag = configmod.OPTION[name].pytest_flag
        if configmod.OPTION[name].kind == "flag":
            args += [flag] if value else []
            continue
        for item in value if isinstance(value, list) else [value]:
            args += [flag, str(item)]
    return args


def _properties_home() -> Path:
    """Where the installed properties are, found by import name without importing them."""
    spec = importlib.util.find_spec(PROPERTIES)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(f"the package {PROPERTIES!r} is not installed; reinstall partywall.")
    return Path(next(iter(spec.submodule_search_locations)))


def _write_error_report(path: str | None, message: str) -> None:
    """Make the report say why the run could not be made (keeping what it already holds)."""
    if not path:
        return
    report: dict[str, Any] = {"violations": [], "not_run": []}
    if Path(path).is_file():
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError:
            report = {"violations": [], "not_run": [], "damaged_report": True}
    report.update(ok=False, error=report.get("error") or message)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _run_pytest(command: str, extra: Sequence[str], given: dict[str, Any], verbose: bool) -> int:
    """Run the properties through pytest with partywall's own output, and map the outcome to an exit code."""
    import pytest

    from partywall.console import ConsoleReporter

    home = str(_properties_home())
    # pytest's own settings and output stay out of it: no project ini file (the team's
    # pytest options are for the team's tests), no terminal reporter (ConsoleReporter
    # speaks instead), no assertion rewriting (invariants raise their own messages).
    args = ["--pyargs", PROPERTIES, "-c", os.devnull, "--rootdir", home, "--confcutdir", home,
            "-p", "no:cacheprovider", "-p", "no:terminal", "--assert=plain", *extra, *_pytest_options(given)]
    reporter = ConsoleReporter(command, verbose=verbose)
    code = pytest.main(args, plugins=[reporter])
    status, lines = reporter.verdict(int(code))
    for line in lines[:-1]:
        print(line)
    if lines:  # the verdict; a run that could not be made says why where errors go
        print(lines[-1], file=sys.stderr if status == 2 else sys.stdout)
    if status == 2:
        _write_error_report(given.get("report"), reporter.error or "the run could not be made")
    elif given.get("report"):
        print(f"report: {given['report']}")
    return status


def _precheck(given: dict[str, Any]) -> configmod.Settings:
    """Settings and target options checked now, in one line each, before pytest starts."""
    found = configmod.resolve(given)
    load_adapter(found.get("adapter"))
    target = make_target(found.get("server_url"), found.get("server_cmd"), found.get("auth_secret"),
                         server_pid=found.get("server_pid"), credentials_from=secretless_option(found.get),
                         ca_file=found.get("ca_file"), insecure=bool(found.get("insecure")))
    # The identities file and the token command's program are checked now; no command runs yet.
    from_settings(secret=target.secret, token_cmd=found.get("token_cmd"), identities=found.get("identities"),
                  timeout_s=float(found["token_cmd_timeout_s"]))
    if found.get("server_url"):
        target.start()  # nothing listening there: a clear line now, not a failed run later
    return found


def cmd_run(ns: argparse.Namespace) -> int:
    given = _given(ns)
    if ns.list_invariants:
        configmod.resolve(given)
        return _run_pytest("list", ["--co", "-s", "--partywall-list-invariants",
                                    *(["--partywall-list-checks"] if ns.verbose else [])], given, ns.verbose)
    found = _precheck(given)
    print(f"partywall run: profile {found.get('profile')} against "
          f"{found.get('server_url') or found.get('server_cmd') or 'the embedded reference server'}", flush=True)
    return _run_pytest("run", list(ns.pytest_args), given, ns.verbose)


def _bench_entry_point() -> Any:
    """The workload's ``main(settings) -> exit code`` registered under `BENCH_ENTRY_POINTS`, or None."""
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=BENCH_ENTRY_POINTS), key=lambda ep: ep.name != "default")
    return found[0] if found else None


def cmd_bench(ns: argparse.Namespace) -> int:
    given = _given(ns)
    found = configmod.resolve(given)
    if found.get("workers") is not None or found.get("dask"):  # shards in processes here or on a Dask cluster
        from partywall.launch import run_sharded

        return run_sharded(_precheck(given), verbose=ns.verbose)
    if found.get("pushgateway"):  # a --pushgateway that is not http(s): refused now, before any server starts
        from partywall.openmetrics import check_url

        check_url(found.get("pushgateway"))
    entry = _bench_entry_point()
    if entry is None:  # an installation without the entry point: the bench runs under pytest
        _precheck(given)
        return _run_pytest("bench", ["--hypothesis-profile=bench"], given, ns.verbose)
    try:
        main = entry.load()
    except Exception as exc:  # a broken installation: say which entry point, not a traceback
        raise HarnessError(f"the bench entry point {entry.value!r} ({BENCH_ENTRY_POINTS}) cannot be loaded: "
                           f"{type(exc).__name__}: {exc}; reinstall partywall.") from None
    return int(main(found))


def cmd_merge(ns: argparse.Namespace) -> int:
    from partywall.benchreport import BenchReport, format_summary, merge_reports, verdict

    found = configmod.resolve(_given(ns))
    out = {name: found.get(name) for name in ("report", "junit", "html")}

    def write(report: BenchReport) -> list[str]:
        written = []
        if out["report"]:
            report.write(out["report"])
            written.append(out["report"])
        if out["junit"] or out["html"]:
            from partywall.reports import write_html, write_junit

            if out["junit"]:
                write_junit(report, out["junit"])
                written.append(out["junit"])
            if out["html"]:
                write_html(report, out["html"])
                written.append(out["html"])
        return written

    try:
        reports = [BenchReport.read(path) for path in ns.reports]
        for path, r in zip(ns.reports, reports, strict=True):
            if r.partywall_version != __version__:
                raise HarnessError(f"{path}: it was written by partywall {r.partywall_version}, this is partywall "
                                   f"{__version__}; merge reports with the version that wrote them.")
        merged = merge_reports(reports, names=ns.reports)
    except HarnessError as exc:
        write(BenchReport.of_error(str(exc)))
        print(f"partywall merge: {exc}", file=sys.stderr)
        return 2
    written = write(merged)
    print(format_summary(merged, "merge"))
    for path in written:
        print(f"wrote {path}")
    status, line = verdict(merged, "merge")
    print(line, file=sys.stderr if status == 2 else sys.stdout)
    return status


def cmd_replay(ns: argparse.Namespace) -> int:
    path = Path(ns.file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot read replay file {path} ({exc}).") from None
    if not isinstance(data, dict) or data.get("format") != "partywall-replay/1":
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise HarnessError(f"{path} is not a partywall replay file (format {got!r}).")
    if not isinstance(data.get("program"), list):
        raise HarnessError(f"{path} has no step program; it is damaged.")
    before = data.get("before", [])
    if not isinstance(before, list) or not all(isinstance(program, list) for program in before):
        raise HarnessError(f"{path}: 'before' must be a list of step programs; it is damaged.")
    given = _given(ns)
    if data.get("seed") is not None:
        given.setdefault("seed", int(data["seed"]))
    if data.get("profile"):
        given.setdefault("profile", str(data["profile"]))
    _precheck(given)
    return _run_pytest("replay", ["--partywall-replay", str(path)], given, ns.verbose)


def cmd_config(ns: argparse.Namespace) -> int:
    found = configmod.resolve(_given(ns))
    print(f"settings from: {found.project_file or 'partywall defaults only (no [tool.partywall] found)'}")
    rows = found.shown()
    width = max(len(name) for name, _, _ in rows)
    vwidth = min(40, max(len(value) for _, value, _ in rows))
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {source}")
    return 0


def cmd_doctor(ns: argparse.Namespace) -> int:
    from partywall.doctor import run_doctor

    return run_doctor(configmod.resolve(_given(ns)))


def cmd_serve(args: list[str]) -> int:
    if args and args[0] == "--":
        args = args[1:]
    env = dict(os.environ)
    has_secret = any(a.startswith(("--secret", "--secret-file")) for a in args) or env.get(SECRET_ENV)
    if not has_secret and not {"-h", "--help"} & set(args):
        secret = secrets.token_urlsafe(32)
        env[SECRET_ENV] = secret
        print(f"partywall serve: generated secret {secret}", file=sys.stderr)
        print(f"  token: partywall token --secret {shlex.quote(secret)} --tenant acme --user alice", file=sys.stderr)
        sys.stderr.flush()
    # Exec, not import: the harness never imports the server, and signals reach it directly.
    os.execvpe(sys.executable, [sys.executable, "-m", "partywall_agentserver", *args], env)
    return 0  # not reached


def cmd_token(ns: argparse.Namespace) -> int:
    from partywall.tokens import mint

    secret = ns.secret or os.environ.get(SECRET_ENV)
    if not secret:
        raise HarnessError(f"token needs the server's secret: pass --secret S or set {SECRET_ENV}.")
    if ns.ttl <= 0:
        raise HarnessError(f"--ttl must be positive seconds (got {ns.ttl}).")
    print(mint(secret, ns.tenant, ns.user, ns.ttl))
    return 0


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "merge": cmd_merge, "replay": cmd_replay, "config": cmd_config, "doctor": cmd_doctor,
            "token": cmd_token}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        # Everything after `serve` belongs to the server, --help included.
        return cmd_serve(args[1:])
    ns = build_parser().parse_args(args)
    try:
        return COMMANDS[ns.command](ns)
    except HarnessError as exc:
        print(f"partywall: {exc}", file=sys.stderr)
        _write_error_report(getattr(ns, "report", None), str(exc))
        return 2
    except KeyboardInterrupt:
        print("partywall: interrupted", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`partywall config | head`): nothing more to say to it.
        sys.stdout = None  # type: ignore[assignment]  # no flush of a closed pipe at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
