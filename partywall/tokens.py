"""Tokens the suite presents: valid ones, and each kind the server must refuse.

Tokens are HS256 JWTs (PyJWT). The refused kinds mirror PROTOCOL.md's list,
so the `isolation` invariant can check that none of them opens a connection.
"""

from __future__ import annotations

import base64
import json
import time
import warnings
from typing import Any

import jwt

#: Kinds of token a server must refuse at the handshake with HTTP 401.
BAD_TOKEN_KINDS = (
    "unsigned",  # alg "none", no signature
    "wrong_key",  # HS256 signed with another secret
    "other_alg",  # HS512 with the right secret
    "expired",  # exp a second in the past
    "exp_string",  # exp as a numeric string
    "missing_exp",  # no exp at all (PyJWT checks exp only when it is there)
    "missing_tid",
    "missing_sub",
    "blank_sub",  # whitespace inside the user id
    "long_tid",  # 65 code points
    "numeric_sub",  # the user id as a JSON number, as an identity provider's user table keeps it
    "empty_tid",  # the tenant id an empty string: present, and no id
    "garbage",  # not a JWT at all
)


def mint(secret: str, tenant: str, user: str, ttl: float = 3600.0) -> str:
    """A valid token for ``user`` of ``tenant`` that expires in ``ttl`` seconds."""
    return mint_until(secret, tenant, user, time.time() + ttl)


def mint_until(secret: str, tenant: str, user: str, exp: float, other: dict[str, Any] | None = None) -> str:
    """A valid token for ``user`` of ``tenant`` that expires at ``exp`` (Unix seconds), carrying
    the ``other`` claims too."""
    return jwt.encode({**(other or {}), "tid": tenant, "sub": user, "exp": exp}, secret, algorithm="HS256")


def other_claims(now: float) -> dict[str, Any]:
    """Claims an identity provider adds that PROTOCOL.md says a server ignores ("other claims are
    ignored"): an audience and an issuer, not-before and issued-at an hour ahead, an id, a scope.
    A server that decodes with a JWT library's default checks refuses a token carrying them
    (PyJWT: an audience nobody expects, a token not yet valid)."""
    return {"aud": "partywall-suite", "iss": "https://idp.invalid/", "nbf": now + 3600, "iat": now + 3600,
            "jti": "pw-other-claims", "scope": "chat"}


def _unsigned(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def mint_bad(kind: str, secret: str, tenant: str, user: str) -> str:
    """A token of ``kind`` (one of BAD_TOKEN_KINDS) that a server must refuse."""
    exp = time.time() + 3600
    good = {"tid": tenant, "sub": user, "exp": exp}
    if kind == "unsigned":
        return _unsigned(good)
    if kind == "wrong_key":
        return jwt.encode(good, secret + "-not-the-key", algorithm="HS256")
    if kind == "other_alg":
        with warnings.catch_warnings():  # a short key for HS512 is the point, not a mistake
            warnings.simplefilter("ignore")
            return jwt.encode(good, secret, algorithm="HS512")
    if kind == "expired":
        return jwt.encode({**good, "exp": time.time() - 1.0}, secret, algorithm="HS256")
    if kind == "exp_string":
        return jwt.encode({**good, "exp": str(int(exp))}, secret, algorithm="HS256")
    if kind == "missing_exp":
        return jwt.encode({"tid": tenant, "sub": user}, secret, algorithm="HS256")
    if kind == "missing_tid":
        return jwt.encode({"sub": user, "exp": exp}, secret, algorithm="HS256")
    if kind == "missing_sub":
        return jwt.encode({"tid": tenant, "exp": exp}, secret, algorithm="HS256")
    if kind == "blank_sub":
        return jwt.encode({**good, "sub": user[:30] + " x"}, secret, algorithm="HS256")
    if kind == "long_tid":
        return jwt.encode({**good, "tid": (tenant * 65)[:65]}, secret, algorithm="HS256")
    if kind == "numeric_sub":
        return jwt.encode({**good, "sub": 1234567}, secret, algorithm="HS256")
    if kind == "empty_tid":
        return jwt.encode({**good, "tid": ""}, secret, algorithm="HS256")
    if kind == "garbage":
        return "not-a-jwt"
    raise ValueError(f"unknown bad-token kind {kind!r} (known: {', '.join(BAD_TOKEN_KINDS)})")
