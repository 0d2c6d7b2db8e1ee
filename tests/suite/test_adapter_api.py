"""The adapter API: versions, loading by module or file, and the operations a service declares.

Rules: adapters are written to files of each test's own folder; loading is
checked through `load_adapter` and through `partywall run` as a subprocess
against the embedded reference server (it speaks every operation, so a run
with an adapter that declares fewer must simply send none of the others).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from partywall.adapter import API_VERSION, KNOWN_OPERATIONS, Adapter, load_adapter
from partywall.errors import HarnessError

FEWER_OPS = frozenset({"start_agent", "user_message", "get_history", "join_thread"})
#: Protocol v1 without leave_thread, list_threads and ping, logging every request type it encodes.
FEWER = """\
from partywall.adapter import Adapter


class Fewer(Adapter):
    name = "v1-without-extras"
    operations = frozenset({"start_agent", "user_message", "get_history", "join_thread"})

    def encode(self, req_type, req_id, fields):
        with open("encoded.log", "a") as log:
            log.write(req_type + "\\n")
        return super().encode(req_type, req_id, fields)
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_adapter_loads_from_a_file_path(tmp_path: Path) -> None:
    path = write(tmp_path, "fewer.py", FEWER)
    adapter = load_adapter(f"{path}:Fewer")
    assert isinstance(adapter, Adapter) and adapter.name == "v1-without-extras"
    assert adapter.operations == FEWER_OPS


@pytest.mark.parametrize(
    "body, says",
    [
        ("class A(Adapter):\n    api_version = 2\n",
         f"was written for adapter API version 2; this partywall speaks version {API_VERSION}"),
        ("class A(Adapter):\n    operations = frozenset({'start_agent', 'user_message'})\n",
         "lacks required operations: get_history"),
        ("class A(Adapter):\n    operations = Adapter.operations | {'delete_thread'}\n",
         "declares operations partywall does not know: delete_thread"),
        ("class A(Adapter):\n    operations = frozenset({'start_agent', 'user_message', 'get_history'})\n",
         "declares fan-out to joined connections but no join_thread"),
        ("from partywall.adapter import Semantics\nclass A(Adapter):\n    semantics = Semantics(fanout='owner')\n",
         "declares join_thread/leave_thread, which only fan-out to joined connections uses"),
        ("class A(Adapter):\n    semantics = {'thread_scope': 'user'}\n",
         "semantics must be a partywall.adapter.Semantics"),
        ("class A:\n    pass\n", "is not a subclass of partywall.adapter.Adapter"),
        ("raise RuntimeError('broken module')\n", "cannot load it (RuntimeError: broken module)"),
    ],
)
def test_adapter_refused_with_the_reason(tmp_path: Path, body: str, says: str) -> None:
    path = write(tmp_path, "bad_adapter.py", "from partywall.adapter import Adapter\n\n" + body)
    with pytest.raises(HarnessError) as info:
        load_adapter(f"{path}:A")
    assert says in str(info.value) and str(path) in str(info.value)


def test_adapter_refused_when_the_file_or_class_is_missing(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no file"):
        load_adapter(f"{tmp_path / 'nope.py'}:A")
    path = write(tmp_path, "empty.py", "")
    with pytest.raises(HarnessError, match="cannot load it"):
        load_adapter(f"{path}:Missing")


def test_adapter_with_fewer_operations_runs_and_lists_what_it_could_not(tmp_path: Path) -> None:
    path = write(tmp_path, "fewer.py", FEWER)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "run", "--profile", "smoke", "--adapter",
                           f"{path}:Fewer", "--report", "r.json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sent = set((tmp_path / "encoded.log").read_text().split())
    assert {"start_agent", "user_message", "get_history"} <= sent
    assert not sent & (KNOWN_OPERATIONS - FEWER_OPS), sent
    not_run = {item["check"] for item in json.loads((tmp_path / "r.json").read_text())["not_run"]}
    assert {"operation leave_thread", "operation list_threads", "operation ping"} <= not_run


def test_adapter_api_version_mismatch_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "old.py", "from partywall.adapter import Adapter\n\nclass Old(Adapter):\n    api_version = 0\n")
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "run", "--profile", "smoke", "--adapter",
                           f"{path}:Old"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "adapter API version 0" in lines[0] and f"speaks version {API_VERSION}" in lines[0]


def test_doctor_shows_each_operation_understood(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "doctor"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for op in ("ping", "start_agent", "user_message", "get_history", "list_threads", "leave_thread", "join_thread"):
        assert f"{op}: understood" in proc.stdout
    assert "<- agent_response:" in proc.stdout


def test_doctor_names_the_operation_the_adapter_misreads(tmp_path: Path) -> None:
    """An adapter that does not know which frame ends a ping: the doctor says so, exit 2."""
    path = write(tmp_path, "deaf.py", (
        "from partywall.adapter import Adapter\n\n"
        "class Deaf(Adapter):\n"
        "    def completes(self, req_type, frame):\n"
        "        return req_type != 'ping' and super().completes(req_type, frame)\n"))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run([sys.executable, "-m", "partywall.cli", "doctor", "--adapter", f"{path}:Deaf",
                           "--set", "reply_timeout_s=1"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ping: NOT UNDERSTOOD" in proc.stdout and "recognised no frame" in proc.stdout
    assert "start_agent: understood" in proc.stdout
    assert "did not understand the answers to ping." in proc.stdout
