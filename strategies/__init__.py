"""Everything the state machines draw: tenants, users, names, content, bad input.

Each function returns a ``SearchStrategy`` and says how it shrinks. Ids are
drawn as real data looks and as an attacker would choose them: the same user
id in two tenants, ids that differ only by case or Unicode normalisation
form, non-ASCII and maximum-length ids. Content reaches the protocol's
boundaries (empty, about 8 KiB, exactly 16,384 bytes of UTF-8, one byte over)
and all of Unicode, not only the short ASCII a default text strategy yields.
Markers are never drawn: the harness mints them and `build_content` places
them, so shrinking cannot make two markers equal.
"""

from partywall_strategies.content import ContentPlan, build_content, contents
from partywall_strategies.ids import (
    assistant_names,
    bad_assistant_names,
    id_text,
    tenant_bases,
    user_ids,
)
from partywall_strategies.input import (
    BAD_FRAME_KINDS,
    bad_frame,
    bad_frames,
    history_limits,
    token_kinds,
)

__all__ = [
    "BAD_FRAME_KINDS",
    "ContentPlan",
    "assistant_names",
    "bad_assistant_names",
    "bad_frame",
    "bad_frames",
    "build_content",
    "contents",
    "history_limits",
    "id_text",
    "tenant_bases",
    "token_kinds",
    "user_ids",
]
