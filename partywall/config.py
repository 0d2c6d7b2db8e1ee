"""partywall's configuration: one rule for every setting, in four layers.

From the bottom up, each layer overriding the one below it key by key:

1. the packaged defaults (``partywall/defaults.toml``, read with
   ``importlib.resources``): the one place defaults live;
2. the ``[tool.partywall]`` table of the team's own ``pyproject.toml``, the
   nearest one from the working directory upward that has such a table, or
   the file ``--config PATH`` names;
3. environment variables: ``PARTYWALL_<OPTION>`` for every command-line
   option, and ``PARTYWALL_SET`` (``KEY=VALUE`` items separated by spaces);
4. the command line: the options, and ``--set KEY=VALUE`` for any table key.

Every option has one name and derives the rest from it: option ``server_url``
is ``--server-url`` on the command line, ``PARTYWALL_SERVER_URL`` in the
environment, ``--partywall-server-url`` for pytest, and, where a project may
fix it in a file, the key ``server_url`` of ``[tool.partywall]``. An unknown
key or a value of the wrong type is refused in every layer, naming the key
and where it came from, so that a typo can never leave a default in force.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import os
import shlex
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from partywall.errors import HarnessError

DEFAULTS_SOURCE = "partywall defaults"

#: Keys a profile may have; a profile a project adds takes the unset ones from `dev`.
PROFILE_KEYS: dict[str, type] = {
    "max_examples": int, "stateful_step_count": int, "derandomize": bool, "database": bool, "seed": int,
}
#: A whole-number default whose key ends so (a limit in ms, seconds, MiB, a rate) may take a fraction.
_FRACTIONAL_SUFFIXES = ("_ms", "_s", "_mib", "_rate")
#: Limits in seconds that must be a finite number greater than 0 (zero or less would end every wait at once).
POSITIVE_KEYS = frozenset({"bench.shard_ready_timeout_s", "bench.dask_connect_timeout_s", "bench.shard_finish_slack_s"})


@attrs.frozen
class Option:
    """One option of the ``partywall`` command and of the pytest plugin."""

    name: str
    """The one name: ``server_url`` → ``--server-url``, ``PARTYWALL_SERVER_URL``, ``--partywall-server-url``."""
    help: str
    commands: tuple[str, ...]
    """The ``partywall`` commands that take it."""
    kind: str = attrs.field(default="str", validator=attrs.validators.in_({"str", "int", "list", "flag"}))
    """How its text is read: a string, a whole number, a repeatable ``KEY=VALUE``, or an on/off flag."""
    key: str | None = None
    """The ``[tool.partywall]`` key it sets, when a project may also fix it in a file."""
    secret: bool = False
    """Masked wherever the configuration is shown; never accepted from a file."""
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PARTYWALL_" + self.name.upper()

    @property
    def pytest_flag(self) -> str:
        return "--partywall-" + self.name.replace("_", "-")

    @property
    def pytest_dest(self) -> str:
        return "partywall_" + self.name

    def add_to(self, add: Callable[..., Any], *, pytest: bool = False) -> None:
        """Declare it with ``add`` (argparse's ``add_argument`` or pytest's ``addoption``, which take the same words)."""
        kwargs: dict[str, Any] = {"dest": self.pytest_dest if pytest else self.name,
                                  "help": f"{self.help} [{self.env}]"}
        if self.kind == "list":
            kwargs.update(action="append", default=[], metavar=self.metavar)
        elif self.kind == "flag":
            kwargs.update(action="store_true", default=False)
        else:
            kwargs.update(default=None, metavar=self.metavar, type=int if self.kind == "int" else str)
        add(self.pytest_flag if pytest else self.flag, **kwargs)

    def parse(self, text: str, where: str) -> Any:
        """The value of ``text`` read from ``where`` (an environment variable), or HarnessError."""
        if self.kind == "int":
            try:
                return int(text)
            except ValueError:
                raise HarnessError(f"{where} must be a whole number (got {text!r}).") from None
        if self.kind == "list":
            return shlex.split(text)
        if self.kind == "flag":
            if text.lower() in {"1", "true", "yes", "on"}:
                return True
            if text.lower() in {"", "0", "false", "no", "off"}:
                return False
            raise HarnessError(f"{where} must be true or false (got {text!r}).")
        return text


_ALL = ("run", "bench", "replay", "config", "doctor")
_TARGET = ("run", "bench", "replay", "config", "doctor")

OPTIONS: tuple[Option, ...] = (
    Option("config", "read [tool.partywall] from this pyproject.toml (default: the nearest one "
           "from the working directory upward)", _ALL, metavar="PATH"),
    Option("set", "change one [tool.partywall] key for this run, e.g. timing.response_ms=8000 "
           "(repeatable)", _ALL, kind="list", metavar="KEY=VALUE"),
    Option("profile", "the Hypothesis profile: smoke, dev, ci, nightly or one of your own",
           ("run", "replay", "config"), key="profile", metavar="NAME"),
    Option("seed", "the run's seed (default: the profile's, else random)", ("run", "bench", "replay", "config"),
           kind="int", metavar="N"),
    Option("server_url", "test a running server at ws://HOST:PORT/ws (crash checks cannot run)",
           _TARGET, key="server_url", metavar="URL"),
    Option("server_cmd", "start the server with `sh -c CMD`; it prints `listening on ws://HOST:PORT/ws`",
           _TARGET, key="server_cmd", metavar="CMD"),
    Option("auth_secret", "the HS256 secret the server signs tokens with", _TARGET, secret=True,
           metavar="SECRET"),
    Option("token_cmd", "instead of --auth-secret: run CMD TENANT USER (no shell; PARTYWALL_TENANT and "
           "PARTYWALL_USER set) for each identity; its stdout is the credential, kept for the run",
           _TARGET, metavar="CMD"),
    Option("identities", "test pre-provisioned tenants and users, reused by every example, from a TOML or "
           "JSON file: [[tenants]] id = \"acme-test\", users = [{id = \"alice\", credential = \"...\"}, "
           "{id = \"bob\"}]; a user without credential gets one from --token-cmd; at least 2 tenants, "
           "2 users in the first", _TARGET, metavar="FILE"),
    Option("adapter", "a partywall.adapter.Adapter subclass for a server with another wire format "
           "(module:Class or path/to/file.py:Class)",
           _TARGET, key="adapter", metavar="MODULE:CLASS"),
    Option("ca_file", "wss://: verify the server's certificate against this PEM CA file instead of the "
           "system's trust store", _TARGET, metavar="PATH"),
    Option("insecure", "wss://: do not verify the server's certificate (the report records it)",
           _TARGET, kind="flag"),
    Option("report", "write the JSON report here", ("run", "bench", "replay", "merge"), metavar="PATH"),
    Option("replay_dir", "where failure replay files go", ("run", "config"), key="replay_dir",
           metavar="DIR"),
    Option("users", "bench: number of users", ("bench", "config"), kind="int", key="bench.users",
           metavar="N"),
    Option("server_pid", "bench: pid of a --server-url server, for its CPU and memory", ("bench",),
           kind="int", metavar="PID"),
    Option("junit", "bench: write JUnit XML here", ("bench", "merge"), metavar="PATH"),
    Option("html", "bench: write the HTML report here", ("bench", "merge"), metavar="PATH"),
    Option("shard", "bench: run shard K of N of the plan's users", ("bench",), metavar="K/N"),
    Option("openmetrics", "bench: write the figures as OpenMetrics text (Prometheus's format) here",
           ("bench",), metavar="PATH"),
    Option("pushgateway", "bench: push the figures to the Prometheus Pushgateway at this http(s) URL "
           "(job and time-out: bench.pushgateway_job, bench.pushgateway_timeout_s)", ("bench",), metavar="URL"),
    Option("workers", "bench: run the plan as N shards in N processes here, started at one instant, and merge "
           "them into one report (with --dask: N shards on the cluster)", ("bench",), kind="int", metavar="N"),
    Option("dask", "bench: run one shard per worker of the Dask cluster whose scheduler is at ADDRESS "
           "(tcp://HOST:PORT; needs partywall[dask]) and merge them into one report", ("bench",),
           metavar="ADDRESS"),
    Option("start_gate", "bench, set by --workers and --dask for their shards: say ready on stdout and start "
           "on a line 'go' on stdin", ("bench",), metavar="stdio"),
)
OPTION = {o.name: o for o in OPTIONS}


def defaults() -> dict[str, Any]:
    """The packaged defaults, read from inside the installed package."""
    text = importlib.resources.files("partywall").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _table_of(path: Path) -> dict[str, Any] | None:
    """``[tool.partywall]`` of a TOML file, None when it has none; HarnessError when it is not TOML."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path} is not valid TOML ({exc}); fix the file, or pass --config PATH.") from None
    except OSError as exc:
        raise HarnessError(f"cannot read {path} ({exc.strerror or exc}).") from None
    table = data.get("tool", {}).get("partywall")
    if table is not None and not isinstance(table, dict):
        raise HarnessError(f"{path}: tool.partywall must be a table (got {table!r}).")
    return table


