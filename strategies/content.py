"""Message content that reaches the protocol's boundaries and all of Unicode."""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from partywall.adapter import MAX_CONTENT
from partywall.markers import MARKER_LEN

#: Size classes: what the body is built to, in bytes of UTF-8 of the whole content.
SIZES = ("short", "empty", "around_8k", "exact_limit", "one_over")

#: Any code point that can travel in JSON text: everything but surrogates.
TEXT_CHARS = st.characters(exclude_categories=("Cs",))


@attrs.frozen
class ContentPlan:
    """What a message will say, before the harness places its marker."""

    size: str = attrs.field(validator=attrs.validators.in_(SIZES))
    """short (free text), empty (no text, no marker), or a byte size at a boundary."""
    text: str = ""
    """Free text for ``short``; for the sized classes, the filler repeated to the size."""

    def __repr__(self) -> str:
        return f"ContentPlan({self.size!r}, {self.text!r})"


@st.composite
def contents(draw: st.DrawFn) -> ContentPlan:
    """A content plan. Mostly short text drawn from all of Unicode (astral and
    non-Latin-1 characters included); sometimes empty, about 8 KiB, exactly
    16,384 bytes, or 16,385 bytes. Shrinks toward short empty text."""
    size = draw(st.sampled_from(SIZES))
    if size == "short":
        return ContentPlan(size, draw(st.text(TEXT_CHARS, max_size=40)))
    if size == "empty":
        return ContentPlan(size, "")
    filler = draw(st.one_of(st.just("a"), st.sampled_from(["é", "€", "😀", "中"]), TEXT_CHARS))
    return ContentPlan(size, filler)


def target_bytes(size: str) -> int | None:
    return {"around_8k": 8 * 1024, "exact_limit": MAX_CONTENT, "one_over": MAX_CONTENT + 1}.get(size)


def build_content(plan: ContentPlan, marker: str) -> str:
    """The content to send: the marker, a space, and the body, built so the
    whole is exactly the plan's byte size (a multi-byte filler is topped up
    with ASCII). ``empty`` sends the empty string and carries no marker."""
    if plan.size == "empty":
        return ""
    head = marker + " "
    if plan.size == "short":
        return head + plan.text
    want = target_bytes(plan.size)
    assert want is not None
    room = want - len(head.encode())
    unit = len(plan.text.encode("utf-8"))
    body = plan.text * (room // unit) + "a" * (room % unit)
    content = head + body
    assert len(content.encode("utf-8")) == want and len(head) == MARKER_LEN + 1
    return content
