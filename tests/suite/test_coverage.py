"""docs/coverage.md stays true: every clause it quotes is in PROTOCOL.md, every check, fault and test it names exists.

Rules: the matrix is parsed as a reader sees it (its markdown tables). A
quoted clause must occur in docs/PROTOCOL.md (whitespace aside); a check
must be registered (or be one of the run-level checks the suite records
itself); a planted fault must exist in the reference server, and every
planted fault must prove some clause; a client clause names a test that
exists. docs/PROTOCOL.md is the project's copy of the shared contract: where
the shared original is present, the two are identical.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from partywall_props.invariants import INVARIANTS

from partywall_agentserver.faults import FAULTS

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ROOT / "docs" / "coverage.md"
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"
#: Checks the suite records outside the per-event registry: the run-level percentile check and
#: the machine's own record of a valid token refused at the handshake.
RUN_LEVEL_CHECKS = {"percentile_limits", "valid_token_accepted"}


def _plain(text: str) -> str:
    return " ".join(text.split())


def _rows(prefix: str) -> list[list[str]]:
    rows = []
    for line in MATRIX.read_text().splitlines():
        if re.match(rf"^\| {prefix}\d+ \|", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _names(cell: str) -> list[str]:
    return re.findall(r"`([a-z_0-9]+)`", cell)


def _quote(cell: str) -> str:
    match = re.match(r'^"(.+?)"(?: \(.*\))?$', cell)
    assert match, f"a clause cell must be a quotation: {cell}"
    return match.group(1)


SERVER_ROWS = _rows("")
CLIENT_ROWS = _rows("C")


def test_coverage_matrix_has_its_rows() -> None:
    assert len(SERVER_ROWS) >= 25 and len(CLIENT_ROWS) >= 3
    assert [int(r[0]) for r in SERVER_ROWS] == list(range(1, len(SERVER_ROWS) + 1))


@pytest.mark.parametrize("row", SERVER_ROWS + CLIENT_ROWS, ids=lambda r: r[0])
def test_coverage_every_quoted_clause_is_in_the_protocol(row: list[str]) -> None:
    assert _plain(_quote(row[1])) in _plain(PROTOCOL.read_text()), f"not in PROTOCOL.md: {row[1]}"


def test_coverage_names_only_checks_and_faults_that_exist() -> None:
    checks = {inv.check for inv in INVARIANTS.select()} | RUN_LEVEL_CHECKS
    proven = set()
    for row in SERVER_ROWS:
        number, _clause, check_cell, fault_cell, times = row
        if "**gap**" in check_cell:
            continue
        named = [n for n in _names(check_cell)]
        assert named and set(named) <= checks, f"row {number}: unknown checks {set(named) - checks}"
        if "**gap**" in fault_cell:
            continue
        faults = _names(fault_cell)
        assert faults and set(faults) <= set(FAULTS), f"row {number}: unknown faults {set(faults) - set(FAULTS)}"
        assert len([t for t in times.split(", ")]) == len(faults), f"row {number}: one time per fault"
        proven |= set(faults)
    assert set(FAULTS) <= proven, f"planted faults that prove no clause: {sorted(set(FAULTS) - proven)}"


def test_coverage_client_rows_name_tests_that_exist() -> None:
    source = (ROOT / "tests" / "suite" / "test_client_clauses.py").read_text()
    for number, _clause, test in CLIENT_ROWS:
        (name,) = _names(test)
        assert f"def {name}(" in source, f"row {number}: no test {name}"


def test_coverage_protocol_copy_matches_the_shared_contract() -> None:
    shared = ROOT.parent / "shared" / "PROTOCOL.md"
    if not shared.is_file():
        pytest.skip("the shared contract is not beside this checkout")
    assert PROTOCOL.read_text() == shared.read_text(), "docs/PROTOCOL.md differs from ../shared/PROTOCOL.md: copy it again"