def find_project_file(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` from ``start`` upward that has a ``[tool.partywall]`` table."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                if _table_of(candidate) is not None:
                    return candidate
            except HarnessError:
                # Another project's broken file is not ours to refuse, unless we would read it.
                continue
    return None


def _leaves(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _accepts(dotted: str, old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, int):
        return isinstance(new, int) or (isinstance(new, float) and dotted.endswith(_FRACTIONAL_SUFFIXES))
    if isinstance(old, float):
        return isinstance(new, (int, float))
    return isinstance(new, type(old))


@attrs.define
class _Builder:
    """The table being layered, and where each of its values came from."""

    table: dict[str, Any]
    sources: dict[str, str]

    def slot(self, dotted: str, where: str) -> tuple[dict[str, Any], str, Any]:
        """The table holding ``dotted``, its last part, and the value in force (HarnessError if unknown)."""
        parts = dotted.split(".")
        node = self.table
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                raise self.unknown(dotted, where)
            node = child
        last = parts[-1]
        if last not in node:
            if parts[0] == "profiles" and len(parts) == 3 and last in PROFILE_KEYS:
                return node, last, PROFILE_KEYS[last]()
            raise self.unknown(dotted, where)
        if isinstance(node[last], dict):
            raise HarnessError(f"{where}: {dotted} is a table; set one of its keys "
                               f"({', '.join(sorted(node[last]))}).")
        return node, last, node[last]

    def unknown(self, dotted: str, where: str) -> HarnessError:
        name = dotted.split(".")[-1]
        hint = ""
        if name in OPTION and OPTION[name].key is None:
            opt = OPTION[name]
            what = "is a secret, which never belongs in a file" if opt.secret else "is not a file setting"
            hint = f" {opt.flag} {what}; use {opt.flag} or {opt.env}."
        known = ", ".join(k for k, _ in _leaves(self.table) if "." not in k)
        tables = ", ".join(f"[{k}]" for k, v in self.table.items() if isinstance(v, dict))
        return HarnessError(f"{where}: unknown key {dotted!r}.{hint or f' Known keys: {known}; tables {tables}.'}")

    def put(self, dotted: str, value: Any, where: str) -> None:
        node, last, old = self.slot(dotted, where)
        if not _accepts(dotted, old, value):
            raise HarnessError(f"{where}: {dotted} must be {_type_name(old)} (got {value!r}).")
        if dotted in POSITIVE_KEYS and not (math.isfinite(value) and value > 0):
            raise HarnessError(f"{where}: {dotted} must be a finite number greater than 0 (got {value!r}).")
        node[last] = float(value) if isinstance(old, float) and not isinstance(value, bool) else value
        self.sources[dotted] = where

    def add_profile(self, name: str) -> None:
        """A profile of the project's own: it starts as a copy of `dev`."""
        if name not in self.table["profiles"]:
            self.table["profiles"][name] = dict(self.table["profiles"]["dev"])
            for key in self.table["profiles"][name]:
                self.sources[f"profiles.{name}.{key}"] = f"{DEFAULTS_SOURCE} (profile dev)"

    def merge_file(self, table: Mapping[str, Any], path: Path) -> None:
        profiles = table.get("profiles", {})
        if isinstance(profiles, dict):
            for name, prof in profiles.items():
                if isinstance(prof, dict):
                    self.add_profile(name)
        for dotted, value in _leaves(table):
            self.put(dotted, value, str(path))

    def put_text(self, item: str, where: str) -> None:
        """``KEY=VALUE`` from --set or PARTYWALL_SET: the value is JSON when it parses, else a string."""
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"{where} expects KEY=VALUE (got {item!r}).")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        self.put(key.strip(), value, where)


@attrs.frozen
class Settings:
    """The configuration in force for one run, and where each value came from."""

    table: dict[str, Any]
    """``[tool.partywall]`` as the layers leave it: every key present."""
    sources: dict[str, str]
    """Dotted key → where its value came from (``partywall defaults``, a file, a variable, an option)."""
    options: dict[str, Any]
    """Every option by name: its value in force, or None when it is not set anywhere."""
    option_sources: dict[str, str]
    project_file: Path | None
    """The ``pyproject.toml`` whose ``[tool.partywall]`` was read, if any."""

    def __getitem__(self, key: str) -> Any:
        return self.table[key]

    def get(self, name: str) -> Any:
        """An option's value (None when unset)."""
        return self.options[name]

    def profile(self, name: str | None = None) -> dict[str, Any]:
        """The settings of a Hypothesis profile (the one in force by default)."""
        return dict(self.table["profiles"][name or self.options["profile"]])

    def shown(self) -> list[tuple[str, str, str]]:
        """(name, value, source) of every setting, secrets masked: what `partywall config` prints."""
        rows = [(k, json.dumps(v, ensure_ascii=False), self.sources[k]) for k, v in _leaves(self.table)]
        for opt in OPTIONS:
            if opt.key is not None or opt.name in {"config", "set"}:
                continue
            value = self.options[opt.name]
            text = "(not set)" if value is None else ("********" if opt.secret else json.dumps(value))
            rows.append((opt.flag, text, self.option_sources.get(opt.name, "")))
        return rows


def _is_given(value: Any) -> bool:
    """Whether a command-line value was given: None, an unset flag (False) and an empty list were not.

    By identity, not equality: ``0 == False``, and ``--seed 0`` is a value.
    """
    return not (value is None or value is False or (isinstance(value, list) and not value))


def resolve(given: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> Settings:
    """The settings in force, from the packaged defaults, a project file, the environment and ``given``.

    ``given`` holds the command line's values by option name (None or absent
    when the option was not given). HarnessError names the key, what was
    expected and where the bad value came from.
    """
    given = {k: v for k, v in (given or {}).items() if _is_given(v)}
    environ = os.environ if environ is None else environ
    unknown = set(given) - set(OPTION)
    if unknown:
        raise HarnessError(f"unknown option(s): {', '.join(sorted(unknown))}.")

    def env_value(opt: Option) -> Any:
        text = environ.get(opt.env)
        return None if text is None or (text == "" and opt.kind != "flag") else opt.parse(text, opt.env)

    b = _Builder(copy.deepcopy(defaults()), {})
    for dotted, _ in _leaves(b.table):
        b.sources[dotted] = DEFAULTS_SOURCE

    explicit = given.get("config") or env_value(OPTION["config"])
    if explicit:
        path = Path(explicit).expanduser()
        where = "--config" if given.get("config") else OPTION["config"].env
        if not path.is_file():
            raise HarnessError(f"{where} {explicit}: no such file.")
        table = _table_of(path)
        if table is None:
            raise HarnessError(f"{where} {explicit}: the file has no [tool.partywall] table.")
        project: Path | None = path.resolve()
    else:
        project = find_project_file(cwd)
        table = _table_of(project) if project else None
    if table:
        assert project is not None
        b.merge_file(table, project)

    for opt in OPTIONS:
        value = env_value(opt) if opt.name != "set" else None
        if opt.key is not None and value is not None:
            b.put(opt.key, value, opt.env)
    for item in env_value(OPTION["set"]) or []:
        b.put_text(item, OPTION["set"].env)
    for opt in OPTIONS:
        if opt.key is not None and opt.name in given:
            b.put(opt.key, given[opt.name], opt.flag)
    for item in given.get("set", []):
        b.put_text(item, "--set")

    options: dict[str, Any] = {}
    option_sources: dict[str, str] = {}
    for opt in OPTIONS:
        if opt.key is not None:
            value = _lookup(b.table, opt.key)
            options[opt.name] = None if value == "" else value
            option_sources[opt.name] = b.sources[opt.key]
        elif opt.name in given:
            options[opt.name], option_sources[opt.name] = given[opt.name], opt.flag
        else:
            value = env_value(opt)
            options[opt.name] = value
            if value is not None:
                option_sources[opt.name] = opt.env
    options["config"] = str(project) if project else None
    if b.sources["profile"] == DEFAULTS_SOURCE and environ.get("CI"):
        # Hypothesis's own convention: under CI its `ci` profile; partywall's `ci` replaces it.
        options["profile"] = b.table["profile"] = "ci"
        b.sources["profile"] = option_sources["profile"] = "CI is set"

    profile = options["profile"]
    if profile not in b.table["profiles"]:
        raise HarnessError(f"profile {profile!r} (from {b.sources['profile']}) is not defined; defined "
                           f"profiles: {', '.join(b.table['profiles'])}, or add [tool.partywall.profiles.{profile}].")
    return Settings(b.table, b.sources, options, option_sources, project)


def _lookup(table: Mapping[str, Any], dotted: str) -> Any:
    node: Any = table
    for part in dotted.split("."):
        node = node[part]
    return node


def from_namespace(values: Mapping[str, Any], names: Sequence[str] = tuple(OPTION), *,
                   pytest: bool = False) -> dict[str, Any]:
    """The options given among ``values`` (argparse's by name, or pytest's by ``partywall_<name>``)."""
    out = {}
    for name in names:
        value = values.get(OPTION[name].pytest_dest if pytest else name)
        if _is_given(value):
            out[name] = value
    return out
