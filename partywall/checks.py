"""The checks engine: named invariants applied to every event of a history.

An invariant is a function ``(model, event, frame) -> iterable of Violation``
registered under a name with a one-line docstring, so the command line can
list and select them (as schemathesis's checks are). The engine calls every
selected invariant on each event *before* the model takes the event in, so a
check sees the state the frame arrived into; then the model applies it.

The engine keeps every violation it has seen, in order, with the history
around it, and never drops one: a leak seen once is reported even if the
shrunk case does not reproduce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs

from partywall.adapter import Frame
from partywall.errors import HarnessError, Violation
from partywall.history import Event, History


class Model(Protocol):
    """What the checks know: folded from the history, one event at a time."""

    def apply(self, event: Event, frame: Frame | None) -> None: ...


CheckFn = Callable[[Any, Event, "Frame | None"], Iterable[Violation]]


@attrs.frozen
class Invariant:
    """A named check."""

    name: str
    """The name the command line and reports use (``isolation``, ``routing``...)."""
    doc: str
    """One line: what it means for the invariant to be violated."""
    fn: CheckFn = attrs.field(repr=False)
    """The check itself."""

    @property
    def check(self) -> str:
        """The check's own name (its function's), which reports carry beside the invariant's."""
        return str(getattr(self.fn, "__name__", self.name))


class InvariantRegistry:
    """Invariants by name, in registration order."""

    def __init__(self) -> None:
        self._by_name: dict[str, list[Invariant]] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[CheckFn], CheckFn]:
        """Decorator: add a check function under invariant ``name`` (an invariant may have several)."""

        def deco(fn: CheckFn) -> CheckFn:
            line = (fn.__doc__ or "").strip().splitlines()
            if name not in self._docs:
                if not (doc or line):
                    raise TypeError(f"invariant {name!r} needs a one-line docstring")
                self._docs[name] = doc or line[0]
            self._by_name.setdefault(name, []).append(Invariant(name, (fn.__doc__ or doc or "").strip(), fn))
            return fn

        return deco

    def describe(self, name: str, doc: str) -> None:
        """Set the one-line description of invariant ``name``."""
        self._docs[name] = doc

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def doc(self, name: str) -> str:
        return self._docs[name]

    def select(self, names: Sequence[str] | None = None) -> list[Invariant]:
        """The checks of the named invariants (all when None); an unknown name is a harness error."""
        if names is None:
            names = self.names
        unknown = [n for n in names if n not in self._by_name]
        if unknown:
            raise HarnessError(f"unknown invariant(s) {', '.join(unknown)}; known: {', '.join(self.names)}.")
        return [inv for n in names for inv in self._by_name[n]]


@attrs.frozen
class Found:
    """A violation as the engine recorded it."""

    violation: Violation
    event_seq: int
    step: int | None


class Checker:
    """Applies invariants to events as they happen and keeps what they find."""

    def __init__(self, model: Model, invariants: Sequence[Invariant], history: History) -> None:
        self.model = model
        self.invariants = list(invariants)
        self.history = history
        self.found: list[Found] = []

    def __call__(self, event: Event, frame: Frame | None) -> None:
        for inv in self.invariants:
            for v in inv.fn(self.model, event, frame):
                v.check = v.check or inv.check
                self.record(v, event)
        self.model.apply(event, frame)

    def record(self, violation: Violation, event: Event | None = None) -> None:
        seq = event.seq if event is not None else len(self.history)
        if event is not None:
            violation.evidence.setdefault("event", event.brief())
            violation.evidence.setdefault("history_around", self.history.around(event.seq, event.conn))
        violation.evidence.setdefault("step", event.step if event is not None else self.history.step)
        self.found.append(Found(violation, seq, event.step if event is not None else self.history.step))
