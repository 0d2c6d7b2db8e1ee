"""Bad input the server must refuse cleanly, and request parameters at their limits.

The kinds are drawn here; the adapter makes each in its service's wire format
(`partywall.adapter.Adapter.bad_frame`) with the answer the service owes it."""

from __future__ import annotations

from hypothesis import strategies as st

from partywall.adapter import BAD_FRAME_KINDS
from partywall.tokens import BAD_TOKEN_KINDS


def bad_frames() -> st.SearchStrategy[str]:
    """A kind of malformed frame; shrinks toward ``invalid_json`` (oversize, which
    closes the connection, comes last)."""
    return st.sampled_from(BAD_FRAME_KINDS)


#: The malformed frames a service must answer by closing the connection (too_large, 1009).
CLOSING_KINDS = ("oversize", "oversize_16mib")


def closing_frames() -> st.SearchStrategy[str | None]:
    """Which frame the service must answer by closing, if any, goes after the others:
    none, one just over its frame limit, or one of 16 MiB. Shrinks toward none."""
    return st.sampled_from([None, *CLOSING_KINDS])


def token_kinds() -> st.SearchStrategy[str]:
    """A kind of token the server must refuse; shrinks toward ``unsigned``."""
    return st.sampled_from(BAD_TOKEN_KINDS)


#: ``limit`` values: absent, valid ones, and each kind the protocol refuses, one draw each.
LIMITS = (None, 2, True, 0, 1, 2.0, -1, "3", 5)


def history_limits() -> st.SearchStrategy[object]:
    """The ``limit`` of a history read: absent (None), a valid positive int, or a
    value the protocol refuses (true, 0, 2.0, negative, a string). One flat choice,
    so that every kind is as likely as any other (a nested choice left ``true``
    undrawn for whole runs). Shrinks toward no limit."""
    return st.sampled_from(LIMITS)
