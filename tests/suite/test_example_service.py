"""The second protocol: partywall against chatline (``examples/chatline``), through its adapter.

chatline differs from protocol v1 in framing, credentials (a cookie, or a
hello message after the socket opens, from a token command: the suite never
has its secret), thread semantics (conversations private to their user;
multi-device sync to the owner's other connections instead of joins) and
streaming (parts counted from 1). The same generated suite, the same model
and the same invariants run against it, following what its adapter declares.

Rules, as for the reference server's fault proofs: the example is started by
``--server-cmd`` exactly as a team starts its own service; the clean service
passes the whole ``ci`` profile; each of its planted faults is caught, named
by invariant and check, shrunk to a short program with a generated step, and
reproduced 3 of 3 times; and what its semantics make impossible is listed
under ``not_run``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chatline"
ADAPTER = f"{EXAMPLE / 'adapter.py'}:ChatlineAdapter"
SECRET = "chatline-proof-" + "y" * 24

#: Each planted fault of chatline: the invariant, and the checks that may name it.
FAULTS: dict[str, tuple[str, frozenset[str]]] = {
    # Another user's conversation answers like one's own: its ids and markers reach that user,
    # or it answers differently from one that does not exist, whichever the program meets first.
    "org_wide_conversations": ("isolation", frozenset({"no_foreign_data", "foreign_like_absent"})),
    "sync_to_org": ("isolation", frozenset({"no_foreign_data"})),
    "echo_to_sender": ("routing", frozenset({"no_copy_to_requester"})),
    "lost_part": ("exactly-once", frozenset({"one_complete_reply"})),
    "cookie_skips_signature": ("isolation", frozenset({"identity_as_token"})),
}

pytestmark = pytest.mark.slow


@attrs.frozen
class Outcome:
    code: int
    report: dict[str, Any]
    output: str


def run_against_chatline(folder: Path, fault: str | None) -> Outcome:
    """``partywall run --profile ci`` against a fresh chatline, credentials from its token command."""
    folder.mkdir(parents=True, exist_ok=True)
    server = f"{sys.executable} {EXAMPLE / 'server.py'} --port 0 --db {folder / 'chatline.db'}"
    if fault is not None:
        server += f" --fault {fault}"
    report = folder / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTYWALL_")}
    env["CHATLINE_SECRET"] = SECRET  # the service's and its token command's; never the suite's
    proc = subprocess.run(
        [sys.executable, "-m", "partywall.cli", "run", "--profile", "ci", "--server-cmd", server,
         "--token-cmd", f"{sys.executable} {EXAMPLE / 'mint_token.py'}", "--adapter", ADAPTER,
         "--report", str(report), "--replay-dir", str(folder), "--set", "shrink_seconds=25"],
        capture_output=True, text=True, timeout=600, cwd=folder, env=env,
    )
    return Outcome(proc.returncode, json.loads(report.read_text()), proc.stdout + proc.stderr)


def test_example_service_is_a_black_box() -> None:
    """The service and its token command import nothing of partywall; only the adapter does."""
    for name in ("server.py", "mint_token.py"):
        tree = ast.parse((EXAMPLE / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if m.startswith("partywall")}, f"{name} imports {sorted(imported)}"
    assert "--fault" in (EXAMPLE / "server.py").read_text()
    readme = (EXAMPLE / "README.md").read_text()
    assert all(f"`{fault}`" in readme for fault in FAULTS), "every planted fault is documented"


def test_example_clean_passes_and_lists_what_its_semantics_rule_out(tmp_path: Path) -> None:
    clean = run_against_chatline(tmp_path, None)
    assert clean.code == 0, f"clean chatline fails the ci profile:\n{clean.output[-3000:]}"
    report = clean.report
    assert report["violations"] == [] and report["error"] is None
    assert report["stats"]["examples"] >= 100  # the whole ci profile ran
    not_run = {item["check"] for item in report["not_run"]}
    assert {"operation join_thread", "operation leave_thread", "operation list_threads", "operation ping",
            "get_history limit"} <= not_run
    assert "refused_token:expired" in not_run  # minting one needs the secret, which the suite never has
    rules = report["stats"]["rules"]
    assert {"talk", "chat", "probe", "read_history", "connect", "crowd", "crash_and_restart", "bad_token",
            "bad_frame", "bad_name"} <= set(rules), rules


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_example_fault_is_found(tmp_path: Path, fault: str) -> None:
    invariant, checks = FAULTS[fault]
    found = run_against_chatline(tmp_path, fault)
    assert found.code == 1, f"expected exit 1 against chatline --fault {fault}, got {found.code}:\n{found.output[-3000:]}"
    v = found.report["violations"][0]
    assert v["invariant"] == invariant and v["check"] in checks, (
        f"{fault} must be caught by {invariant}/{sorted(checks)}, got {v['invariant']}/{v['check']}: {v['title']}")
    program = json.loads(Path(v["replay"]).read_text())["program"]
    rules = [step["rule"] for step in program]
    assert len(program) <= 8 and rules[0] == "world" and len(rules) > 1, f"shrunk program: {rules}"
    assert v["reproduced"] == "3/3"
