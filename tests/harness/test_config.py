"""The settings' four layers: packaged defaults, the project's file, the environment, the command line.

Rules: every test resolves settings from a folder of its own (``cwd=tmp_path``)
and an environment it builds itself, so neither this repository's files nor
the machine's variables can stand in for what a test sets up.
"""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from partywall.config import DEFAULTS_SOURCE, OPTIONS, resolve
from partywall.errors import HarnessError

README = Path(__file__).resolve().parents[2] / "README.md"


def packaged() -> dict:
    return tomllib.loads(importlib.resources.files("partywall").joinpath("defaults.toml").read_text("utf-8"))


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_defaults_come_from_the_package_alone(tmp_path: Path) -> None:
    found = resolve(cwd=tmp_path, environ={})
    assert found.table == packaged() and found.project_file is None
    assert set(found.sources.values()) == {DEFAULTS_SOURCE}
    assert found.get("profile") == "dev" and found.get("server_url") is None


def test_config_project_file_is_found_upward_and_merged_key_by_key(tmp_path: Path) -> None:
    project = write(tmp_path, "[tool.partywall.bench.thresholds]\nagent_startup_p95_ms = 1500\n")
    write(tmp_path / "sub", "[project]\nname = 'no-partywall-table-here'\n")  # skipped: no [tool.partywall]
    deeper = tmp_path / "sub" / "deeper"
    deeper.mkdir()
    found = resolve(cwd=deeper, environ={})
    assert found.project_file == project
    assert found["bench"]["thresholds"]["agent_startup_p95_ms"] == 1500
    assert found.sources["bench.thresholds.agent_startup_p95_ms"] == str(project)
    # Every other key, in the same table too, keeps its default.
    assert found["bench"]["thresholds"]["agent_startup_p99_ms"] == packaged()["bench"]["thresholds"]["agent_startup_p99_ms"]
    assert found.sources["bench.thresholds.agent_startup_p99_ms"] == DEFAULTS_SOURCE
    assert found["timing"] == packaged()["timing"]


def test_config_layers_environment_over_file_and_command_line_over_both(tmp_path: Path) -> None:
    write(tmp_path, '[tool.partywall]\nprofile = "nightly"\nreply_timeout_s = 4\n[tool.partywall.timing]\nack_ms = 100\n')
    env = {"PARTYWALL_PROFILE": "ci", "PARTYWALL_SET": "timing.ack_ms=200 shrink_seconds=5",
           "PARTYWALL_AUTH_SECRET": "from-env", "PARTYWALL_SEED": "11"}
    found = resolve({}, environ=env, cwd=tmp_path)
    assert (found.get("profile"), found.sources["profile"]) == ("ci", "PARTYWALL_PROFILE")
    assert (found["timing"]["ack_ms"], found.sources["timing.ack_ms"]) == (200, "PARTYWALL_SET")
    assert found["reply_timeout_s"] == 4.0 and isinstance(found["reply_timeout_s"], float)
    assert (found.get("auth_secret"), found.get("seed")) == ("from-env", 11)
    found = resolve({"profile": "smoke", "set": ["timing.ack_ms=300"], "auth_secret": "given", "seed": 3},
                    environ=env, cwd=tmp_path)
    assert (found.get("profile"), found.sources["profile"]) == ("smoke", "--profile")
    assert (found["timing"]["ack_ms"], found.sources["timing.ack_ms"]) == (300, "--set")
    assert (found.get("auth_secret"), found.option_sources["auth_secret"]) == ("given", "--auth-secret")
    assert found.get("seed") == 3


def test_config_explicit_file_replaces_the_search(tmp_path: Path) -> None:
    write(tmp_path, "[tool.partywall]\nshrink_seconds = 1\n")
    other = write(tmp_path / "elsewhere", "[tool.partywall]\nshrink_seconds = 2\n")
    assert resolve({"config": str(other)}, environ={}, cwd=tmp_path)["shrink_seconds"] == 2.0
    assert resolve({}, environ={"PARTYWALL_CONFIG": str(other)}, cwd=tmp_path)["shrink_seconds"] == 2.0


