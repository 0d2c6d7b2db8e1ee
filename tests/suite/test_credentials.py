"""Credentials from where a team has them: ``--token-cmd`` and ``--identities``, without the secret.

Rules: the runs are the installed command in a subprocess (``CI`` removed
from its environment), against real reference servers on 127.0.0.1 started
with ``--server-cmd``; the server knows its secret, partywall is never told
it. The token command is a small script this module writes, which mints with
the server's secret (what a team's own token service does) and logs every
identity it is asked for. Nothing here bounds wall-clock time.
"""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from partywall_props.invariants import INVARIANTS
from partywall_props.model import Model

from partywall.adapter import Adapter
from partywall.checks import Checker
from partywall.credentials import (
    NEEDS_SECRET,
    SECRET_FREE_KINDS,
    CommandCredentials,
    Identities,
    MintedCredentials,
    ProvisionedCredentials,
    from_settings,
    tamper,
    user_index,
)
from partywall.errors import HarnessError, TargetError
from partywall.markers import Registry
from partywall.target import CommandTarget, make_target
from tests.suite.test_invariants import Sim

SECRET = "credentials-" + "x" * 32
FAST = "--startup-ms 0:5 --chunk-delay-ms 1:3"

#: What a team's token service does: mint for the identity it is asked for, and nothing else.
MINT = """\
import os, sys, time
import jwt

tenant, user = sys.argv[1], sys.argv[2]
if (os.environ.get("PARTYWALL_TENANT"), os.environ.get("PARTYWALL_USER")) != (tenant, user):
    sys.exit("the environment does not name the identity of the arguments")
with open(sys.argv[0] + ".log", "a", encoding="utf-8") as log:
    log.write(json.dumps([tenant, user]) + "\\n")
print(jwt.encode({"tid": tenant, "sub": user, "exp": time.time() + 3600}, SECRET, algorithm="HS256"))
"""


