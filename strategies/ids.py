"""Tenant, user and assistant ids, as real data looks and as an attacker picks them."""

from __future__ import annotations

import unicodedata

import attrs
from hypothesis import strategies as st

from partywall.adapter import valid_id

#: Drawn ids are any length up to this many code points; those at the service's own
#: limit and just over it are `AtLimit` values, made once the limit is known.
MAX_ID = 64

#: Characters allowed in ids: any code point but whitespace, controls (Cc) and
#: surrogates (Cs). Separators are excluded too, since str.isspace covers them.
ID_CHARS = st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")).filter(lambda c: not c.isspace())

_CAFE_NFC = unicodedata.normalize("NFC", "café")
_CAFE_NFD = unicodedata.normalize("NFD", "café")
_ANGSTROM = "\u212b"  # ANGSTROM SIGN; NFC turns it into U+00C5, a different string here


@attrs.frozen
class AtLimit:
    """An id as long as the service allows (``over`` 0) or longer: ``char`` repeated to
    the adapter's ``limits.max_id`` plus ``over`` code points (`AtLimit.build`)."""

    char: str
    over: int = 0

    def build(self, max_id: int) -> str:
        return self.char * (max_id + self.over)

    def __repr__(self) -> str:
        return f"AtLimit({self.char!r}, {self.over})"


def resolve_id(value: str | AtLimit, max_id: int) -> str:
    """The id to send for a drawn value, under an id limit of ``max_id`` code points."""
    return value.build(max_id) if isinstance(value, AtLimit) else value


def id_text(max_len: int = MAX_ID) -> st.SearchStrategy[str]:
    """Any valid id of 1..max_len code points; shrinks toward ``"0"``-like one-character ids."""
    return st.text(ID_CHARS, min_size=1, max_size=max(1, max_len)).filter(valid_id)


def tenant_bases(max_len: int = 40) -> st.SearchStrategy[str]:
    """The part of a tenant id after the example's unique prefix.

    Names that collide once case or normalisation is ignored come first (so
    two tenants of one example often differ only by case or by NFC vs NFD),
    then non-ASCII names, then arbitrary ids up to ``max_len``. Shrinks
    toward ``"acme"``.
    """
    fixed = st.sampled_from(
        ["acme", "Acme", "ACME", "globex", _CAFE_NFC, _CAFE_NFD, "\u00c5ngstr\u00f6m", _ANGSTROM + "ngstr\u00f6m",
         "東京商事", "Ωmega", "🏢corp", "o'brien", "a/b", "x" * max_len, "\u00fc" * max_len]
    )
    return st.one_of(fixed, id_text(max_len))


def user_ids(max_len: int = MAX_ID) -> st.SearchStrategy[str | AtLimit]:
    """User ids: a few common names that recur across tenants, their case and
    Unicode variants, ids exactly as long as the service allows (in ASCII, and in
    two-byte characters: twice as many bytes of UTF-8 as code points), and
    arbitrary ids up to 64 code points. Shrinks toward ``"alice"``."""
    fixed = st.sampled_from(["alice", "bob", "Alice", "ALICE", _CAFE_NFC, _CAFE_NFD, "李雷", "🙂", AtLimit("u"),
                             AtLimit("\u00e9")])
    return st.one_of(fixed, id_text(max_len))


def assistant_names() -> st.SearchStrategy[str | AtLimit]:
    """Assistant names, mostly shared across tenants (the same name in two
    tenants must give two assistants), names exactly as long as the service
    allows (in ASCII, in two-byte characters, and in emoji, four bytes of UTF-8
    and two UTF-16 units each: a limit counted in bytes or in UTF-16 refuses
    them). Shrinks toward ``"helper"``."""
    return st.one_of(st.sampled_from(["helper", "support", "Helper", "analyst", AtLimit("h"), AtLimit("\u00e9"),
                                      AtLimit("\U0001f916")]), id_text())


def bad_assistant_names() -> st.SearchStrategy[str | AtLimit]:
    """Names the server must refuse with bad_request: empty, whitespace,
    controls, one code point over the service's limit. Shrinks toward ``""``."""
    return st.one_of(
        st.sampled_from(["", " ", "two words", "tab\there", "nl\n", "nul\x00", AtLimit("a", 1), AtLimit("é", 1)]),
        id_text().map(lambda s: s + "\u2028"),
    )
