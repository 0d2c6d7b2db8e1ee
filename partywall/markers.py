"""Markers and the run's registry of who owns what.

A marker is an unambiguous token planted in every message a tenant sends:
``PWM`` + 6 hex digits derived from the run's seed + a 7-digit counter + ``Z``.
Fixed width means no marker is a prefix or substring of another, the hex and
digits cannot be produced by shrinking text (markers are minted by the harness,
never drawn), and a regular expression finds every one in any frame, history
or error: no substring guessing on numbers, as the seed suite did.

The registry maps every marker and every server-made id the suite has seen
to the tenant it belongs to, so a stray one is traced to its owner.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading

import attrs

MARKER_RE = re.compile(r"PWM[0-9a-f]{6}[0-9]{7}Z")
MARKER_LEN = 3 + 6 + 7 + 1


def seed_tag(seed: int | str) -> str:
    """Six hex digits that name a seed; the same seed always gives the same tag."""
    return hashlib.sha256(str(seed).encode()).hexdigest()[:6]


class MarkerMint:
    """Mints markers from a seed: the n-th marker of a seed is always the same."""

    def __init__(self, seed: int | str) -> None:
        self.tag = seed_tag(seed)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            n = next(self._counter)
        if n >= 10**7:
            raise RuntimeError("marker counter exhausted (10 million markers in one run)")
        return f"PWM{self.tag}{n:07d}Z"


@attrs.frozen
class Owner:
    """Who a marker or id belongs to."""

    tenant: str
    """The tenant id (the exact string, as in the token)."""
    what: str
    """What kind of thing it is: marker, thread_id, message_id, agent_id, assistant_id, connection_id."""
    origin: str
    """Where the suite first saw it: a connection name and frame seq, or the request that planted it."""
    user: str | None = None
    """The user it belongs to, where threads are private to their user (None: the whole tenant's)."""

    def label(self) -> str:
        """The owner in words: ``tenant 'acme'``, or ``user 'alice' of tenant 'acme'``."""
        return f"tenant {self.tenant!r}" if self.user is None else f"user {self.user!r} of tenant {self.tenant!r}"


class Registry:
    """One per run: every marker and server id the suite knows, and its tenant."""

    def __init__(self) -> None:
        self._owners: dict[str, Owner] = {}

    def claim(self, token: str, tenant: str, what: str, origin: str, user: str | None = None) -> Owner:
        """Record ``token`` as ``tenant``'s (and ``user``'s, where threads are private to their user),
        unless it is known already; return its owner."""
        return self._owners.setdefault(token, Owner(tenant, what, origin, user))

    def owner(self, token: str) -> Owner | None:
        return self._owners.get(token)

    def __len__(self) -> int:
        return len(self._owners)


def markers_in(text: str) -> list[str]:
    """Every marker that occurs in ``text``."""
    return MARKER_RE.findall(text)
