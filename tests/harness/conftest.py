"""Fixtures of the harness tests: a contract-following listener and a fake `agentserver`."""

from __future__ import annotations

import shlex
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONTRACT_SERVER = HERE / "contract_server.py"


@pytest.fixture
def server_cmd() -> str:
    """A shell command that runs the contract server on a free port (extra flags appended)."""
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(CONTRACT_SERVER))} --port 0"


@pytest.fixture
def fake_agentserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts a package named `partywall_agentserver` that runs the contract server first on PYTHONPATH.

    EmbeddedTarget runs ``python -m partywall_agentserver`` from its database directory,
    so PYTHONPATH wins over the installed (editable) reference server, whose
    finder comes after the path entries.
    """
    pkg = tmp_path / "fakepkgs" / "partywall_agentserver"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        textwrap.dedent(
            f"""
            import runpy, sys
            sys.argv[0] = {str(CONTRACT_SERVER)!r}
            runpy.run_path({str(CONTRACT_SERVER)!r}, run_name="__main__")
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    return pkg
