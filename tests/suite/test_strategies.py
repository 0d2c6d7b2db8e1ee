"""What the strategies draw reaches the protocol's edges, and markers stay distinct.

Rules: pure Hypothesis tests, no sockets. `find` shows a strategy can reach a
case (the edge cases are not just possible on paper); `given` checks what
every draw must satisfy.
"""

from __future__ import annotations

import json
import unicodedata

from hypothesis import find, given
from hypothesis import strategies as st
from partywall_strategies import (
    BAD_FRAME_KINDS,
    AtLimit,
    bad_assistant_names,
    build_content,
    contents,
    id_text,
    resolve_id,
    tenant_bases,
    user_ids,
)

from partywall.adapter import Adapter, Limits, valid_id
from partywall.markers import MARKER_LEN, MarkerMint, markers_in


@given(tenant_bases(), user_ids(), st.sampled_from([8, 40, 64]))
def test_strategies_ids_are_valid(base: str, uid: str | AtLimit, max_id: int) -> None:
    uid = resolve_id(uid, max_id)
    assert valid_id(base) and valid_id(uid, max(max_id, 64))


@given(bad_assistant_names(), st.sampled_from([8, 40, 64]))
def test_strategies_bad_names_are_invalid_under_any_limit(name: str | AtLimit, max_id: int) -> None:
    assert not valid_id(resolve_id(name, max_id), max_id)


def test_strategies_reach_case_and_normalisation_twins() -> None:
    pair = find(st.tuples(tenant_bases(), tenant_bases()),
                lambda p: p[0] != p[1] and unicodedata.normalize("NFC", p[0]) == unicodedata.normalize("NFC", p[1]))
    assert pair[0] != pair[1]
    find(st.tuples(tenant_bases(), tenant_bases()), lambda p: p[0] != p[1] and p[0].lower() == p[1].lower())
    find(id_text(), lambda s: any(ord(c) > 0xFFFF for c in s))  # astral characters
    limit = find(user_ids(), lambda s: isinstance(s, AtLimit))
    assert len(resolve_id(limit, 40)) == 40 and len(resolve_id(limit, 64)) == 64


@given(contents(), st.sampled_from([8_000, 16_384]))
def test_strategies_content_hits_its_byte_size(plan, max_content: int) -> None:  # type: ignore[no-untyped-def]
    marker = MarkerMint(1).next()
    content = build_content(plan, marker, max_content)
    size = len(content.encode("utf-8"))
    expected = {"around_8k": max_content // 2, "exact_limit": max_content, "one_over": max_content + 1}.get(plan.size)
    if expected is not None:
        assert size == expected
    if plan.size == "empty":
        assert content == ""
    else:
        assert markers_in(content)[0] == marker
    json.dumps(content)  # no surrogates: it travels as JSON


def test_strategies_content_reaches_beyond_latin1() -> None:
    find(contents(), lambda p: p.size == "short" and any(ord(c) > 0xFF for c in p.text))
    find(contents(), lambda p: p.size == "exact_limit" and len(p.text.encode()) > 1)


def test_markers_are_reproducible_distinct_and_fixed_width() -> None:
    a, b = MarkerMint(42), MarkerMint(42)
    first = [a.next() for _ in range(1000)]
    assert first == [b.next() for _ in range(1000)]
    assert len(set(first)) == 1000 and {len(m) for m in first} == {MARKER_LEN}
    assert MarkerMint(43).next() != first[0]
    joined = " ".join(first)
    assert markers_in(joined) == first  # no marker hides inside another


def test_bad_frames_cover_every_kind() -> None:
    class Small(Adapter):
        limits = Limits(max_id=10, max_frame_in=8000)

    for adapter, frame_limit in ((Adapter(), 65_536), (Small(), 8000)):
        for kind in BAD_FRAME_KINDS:
            made = adapter.bad_frame(kind, "q1-0")
            assert made is not None
            message, rid, readable, expect = made
            size = len(message if isinstance(message, bytes) else message.encode())
            assert (size > frame_limit) == kind.startswith("oversize")
            assert expect == ("too_large" if kind.startswith("oversize") else "bad_request")
            if kind == "long_id":
                assert len(rid) == adapter.limits.max_id + 1
