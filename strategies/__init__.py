"""Everything the state machines draw: tenants, users, names, content, bad input.

Each function returns a ``SearchStrategy`` and says how it shrinks. Ids are
drawn as real data looks and as an attacker would choose them: the same user
id in two tenants, ids that differ only by case or Unicode normalisation
form, non-ASCII and maximum-length ids. Content reaches the service's
boundaries (empty, half its limit, exactly its limit in bytes of UTF-8, one
byte over: 16,384 in protocol v1; the adapter's ``limits`` say)
and all of Unicode, not only the short ASCII a default text strategy yields.
Markers are never drawn: the harness mints them and `build_content` places
them, so shrinking cannot make two markers equal.
"""

from partywall_strategies.content import HOSTILE, ContentPlan, build_content, contents
from partywall_strategies.ids import (
    AtLimit,
    assistant_names,
    bad_assistant_names,
    id_text,
    resolve_id,
    tenant_bases,
    user_ids,
)
from partywall_strategies.input import (
    BAD_FRAME_KINDS,
    CLOSING_KINDS,
    bad_frames,
    closing_frames,
    history_limits,
    token_kinds,
)

__all__ = [
    "BAD_FRAME_KINDS",
    "CLOSING_KINDS",
    "HOSTILE",
    "AtLimit",
    "ContentPlan",
    "assistant_names",
    "bad_assistant_names",
    "bad_frames",
    "build_content",
    "closing_frames",
    "contents",
    "history_limits",
    "id_text",
    "resolve_id",
    "tenant_bases",
    "token_kinds",
    "user_ids",
]