def partywall(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PARTYWALL_AUTH_SECRET")}
    return subprocess.run([sys.executable, "-m", "partywall.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


def server_cmd(folder: Path) -> str:
    """The reference server with its own secret; partywall is not told it."""
    return (f"{shlex.quote(sys.executable)} -m partywall_agentserver --port 0 "
            f"--db {shlex.quote(str(folder / 'server.db'))} --secret {SECRET} {FAST}")


def token_script(folder: Path, body: str = MINT) -> tuple[str, Path]:
    """A token command (a Python file run by this interpreter) and the log of identities it was asked for."""
    script = folder / "mint_token.py"
    script.write_text(f"import json\nSECRET = {SECRET!r}\n" + body, encoding="utf-8")
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}", Path(str(script) + ".log")


def asked(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(json.loads(line)) for line in log.read_text(encoding="utf-8").splitlines()]  # type: ignore[misc]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


# -- the runs ----------------------------------------------------------------------------


def test_token_cmd_without_the_secret_passes_and_lists_the_secret_only_checks_as_not_run(tmp_path: Path) -> None:
    cmd, log = token_script(tmp_path)
    report = tmp_path / "r.json"
    proc = partywall("run", "--profile", "smoke", "--server-cmd", server_cmd(tmp_path), "--token-cmd", cmd,
                     "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["violations"] == []
    assert data["credentials"]["source"] == "command" and data["credentials"]["secret"] is False
    not_run = {item["check"]: item["reason"] for item in data["not_run"]}
    assert set(not_run) == {f"refused_token:{kind}" for kind in NEEDS_SECRET} | {"valid_token:expires_within_a_second",
                                                                                "valid_token:other_claims"}
    assert all("secret" in reason and "--token-cmd" in reason for reason in not_run.values())
    for kind in NEEDS_SECRET:
        assert f"not run: refused_token:{kind}" in proc.stdout
    # Asked once per identity (kept for the run), for the run's own generated tenants.
    identities = asked(log)
    assert identities and len(identities) == len(set(identities))
    assert all(tenant.startswith(f"pw{data['run_id']}") for tenant, _ in identities)


def test_a_failing_token_cmd_stops_the_run_with_its_stderr_on_one_line(tmp_path: Path) -> None:
    cmd, _ = token_script(tmp_path, "import sys\nsys.stderr.write('warming up\\n')\n"
                                    "sys.exit('vault says: no test account for ' + sys.argv[1])\n")
    report = tmp_path / "r.json"
    proc = partywall("run", "--profile", "smoke", "--server-cmd", server_cmd(tmp_path), "--token-cmd", cmd,
                     "--report", str(report), cwd=tmp_path)
    line = one_line_error(proc)
    assert "exited with code 1" in line and "vault says: no test account for pw" in line, line
    assert "warming up" in line
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["violations"] == [] and "vault says" in data["error"]


def test_a_token_cmd_that_is_not_found_or_too_slow_is_exit_2(tmp_path: Path) -> None:
    missing = partywall("run", "--profile", "smoke", "--server-cmd", server_cmd(tmp_path),
                        "--token-cmd", str(tmp_path / "no-such-minter"), cwd=tmp_path)
    assert "cannot find the program" in one_line_error(missing)

    slow, _ = token_script(tmp_path, "import sys, time\nsys.stderr.write('asking the vault\\n')\n"
                                     "sys.stderr.flush()\ntime.sleep(600)\n")
    proc = partywall("run", "--profile", "smoke", "--server-cmd", server_cmd(tmp_path), "--token-cmd", slow,
                     "--set", "token_cmd_timeout_s=1", cwd=tmp_path)
    line = one_line_error(proc)
    assert "took longer than 1 s" in line and "asking the vault" in line, line


def write_identities(folder: Path, text: str, name: str = "identities.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def provisioned(folder: Path) -> Path:
    """Two tenants; acme-test's alice has a credential in the file, the others come from --token-cmd."""
    alice = jwt.encode({"tid": "acme-test", "sub": "alice", "exp": time.time() + 3600}, SECRET, algorithm="HS256")
    return write_identities(folder, f"""\
[[tenants]]
id = "acme-test"
users = [{{id = "alice", credential = "{alice}"}}, {{id = "bob"}}]

[[tenants]]
id = "globex-test"
users = [{{id = "alice"}}]
""")


def test_identities_reuse_the_provisioned_tenants_across_examples_and_runs(tmp_path: Path) -> None:
    cmd, log = token_script(tmp_path)
    ids = provisioned(tmp_path)
    reports = []
    # Twice against one database: the second run meets the threads of the first in its
    # tenants, which are theirs and no violation.
    for run in (1, 2):
        report = tmp_path / f"r{run}.json"
        proc = partywall("run", "--profile", "smoke", "--server-cmd", server_cmd(tmp_path), "--token-cmd", cmd,
                         "--identities", str(ids), "--report", str(report), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        reports.append(json.loads(report.read_text()))
    for data in reports:
        assert data["ok"] is True
        assert data["stats"]["examples"] >= 2
        assert data["stats"]["tenants"] == ["acme-test", "globex-test"]
        assert data["credentials"]["identities"]["tenants"] == {"acme-test": ["alice", "bob"],
                                                                "globex-test": ["alice"]}
        assert {n["check"] for n in data["not_run"]} >= {f"refused_token:{k}" for k in NEEDS_SECRET}
    # The command is asked only for the users without a credential in the file, once per run.
    assert sorted(asked(log)) == sorted([("acme-test", "bob"), ("globex-test", "alice")] * 2)
    # What the server saw: only the provisioned tenants and users.
    db = sqlite3.connect(tmp_path / "server.db")
    try:
        tenants = {row[0] for row in db.execute("SELECT DISTINCT tenant FROM threads")}
        users = {(t, u) for t, u in db.execute("SELECT tenant, user_id FROM userbase")}
        threads = db.execute("SELECT COUNT(*) FROM threads").fetchone()[0]
    finally:
        db.close()
    assert tenants == {"acme-test", "globex-test"}
    assert users and users <= {("acme-test", "alice"), ("acme-test", "bob"), ("globex-test", "alice")}
    assert threads >= 2 * 2 * reports[0]["stats"]["examples"]  # every example starts two threads, at least


@pytest.mark.parametrize(
    "text, name, says",
    [
        ('[[tenants]]\nid = "acme-test"\nusers = [{id = "alice"}, {id = "bob"}]\n', "one.toml",
         "needs at least 2 tenants with at least 2 users in the first (got 1 tenant"),
        ('[[tenants]]\nid = "a"\nusers = [{id = "alice"}]\n[[tenants]]\nid = "b"\nusers = [{id = "x"}]\n',
         "few.toml", "at least 2 users in the first"),
        ("[[tenants]\nid = 1\n", "broken.toml", "not valid TOML"),
        ('{"tenants": [}', "broken.json", "not valid JSON"),
        ('[[tenants]]\nid = "a"\nusers = [{id = "alice", credentials = "t"}, {id = "bob"}]\n'
         '[[tenants]]\nid = "b"\nusers = [{id = "x"}]\n', "typo.toml", "unknown key(s) 'credentials'"),
        ('[[tenants]]\nid = "a b"\nusers = [{id = "alice"}, {id = "bob"}]\n', "space.toml", "needs `id`"),
    ],
)
def test_a_bad_identities_file_is_one_line_naming_the_file_exit_2(tmp_path: Path, text: str, name: str,
                                                                  says: str) -> None:
    cmd, log = token_script(tmp_path)
    path = write_identities(tmp_path, text, name)
    proc = partywall("run", "--profile", "smoke", "--server-cmd", server_cmd(tmp_path), "--token-cmd", cmd,
                     "--identities", str(path), cwd=tmp_path)
    line = one_line_error(proc)
    assert str(path) in line and says in line, line
    assert asked(log) == []


def test_identities_without_credentials_or_token_cmd_is_refused(tmp_path: Path) -> None:
    path = write_identities(tmp_path, '[[tenants]]\nid = "a"\nusers = [{id = "alice", credential = "t"}, '
                                      '{id = "bob"}]\n[[tenants]]\nid = "b"\nusers = [{id = "x", credential = "u"}]\n')
    proc = partywall("run", "--server-cmd", server_cmd(tmp_path), "--identities", str(path), cwd=tmp_path)
    line = one_line_error(proc)
    assert str(path) in line and "'bob' of tenant 'a'" in line and "--token-cmd" in line, line


def test_bench_with_token_cmd_passes(tmp_path: Path) -> None:
    cmd, log = token_script(tmp_path)
    report = tmp_path / "bench.json"
    proc = partywall("bench", "--users", "5", "--server-cmd", server_cmd(tmp_path), "--token-cmd", cmd,
                     "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["users"] == 5
    assert data["success_rate"]["overall"] == 1.0
    assert len(asked(log)) == len(set(asked(log))) == 5  # five planned identities, each asked once


# -- the parts -----------------------------------------------------------------------------


def test_command_credentials_run_once_per_identity_with_the_identity_in_args_and_env(tmp_path: Path) -> None:
    cmd, log = token_script(tmp_path)
    creds = CommandCredentials(cmd)
    first = creds.for_identity("acme", "Alice")
    assert creds.for_identity("acme", "Alice") == first
    creds.for_identity("globex", "Alice")
    assert asked(log) == [("acme", "Alice"), ("globex", "Alice")] and creds.calls == 2
    claims = jwt.decode(first, SECRET, algorithms=["HS256"])
    assert (claims["tid"], claims["sub"]) == ("acme", "Alice")
    assert not creds.can_mint_bad


def test_command_credentials_refuse_a_command_that_prints_nothing_or_several_lines(tmp_path: Path) -> None:
    quiet, _ = token_script(tmp_path, "")
    with pytest.raises(HarnessError, match="printed nothing"):
        CommandCredentials(quiet).for_identity("acme", "alice")
    chatty, _ = token_script(tmp_path, "print('fetching token...')\nprint('eyJ.x.y')\n")
    with pytest.raises(HarnessError, match="printed 2 lines"):
        CommandCredentials(chatty).for_identity("acme", "alice")


@pytest.mark.parametrize("kind", SECRET_FREE_KINDS)
def test_refused_kinds_without_the_secret_never_verify(tmp_path: Path, kind: str) -> None:
    cmd, _ = token_script(tmp_path)
    creds = CommandCredentials(cmd)
    assert creds.kind_for(kind) == kind
    bad = creds.bad(kind, "acme", "alice")
    if kind == "missing":
        assert bad == ""
        assert Adapter().handshake("ws://h:1/ws", bad, "header") == ("ws://h:1/ws", [])
        assert Adapter().handshake("ws://h:1/ws", bad, "query") == ("ws://h:1/ws", [])
        return
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(bad, SECRET, algorithms=["HS256"])


def test_without_the_secret_each_secret_only_kind_is_replaced_and_listed() -> None:
    creds = ProvisionedCredentials(Identities.from_data(
        {"tenants": [{"id": "a", "users": [{"id": "u", "credential": "c.d.efgh"}, {"id": "v", "credential": "x"}]},
                     {"id": "b", "users": [{"id": "w", "credential": "y"}]}]}, "ids.toml"))
    assert {kind: creds.kind_for(kind) for kind in NEEDS_SECRET}.keys() == set(NEEDS_SECRET)
    assert all(creds.kind_for(kind) in ("missing", "tampered") for kind in NEEDS_SECRET)
    assert [check for check, _ in creds.not_run()] == [f"refused_token:{kind}" for kind in NEEDS_SECRET] + [
        "valid_token:expires_within_a_second", "valid_token:other_claims"]
    assert creds.with_other_claims("a", "u") is None
    assert creds.bad("tampered", "a", "u") != "c.d.efgh"
    minted = MintedCredentials(SECRET)
    assert minted.can_mint_bad and minted.not_run() == []
    assert all(minted.kind_for(kind) == kind for kind in NEEDS_SECRET)


def test_a_token_with_other_claims_is_valid_and_carries_what_a_library_checks_by_default() -> None:
    token = MintedCredentials(SECRET).with_other_claims("acme", "alice")
    assert token is not None
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_aud": False, "verify_nbf": False,
                                                                      "verify_iat": False})
    assert (claims["tid"], claims["sub"]) == ("acme", "alice") and claims["exp"] > time.time()
    assert claims["aud"] and claims["nbf"] > time.time() + 3000 and claims["iat"] > time.time() + 3000
    # PyJWT's defaults refuse it: the bug the suite looks for, not a fault of the token.
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(token, SECRET, algorithms=["HS256"])


def test_tamper_flips_one_character_inside_a_jwt_signature() -> None:
    token = jwt.encode({"tid": "a", "sub": "b", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    bad = tamper(token)
    assert len(bad) == len(token) and sum(x != y for x, y in zip(bad, token, strict=True)) == 1
    assert bad.rsplit(".", 1)[0] == token.rsplit(".", 1)[0]  # the signature changed, not the claims
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(bad, SECRET, algorithms=["HS256"])


def test_identities_in_toml_and_json_map_draws_cyclically(tmp_path: Path) -> None:
    toml = write_identities(tmp_path, '[[tenants]]\nid = "acme-test"\nusers = [{id = "alice", credential = "t"},'
                                      ' {id = "bob"}, {id = "carol"}]\n[[tenants]]\nid = "globex-test"\n'
                                      'users = [{id = "dave"}]\n')
    data: dict[str, Any] = {"tenants": [{"id": "acme-test", "users": [{"id": "alice", "credential": "t"},
                                                                      {"id": "bob"}, {"id": "carol"}]},
                                        {"id": "globex-test", "users": [{"id": "dave"}]}]}
    js = write_identities(tmp_path, json.dumps(data), "identities.json")
    a, b = Identities.load(toml), Identities.load(js)
    assert a.tenants == b.tenants
    assert [a.tenant_at(i).id for i in range(4)] == ["acme-test", "globex-test", "acme-test", "globex-test"]
    assert a.user_at("acme-test", user_index("alice")) == "alice"
    assert a.user_at("acme-test", user_index("bob")) == "bob"
    assert a.user_at("globex-test", user_index("alice")) == "dave"
    assert a.user_at("acme-test", user_index("李雷")) == a.user_at("acme-test", user_index("李雷"))
    assert a.without_credential() == [("acme-test", "bob"), ("acme-test", "carol"), ("globex-test", "dave")]
    with pytest.raises(HarnessError, match="has no credential"):
        from_settings(secret=None, token_cmd=None, identities=str(toml))
    creds, found = from_settings(secret=SECRET, token_cmd=None, identities=str(toml))
    assert found == a and creds.for_identity("acme-test", "alice") == "t"
    assert jwt.decode(creds.for_identity("acme-test", "bob"), SECRET, algorithms=["HS256"])["sub"] == "bob"


def test_make_target_needs_no_secret_with_token_cmd_or_identities() -> None:
    with pytest.raises(TargetError, match="--auth-secret SECRET .*--token-cmd CMD or --identities FILE"):
        make_target(server_cmd="run-server")
    target = make_target(server_cmd="run-server", credentials_from="--token-cmd")
    assert isinstance(target, CommandTarget) and target.secret is None
    assert target._env().get("PARTYWALL_AUTH_SECRET") == os.environ.get("PARTYWALL_AUTH_SECRET")  # none added
    with pytest.raises(TargetError, match="--identities applies to --server-url or --server-cmd"):
        make_target(credentials_from="--identities")


def test_threads_a_provisioned_tenant_held_before_are_its_own() -> None:
    """Two examples over one run's registry, the same two tenants: the second lists the first's
    thread and one of an earlier run; neither is a violation. A thread of the other tenant still is."""
    registry = Registry()

    def example() -> Sim:
        s = Sim()
        s.model = Model(registry)
        # Readable ids (T-acme-1, cid-c0) count up: ids_are_opaque is left to its own tests.
        s.checker = Checker(s.model, [c for c in INVARIANTS.select() if c.fn.__name__ != "ids_are_opaque"], s.history)
        s.connect("c0", "acme-test")
        s.connect("c1", "globex-test")
        return s

    first = example()
    first.start("c0", "r0", "T-acme-1")
    first.start("c1", "r1", "T-globex-1", assistant_id="as-g")
    assert first.found() == []

    second = example()
    second.start("c0", "r2", "T-acme-2")
    second.request("c0", "r3", "list_threads")
    listed = [{"thread_id": t, "assistant": "helper", "created_at": 1764000001.0, "message_count": 0}
              for t in ("T-acme-earlier-run", "T-acme-1", "T-acme-2")]
    second.reply("c0", "r3", {"type": "threads", "threads": listed}, final="ok")
    assert second.found() == []

    second.request("c0", "r4", "list_threads")
    leaked = [*listed, {"thread_id": "T-globex-1", "assistant": "helper", "created_at": 1764000001.0, "message_count": 0}]
    second.reply("c0", "r4", {"type": "threads", "threads": leaked}, final="ok")
    assert [(inv, check) for inv, check, _ in second.by_check()] == [("isolation", "no_foreign_data")]
