"""The ``partywall`` command.

``partywall run``    the stateful isolation suite (through pytest on the installed ``props``)
``partywall bench``  the fixed-seed 100-user start-up benchmark
``partywall replay`` re-run a failure file step by step
``partywall serve``  start the reference server with a fresh secret
``partywall token``  print a token for manual use with any WebSocket client

Exit codes: 0 every invariant held, 1 a violation was found, 2 the run could
not be made (bad option, nothing listening at the URL); one clear line, no
traceback, and the JSON report is written in every case.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import sys
from pathlib import Path

from partywall import __version__
from partywall import config as configmod
from partywall.errors import HarnessError
from partywall.target import SECRET_ENV, make_target


def _props_dir() -> Path:
    """Where the installed ``props`` package lives, found without importing it."""
    spec = importlib.util.find_spec("props")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("the 'props' package is not installed; reinstall partywall (pip install -e .).")
    return Path(next(iter(spec.submodule_search_locations)))


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target (default: a fresh embedded reference server)")
    g.add_argument("--server-url", metavar="URL", help="a running server at ws://HOST:PORT/ws (crash checks cannot run)")
    g.add_argument("--server-cmd", metavar="CMD", help="start the server with `sh -c CMD`; it must print `listening on ws://HOST:PORT/ws`")
    g.add_argument("--auth-secret", metavar="S", help=f"the server's HS256 secret (or ${SECRET_ENV})")
    p.add_argument("--adapter", metavar="MODULE:CLASS", dest="adapter",
                   help="a partywall.adapter.Adapter subclass, for a server with another wire format")
    p.add_argument("--seed", type=int, help="the run's seed")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a [tool.partywall] value, e.g. --set timing.response_ms=8000")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partywall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"partywall {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the stateful isolation suite against a server")
    _add_target(run)
    run.add_argument("--profile", default="dev", choices=["dev", "ci", "nightly"], help="Hypothesis profile (default dev)")
    run.add_argument("--replay-dir", default=".partywall/replays", help="where failure replay files go")
    run.add_argument("--list-invariants", action="store_true", help="print the invariants and exit")
    run.add_argument("pytest_args", nargs="*", help="extra arguments for pytest, after --")

    bench = sub.add_parser("bench", help="the fixed-seed 100-user agent start-up benchmark")
    _add_target(bench)
    bench.add_argument("--users", type=int, help="number of users (default from [tool.partywall.bench])")
    bench.add_argument("--server-pid", type=int, help="pid of a --server-url server, for its CPU and memory")
    bench.add_argument("--junit", metavar="PATH", help="write JUnit XML here")
    bench.add_argument("--html", metavar="PATH", help="write the HTML report here")
    bench.add_argument("--shard", metavar="K/N", help="run shard K of N of the plan's users")

    rp = sub.add_parser("replay", help="re-run a failure file step by step")
    rp.add_argument("file", help="a replay file written by a failing run")
    _add_target(rp)

    serve = sub.add_parser("serve", help="start the reference server (a random secret unless one is given)",
                           description="Every option is passed to `python -m agentserver` (see its --help).")
    serve.add_argument("server_args", nargs=argparse.REMAINDER, help="options of python -m agentserver")

    tok = sub.add_parser("token", help="print a token for manual use")
    tok.add_argument("--tenant", required=True)
    tok.add_argument("--user", required=True)
    tok.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    tok.add_argument("--secret", help=f"the HS256 secret (default ${SECRET_ENV})")
    return parser


def _pytest_target_args(ns: argparse.Namespace) -> list[str]:
    args: list[str] = []
    for opt in ("server_url", "server_cmd", "auth_secret"):
        value = getattr(ns, opt, None)
        if value is not None:
            args += [f"--{opt.replace('_', '-')}", value]
    if getattr(ns, "seed", None) is not None:
        args += ["--partywall-seed", str(ns.seed)]
    if getattr(ns, "adapter", None):
        args += ["--partywall-adapter", ns.adapter]
    for item in getattr(ns, "overrides", []):
        args += ["--partywall-set", item]
    return args


def _write_error_report(path: str | None, message: str) -> None:
    if path:
        Path(path).write_text(json.dumps({"ok": False, "error": message, "violations": [], "not_run": []}, indent=2) + "\n")


def _run_pytest(args: list[str], report: str | None) -> int:
    import pytest

    code = pytest.main(args)
    from partywall import plugin  # after pytest.main, so pytest can rewrite Hypothesis's asserts

    state = plugin.run_state()
    if state.get("error"):
        print(f"partywall: {state['error']}", file=sys.stderr)
        if report and not Path(report).exists():
            _write_error_report(report, state["error"])
        return 2
    if code == 0:
        return 0
    if code == 1:
        return 1
    return 2


def _precheck(ns: argparse.Namespace, server_pid: int | None = None) -> None:
    """Option errors and an unreachable --server-url, now, in one line (before pytest starts)."""
    target = make_target(ns.server_url, ns.server_cmd, ns.auth_secret, server_pid=server_pid)
    if ns.server_url:
        target.start()


def cmd_run(ns: argparse.Namespace) -> int:
    configmod.load(ns.overrides)  # a bad --set is a usage error before anything starts
    if ns.list_invariants:
        # The invariants are defined in props; the listing runs pytest's collection only.
        code = _run_pytest([str(_props_dir()), "-q", "-s", "--co", "-p", "no:cacheprovider", "--no-header",
                            "--partywall-list-invariants"], None)
        return 0 if code in (0, 2) else code
    _precheck(ns)
    args = [str(_props_dir()), "-p", "no:cacheprovider", "-q", "--no-header", "-rN", "--tb=short",
            f"--hypothesis-profile={ns.profile}", "--partywall-replay-dir", ns.replay_dir,
            *_pytest_target_args(ns)]
    if ns.report:
        args += ["--partywall-report", ns.report]
    return _run_pytest(args + list(ns.pytest_args), ns.report)


def cmd_bench(ns: argparse.Namespace) -> int:
    configmod.load(ns.overrides)
    _precheck(ns, ns.server_pid)
    args = [str(_props_dir()), "-p", "no:cacheprovider", "-q", "--no-header", "-rN", "--tb=line", "-s",
            "--hypothesis-profile=bench", *_pytest_target_args(ns)]
    for opt, flag in (("users", "--partywall-users"), ("server_pid", "--server-pid"), ("junit", "--partywall-junit"),
                      ("html", "--partywall-html"), ("shard", "--partywall-shard"), ("report", "--partywall-report")):
        value = getattr(ns, opt)
        if value is not None:
            args += [flag, str(value)]
    return _run_pytest(args, ns.report)


def cmd_replay(ns: argparse.Namespace) -> int:
    path = Path(ns.file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot read replay file {path} ({exc}).") from exc
    if data.get("format") != "partywall-replay/1":
        raise HarnessError(f"{path} is not a partywall replay file (format {data.get('format')!r}).")
    _precheck(ns)
    args = [str(_props_dir()), "-p", "no:cacheprovider", "-q", "--no-header", "-rN", "--tb=no",
            "--partywall-replay", str(path), f"--hypothesis-profile={data.get('profile', 'dev')}",
            *_pytest_target_args(ns)]
    if data.get("seed") is not None and ns.seed is None:
        args += ["--partywall-seed", str(data["seed"])]
    return _run_pytest(args, ns.report)


def cmd_serve(ns: argparse.Namespace) -> int:
    args = list(ns.server_args)
    if args and args[0] == "--":
        args = args[1:]
    env = dict(os.environ)
    has_secret = any(a.startswith(("--secret", "--secret-file")) for a in args) or env.get(SECRET_ENV)
    if not has_secret:
        secret = secrets.token_urlsafe(32)
        env[SECRET_ENV] = secret
        print(f"partywall serve: generated secret {secret}", file=sys.stderr)
        print(f"  token: partywall token --secret {shlex.quote(secret)} --tenant acme --user alice", file=sys.stderr)
        sys.stderr.flush()
    # Exec, not import: the harness never imports the server, and signals reach it directly.
    os.execvpe(sys.executable, [sys.executable, "-m", "agentserver", *args], env)
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


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "replay": cmd_replay, "serve": cmd_serve, "token": cmd_token}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"] and not {"-h", "--help"} & set(args[1:]):
        # Everything after `serve` belongs to the server, options included.
        return cmd_serve(argparse.Namespace(server_args=args[1:]))
    ns = parser.parse_args(args)
    try:
        return COMMANDS[ns.command](ns)
    except HarnessError as exc:
        print(f"partywall: {exc}", file=sys.stderr)
        _write_error_report(getattr(ns, "report", None), str(exc))
        return 2
    except KeyboardInterrupt:
        print("partywall: interrupted", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
