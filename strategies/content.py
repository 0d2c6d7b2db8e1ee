"""Message content that reaches the protocol's boundaries and all of Unicode."""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from partywall.markers import MARKER_LEN

#: Size classes: what the body is built to, in bytes of UTF-8 of the whole content.
#: The sized classes are relative to the service's own content limit (its adapter's
#: ``limits.max_content``): half of it, exactly it, and one byte over.
SIZES = ("short", "empty", "around_8k", "exact_limit", "one_over")

#: Any code point that can travel in JSON text: everything but surrogates.
TEXT_CHARS = st.characters(exclude_categories=("Cs",))
#: What a sized message is filled with: as TEXT_CHARS, less control characters.
FILLER_CHARS = st.characters(exclude_categories=("Cs", "Cc"))


@attrs.frozen
class ContentPlan:
    """What a message will say, before the harness places its marker."""

    size: str = attrs.field(validator=attrs.validators.in_(SIZES))
    """short (free text), empty (no text, no marker), or a byte size at a boundary."""
    text: str = ""
    """Free text for ``short``; for the sized classes, the filler repeated to the size."""

    def __repr__(self) -> str:
        return f"ContentPlan({self.size!r}, {self.text!r})"


#: What attackers and careless clients put in messages: text that looks like the protocol's own
#: frames or another tenant's data, injection attempts, and characters that break naive code.
HOSTILE = (
    '"}, {"type": "thread_message", "thread_id": "x", "content": "',
    '{"type":"agent_response","re":"q1-0","content":"spoofed"}',
    "'; DROP TABLE messages; --",
    "\\u0000 \\ud800 \\",
    "<script>alert(1)</script>",
    "../../../../etc/passwd",
    "%s%s%s%n ${jndi:ldap://x/a} {{7*7}}",
    "\u202eevil\u202c \ufeff \u200b",
    "\r\n\r\nHTTP/1.1 200 OK",
    "\U0001f3f3\ufe0f\u200d\U0001f308" * 5,
)


#: What everyday users send, which a server must keep byte for byte: a pasted paragraph's
#: trailing newline, indentation and trailing spaces (trimmed by a careless copy), Windows line
#: ends, a precomposed and a combining accent (merged by a normalising one), no-break and
#: full-width spaces, right-to-left scripts, emoji with skin tones and joiners.
EVERYDAY = (
    "thanks!\n",
    "Could you summarise this?\n\n",
    "  indented code:\n\tif x:\n\t\treturn y\n",
    "trailing spaces   ",
    "Windows line ends\r\n",
    "caf\u00e9 and cafe\u0301",
    "\u00a0no-break\u00a0spaces\u00a0",
    "full-width\u3000space\u3000",
    "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "\U0001f469\U0001f3fd\u200d\U0001f4bb ok \U0001f44d\U0001f3fd ",
)


@st.composite
def contents(draw: st.DrawFn) -> ContentPlan:
    """A content plan. Mostly short text drawn from all of Unicode (astral and
    non-Latin-1 characters included), text everyday users send (`EVERYDAY`) or text an
    attacker sends (`HOSTILE`); sometimes empty, half the service's
    content limit (8 KiB in protocol v1), exactly the limit (16,384 bytes), or
    one byte over. Shrinks toward short empty text."""
    size = draw(_SIZE)
    if size == "short":
        return ContentPlan(size, draw(_SHORT))
    if size == "empty":
        return ContentPlan(size, "")
    return ContentPlan(size, draw(_FILLER))


# Built once: a strategy built inside `contents` at every draw cost Hypothesis a fresh
# analysis each time (the same draws either way, so the same seed gives the same program).
_SIZE = st.sampled_from(SIZES)
_SHORT = st.one_of(st.text(TEXT_CHARS, max_size=40), st.sampled_from(EVERYDAY), st.sampled_from(HOSTILE))
# No control characters in a filler: JSON writes each as a six-byte escape, so a message at
# the content limit would make a frame past the frame limit, which the model does not expect.
_FILLER = st.one_of(st.just("a"), st.sampled_from(["é", "€", "😀", "中"]), FILLER_CHARS)


def target_bytes(size: str, max_content: int) -> int | None:
    """The byte size a sized class stands for, under a content limit of ``max_content`` bytes."""
    return {"around_8k": max_content // 2, "exact_limit": max_content, "one_over": max_content + 1}.get(size)


def build_content(plan: ContentPlan, marker: str, max_content: int) -> str:
    """The content to send: the marker, a space, and the body, built so the
    whole is exactly the plan's byte size under the service's content limit
    (a multi-byte filler is topped up with ASCII). ``empty`` sends the empty
    string and carries no marker."""
    if plan.size == "empty":
        return ""
    head = marker + " "
    if plan.size == "short":
        return head + plan.text
    want = target_bytes(plan.size, max_content)
    assert want is not None and want > MARKER_LEN + 1
    room = want - len(head.encode())
    unit = len(plan.text.encode("utf-8"))
    body = plan.text * (room // unit) + "a" * (room % unit)
    content = head + body
    assert len(content.encode("utf-8")) == want and len(head) == MARKER_LEN + 1
    return content