def test_config_project_profile_starts_from_dev(tmp_path: Path) -> None:
    write(tmp_path, "[tool.partywall.profiles.pr]\nmax_examples = 3\nseed = 5\n")
    found = resolve({"profile": "pr"}, environ={}, cwd=tmp_path)
    assert found.profile() == {**packaged()["profiles"]["dev"], "max_examples": 3, "seed": 5}


def test_config_ci_variable_picks_the_ci_profile_unless_one_is_named(tmp_path: Path) -> None:
    assert resolve(environ={"CI": "true"}, cwd=tmp_path).get("profile") == "ci"
    assert resolve({"profile": "smoke"}, environ={"CI": "true"}, cwd=tmp_path).get("profile") == "smoke"


@pytest.mark.parametrize(
    "text, says",
    [
        ("[tool.partywall]\nreply_timout_s = 3\n", "unknown key 'reply_timout_s'"),
        ("[tool.partywall.timing]\nresponse_ms = 'slow'\n", "timing.response_ms must be a whole number (got 'slow')"),
        ("[tool.partywall.profiles.dev]\nderandomize = 1\n", "profiles.dev.derandomize must be true or false (got 1)"),
        ("[tool.partywall.profiles.x]\nmax_example = 3\n", "unknown key 'profiles.x.max_example'"),
        ("[tool.partywall]\nauth_secret = 'x'\n", "which never belongs in a file; use --auth-secret or PARTYWALL_AUTH_SECRET"),
        ("[tool.partywall]\ntiming = 3\n", "timing is a table"),
        ("[tool.partywall]\nprofile = 'weekly'\n", "profile 'weekly' (from {file}) is not defined"),
        ("[tool.partywall\n", "is not valid TOML"),
    ],
)
def test_config_bad_file_names_the_file_and_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as info:
        resolve({"config": str(path)} if "TOML" in says else {}, environ={}, cwd=tmp_path)
    assert str(path) in str(info.value) and says.format(file=path) in str(info.value)


@pytest.mark.parametrize(
    "given, env, says",
    [
        ({}, {"PARTYWALL_SEED": "abc"}, "PARTYWALL_SEED must be a whole number (got 'abc')"),
        ({}, {"PARTYWALL_SET": "timing"}, "PARTYWALL_SET expects KEY=VALUE (got 'timing')"),
        ({"set": ["bench.thresholds.violations=0.5"]}, {}, "bench.thresholds.violations must be a whole number"),
        ({"config": "nope.toml"}, {}, "--config nope.toml: no such file"),
    ],
)
def test_config_bad_variable_or_option_is_refused(tmp_path: Path, given: dict, env: dict, says: str) -> None:
    with pytest.raises(HarnessError) as info:
        resolve(given, environ=env, cwd=tmp_path)
    assert says in str(info.value)


def test_config_shows_every_setting_with_its_source_and_masks_secrets(tmp_path: Path) -> None:
    write(tmp_path, "[tool.partywall]\nshrink_seconds = 9\n")
    rows = {name: (value, source) for name, value, source in
            resolve(environ={"PARTYWALL_AUTH_SECRET": "hunter2"}, cwd=tmp_path).shown()}
    assert rows["shrink_seconds"] == ("9.0", str(tmp_path / "pyproject.toml"))
    assert rows["--auth-secret"] == ("********", "PARTYWALL_AUTH_SECRET")
    assert "hunter2" not in repr(rows)
    assert rows["bench.thresholds.violations"][1] == DEFAULTS_SOURCE


def test_config_every_option_follows_the_naming_rule_and_is_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    for opt in OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-")
        assert opt.env == "PARTYWALL_" + opt.name.upper()
        assert opt.pytest_flag == "--partywall-" + opt.name.replace("_", "-")
        row = f"| `{opt.flag}` | `{opt.env}` | `{opt.pytest_flag}` |"
        assert row in readme, f"the README's option table lacks {row}"


