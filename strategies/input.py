"""Bad input the server must refuse cleanly, and request parameters at their limits."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from partywall.adapter import MAX_FRAME_IN, MAX_ID
from partywall.tokens import BAD_TOKEN_KINDS

#: Malformed frames, each with the answer PROTOCOL.md requires.
BAD_FRAME_KINDS = (
    "invalid_json",
    "binary",
    "nan",
    "non_object",
    "unknown_type",
    "missing_field",
    "wrong_type",
    "lone_surrogate",
    "long_id",
    "oversize",
)


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


def bad_frame(kind: str, req_id: str) -> tuple[str | bytes, str, bool | None, str]:
    """The frame for ``kind``: (message, the id in it, whether that id is readable
    so the error must carry it as ``re`` — None where the protocol leaves it
    open — and the error code PROTOCOL.md requires)."""
    rid = json.dumps(req_id)
    if kind == "invalid_json":
        return '{"type": "ping", "id": ' + rid + ",", req_id, False, "bad_request"
    if kind == "binary":
        return json.dumps({"type": "ping", "id": req_id}).encode(), req_id, False, "bad_request"
    if kind == "nan":
        return '{"type": "get_history", "id": ' + rid + ', "thread_id": "x", "limit": NaN}', req_id, None, "bad_request"
    if kind == "non_object":
        return json.dumps(["ping", req_id]), req_id, False, "bad_request"
    if kind == "unknown_type":
        return json.dumps({"type": "subscribe_all_tenants", "id": req_id}), req_id, True, "bad_request"
    if kind == "missing_field":
        return json.dumps({"type": "user_message", "id": req_id, "content": "x"}), req_id, True, "bad_request"
    if kind == "wrong_type":
        return json.dumps({"type": "join_thread", "id": req_id, "thread_id": 42}), req_id, True, "bad_request"
    if kind == "lone_surrogate":
        return '{"type": "ping", "id": ' + rid + ', "note": "\\ud800"}', req_id, None, "bad_request"
    if kind == "long_id":
        long_id = (req_id + "-" + "i" * MAX_ID)[: MAX_ID + 1]
        return json.dumps({"type": "ping", "id": long_id}), long_id, None, "bad_request"
    if kind == "oversize":
        pad = "x" * (MAX_FRAME_IN + 1)
        return json.dumps({"type": "ping", "id": req_id, "pad": pad}), req_id, False, "too_large"
    raise ValueError(f"unknown bad frame kind {kind!r}")
