"""Tenant, user and assistant ids, as real data looks and as an attacker picks them."""

from __future__ import annotations

import unicodedata

from hypothesis import strategies as st

from partywall.adapter import MAX_ID, valid_id

#: Characters allowed in ids: any code point but whitespace, controls (Cc) and
#: surrogates (Cs). Separators are excluded too, since str.isspace covers them.
ID_CHARS = st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")).filter(lambda c: not c.isspace())

_CAFE_NFC = unicodedata.normalize("NFC", "café")
_CAFE_NFD = unicodedata.normalize("NFD", "café")
_ANGSTROM = "\u212b"  # ANGSTROM SIGN; NFC turns it into U+00C5, a different string here


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
         "東京商事", "Ωmega", "🏢corp", "o'brien", "a/b", "x" * max_len]
    )
    return st.one_of(fixed, id_text(max_len))


def user_ids(max_len: int = MAX_ID) -> st.SearchStrategy[str]:
    """User ids: a few common names that recur across tenants, their case and
    Unicode variants, and arbitrary ids up to the full 64 code points.
    Shrinks toward ``"alice"``."""
    fixed = st.sampled_from(["alice", "bob", "Alice", "ALICE", _CAFE_NFC, _CAFE_NFD, "李雷", "🙂", "u" * max_len])
    return st.one_of(fixed, id_text(max_len))


def assistant_names() -> st.SearchStrategy[str]:
    """Assistant names, mostly shared across tenants (the same name in two
    tenants must give two assistants). Shrinks toward ``"helper"``."""
    return st.one_of(st.sampled_from(["helper", "support", "Helper", "analyst"]), id_text())


def bad_assistant_names() -> st.SearchStrategy[str]:
    """Names the server must refuse with bad_request: empty, whitespace,
    controls, 65 code points. Shrinks toward ``""``."""
    return st.one_of(
        st.sampled_from(["", " ", "two words", "tab\there", "nl\n", "nul\x00", "a" * (MAX_ID + 1), "é" * (MAX_ID + 1)]),
        id_text().map(lambda s: s + "\u2028"),
    )