SHARD_LIMITS = {"bench.shard_ready_timeout_s": 120.0, "bench.dask_connect_timeout_s": 10.0,
                "bench.shard_finish_slack_s": 60.0}


def test_config_shard_limits_have_their_packaged_defaults(tmp_path: Path) -> None:
    found = resolve(cwd=tmp_path, environ={})
    rows = {name: (value, source) for name, value, source in found.shown()}
    for dotted, default in SHARD_LIMITS.items():
        key = dotted.split(".")[1]
        assert packaged()["bench"][key] == default
        assert found["bench"][key] == default and isinstance(found["bench"][key], float)
        assert rows[dotted] == (repr(default), DEFAULTS_SOURCE)


def test_config_shard_limits_are_set_by_file_variable_and_option(tmp_path: Path) -> None:
    project = write(tmp_path, "[tool.partywall.bench]\nshard_ready_timeout_s = 300\ndask_connect_timeout_s = 45.5\n")
    found = resolve({}, environ={"PARTYWALL_SET": "bench.shard_finish_slack_s=90"}, cwd=tmp_path)
    assert (found["bench"]["shard_ready_timeout_s"], found.sources["bench.shard_ready_timeout_s"]) == (300.0, str(project))
    assert (found["bench"]["dask_connect_timeout_s"], found.sources["bench.dask_connect_timeout_s"]) == (45.5, str(project))
    assert (found["bench"]["shard_finish_slack_s"], found.sources["bench.shard_finish_slack_s"]) == (90.0, "PARTYWALL_SET")
    found = resolve({"set": ["bench.shard_ready_timeout_s=2.5", "bench.shard_finish_slack_s=1"]},
                    environ={"PARTYWALL_SET": "bench.shard_finish_slack_s=90"}, cwd=tmp_path)
    assert (found["bench"]["shard_ready_timeout_s"], found.sources["bench.shard_ready_timeout_s"]) == (2.5, "--set")
    assert (found["bench"]["shard_finish_slack_s"], found.sources["bench.shard_finish_slack_s"]) == (1.0, "--set")
    assert found["bench"]["dask_connect_timeout_s"] == 45.5


@pytest.mark.parametrize("dotted", sorted(SHARD_LIMITS))
@pytest.mark.parametrize(
    "text, says",
    [
        ("0", "must be a finite number greater than 0 (got 0)"),
        ("-5", "must be a finite number greater than 0 (got -5)"),
        ("-0.5", "must be a finite number greater than 0 (got -0.5)"),
        ("NaN", "must be a finite number greater than 0 (got nan)"),
        ("Infinity", "must be a finite number greater than 0 (got inf)"),
        ("soon", "must be a number (got 'soon')"),
        ("true", "must be a number (got True)"),
    ],
)
def test_config_bad_shard_limit_is_refused_from_the_command_line(tmp_path: Path, dotted: str, text: str,
                                                                  says: str) -> None:
    with pytest.raises(HarnessError) as info:
        resolve({"set": [f"{dotted}={text}"]}, environ={}, cwd=tmp_path)
    assert str(info.value) == f"--set: {dotted} {says}."
    with pytest.raises(HarnessError) as info:
        resolve({}, environ={"PARTYWALL_SET": f"{dotted}={text}"}, cwd=tmp_path)
    assert str(info.value) == f"PARTYWALL_SET: {dotted} {says}."


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "'2 minutes'"])
def test_config_bad_shard_limit_in_the_project_file_names_the_file(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[tool.partywall.bench]\nshard_ready_timeout_s = {value}\n")
    with pytest.raises(HarnessError) as info:
        resolve({}, environ={}, cwd=tmp_path)
    assert str(info.value).startswith(f"{path}: bench.shard_ready_timeout_s must be a ")


def test_config_bad_shard_limit_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTYWALL_")}
    for command in (["config"], ["bench", "--workers", "2"]):
        proc = subprocess.run([sys.executable, "-m", "partywall.cli", *command,
                               "--set", "bench.shard_ready_timeout_s=-1"],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "partywall: --set: bench.shard_ready_timeout_s must be a finite number greater than 0 (got -1)."]
