"""The recorded history of a run: every operation and every frame, in order.

Like a Jepsen history: each operation is an ``invoke`` event followed by
``ok``, ``fail`` or ``info`` (outcome unknown), and every frame a connection
receives is a ``frame`` event. Times are ``time.monotonic()`` seconds, taken
when the request was meant to go out (invoke) and when the frame was read.
Checks read only this, so they run the same on a live run and on a replay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from types import EllipsisType
from typing import Any

import attrs

KINDS = ("invoke", "ok", "fail", "info", "frame")


@attrs.frozen
class Event:
    """One entry of the history."""

    seq: int
    """Position in the history, from 0."""
    t: float
    """``time.monotonic()`` when it happened (for invoke: when the request was meant to go out)."""
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    """invoke, ok, fail, info or frame."""
    op: str
    """The operation: connect, close, drop, crash, restart, a request type, or a frame type."""
    conn: str | None = None
    """The connection's name (``c3``), when the event belongs to one."""
    req_id: str | None = None
    """The request id, for requests and the frames that answer them (``re``)."""
    data: Mapping[str, Any] = attrs.field(factory=dict)
    """The request sent, the frame parsed, or facts about the operation."""
    raw: str | None = None
    """A frame's text exactly as received."""
    step: int | None = None
    """The state-machine step that caused it, when known."""
    wire_id: str | None = None
    """For a request: the id it carried on the wire, its connection's own (`Adapter.request_ids`);
    the frames that answer it carry that id as ``re``."""

    def brief(self) -> dict[str, Any]:
        """A JSON-able summary for evidence and reports."""
        out: dict[str, Any] = {"seq": self.seq, "t": round(self.t, 6), "kind": self.kind, "op": self.op}
        if self.conn is not None:
            out["conn"] = self.conn
        if self.req_id is not None:
            out["req_id"] = self.req_id
        if self.step is not None:
            out["step"] = self.step
        if self.wire_id is not None:
            out["id"] = self.wire_id
        if self.raw is not None:
            out["raw"] = self.raw if len(self.raw) <= 600 else self.raw[:600] + f"... ({len(self.raw)} chars)"
        elif self.data:
            out["data"] = {k: _short(v) for k, v in self.data.items()}
        return out


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


class History:
    """Append-only list of events; appended from the driver's trio thread."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self.step: int | None = None

    def append(self, kind: str, op: str, *, t: float | None = None, step: int | None | EllipsisType = ...,
               **fields: Any) -> Event:
        """Add an event; ``step`` is the machine's step when it happened (the current one unless given)."""
        with self._lock:
            ev = Event(
                seq=len(self._events),
                t=time.monotonic() if t is None else t,
                kind=kind,
                op=op,
                step=self.step if step is ... else step,
                **fields,
            )
            self._events.append(ev)
        return ev

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self._events))

    def around(self, seq: int, conn: str | None = None, before: int = 8, after: int = 2) -> list[dict[str, Any]]:
        """The events near ``seq`` (of one connection, when given), briefly, for evidence."""
        events = [e for e in self._events if conn is None or e.conn == conn]
        idx = next((i for i, e in enumerate(events) if e.seq >= seq), len(events))
        return [e.brief() for e in events[max(0, idx - before) : idx + after + 1]]
