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


def token_kinds() -> st.SearchStrategy[str]:
    """A kind of token the server must refuse; shrinks toward ``unsigned``."""
    return st.sampled_from(BAD_TOKEN_KINDS)


def history_limits() -> st.SearchStrategy[object]:
    """The ``limit`` of a history read: absent (None), a valid positive int, or a
    value the protocol refuses (0, negative, true, 2.0, a string).
    Shrinks toward no limit."""
    return st.one_of(st.none(), st.integers(1, 6), st.sampled_from([0, -1, True, 2.0, "3"]))
