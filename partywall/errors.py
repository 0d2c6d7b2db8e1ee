"""The two kinds of failure, kept apart so blame is never mixed up.

A `HarnessError` means the suite could not make the run (bad option, nothing
listening at the URL, a server command that never became ready): exit 2.
A `Violation` means the server broke a guarantee: exit 1. It is an
`AssertionError` so pytest and Hypothesis treat it as a failing test.
"""

from __future__ import annotations

from typing import Any


class HarnessError(Exception):
    """The run could not be made; the message is one sentence a person can act on."""


class TargetError(HarnessError):
    """The server under test could not be started or reached."""


class Violation(AssertionError):
    """A guarantee of the protocol was broken; carries the invariant's name and evidence."""

    def __init__(self, invariant: str, title: str, evidence: dict[str, Any] | None = None,
                 check: str | None = None) -> None:
        self.invariant = invariant
        self.title = title
        self.evidence = dict(evidence or {})
        self.check = check
        """The registered check that found it (one invariant has several); set by the checks engine."""
        super().__init__(f"[{invariant}] {title}")

    def to_json(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "check": self.check, "title": self.title, "evidence": self.evidence}
