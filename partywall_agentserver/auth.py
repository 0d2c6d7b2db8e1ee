"""Handshake checks: the service's path, then HS256 JWTs from the header or `?token=`.

PyJWT checks the signature and the algorithm; the claims are checked here,
because PyJWT truncates `exp` to whole seconds (a token that expires in half
a second would already be refused) and accepts `exp` as a numeric string,
and PROTOCOL.md wants neither.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import attrs
import jwt
from jwt.warnings import InsecureKeyLengthWarning

from .protocol import is_valid_id

ALGORITHM = "HS256"
#: The one path the service answers on; any other is refused with 404 before the token is read.
WS_PATH: Final = "/ws"


@attrs.frozen
class Principal:
    """Who a connection belongs to, from a verified token."""

    tenant: str
    """The `tid` claim, compared exactly (no case folding, no normalisation)."""
    user: str
    """The `sub` claim, unique only inside its tenant."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_strict_json = json.JSONDecoder(parse_constant=_reject_constant)


@attrs.frozen
class Refusal:
    """The HTTP answer to a handshake that opens nothing."""

    status: int
    body: bytes = b""


class Authenticator:
    """Checks a handshake: its path, then its token against one shared secret."""

    def __init__(self, secret: str | bytes) -> None:
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self._jws = jwt.PyJWS()

    def admit(self, target: str, headers: Sequence[tuple[bytes, bytes]]) -> Principal | Refusal:
        """Who a handshake is, or how to refuse it: the path first (404), then the token (401),
        each with an empty body (a refusal names nothing a caller could probe with)."""
        if not self.serves_path(target):
            return Refusal(404)
        token = self.token_from(headers, target)
        principal = self.verify(token) if token is not None else None
        return Refusal(401) if principal is None else principal

    @staticmethod
    def serves_path(target: str) -> bool:
        """Whether a handshake's request target is the service's path (the query aside), exactly."""
        return handshake_path(target) == WS_PATH

    @staticmethod
    def token_from(headers: Sequence[tuple[bytes, bytes]], target: str) -> str | None:
        """The token a handshake carries: the Authorization header wins over `?token=`.

        A header that is present but not a single Bearer credential yields
        no token (so 401) rather than falling back to the query: the client
        said how it authenticates, and guessing would hide its mistake.
        """
        auth_values = [value for name, value in headers if name.lower() == b"authorization"]
        if auth_values:
            if len(auth_values) != 1:
                return None
            try:
                text = auth_values[0].decode("ascii")
            except UnicodeDecodeError:
                return None
            parts = text.split()
            if len(parts) != 2 or parts[0].lower() != "bearer":
                return None
            return parts[1]
        query = urlsplit(target).query
        if not query:
            return None
        try:
            tokens = parse_qs(query, keep_blank_values=True, strict_parsing=False).get("token")
        except ValueError:
            return None
        if not tokens or len(tokens) != 1 or not tokens[0]:
            return None
        return tokens[0]

    def verify(self, token: str) -> Principal | None:
        """The principal of a valid token, or None (the handshake then gets 401)."""
        try:
            with warnings.catch_warnings():
                # A short secret is the operator's choice, warned about once
                # at start-up; do not warn on every handshake.
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                decoded = self._jws.decode_complete(token, self._secret, algorithms=[ALGORITHM])
        except jwt.PyJWTError:
            return None
        if decoded["header"].get("alg") != ALGORITHM:
            return None
        try:
            claims = _strict_json.decode(decoded["payload"].decode("utf-8"))
        except (ValueError, RecursionError):
            return None
        if not isinstance(claims, dict):
            return None
        return self.check_claims(claims, time.time())

    @staticmethod
    def check_claims(claims: dict[str, Any], now: float) -> Principal | None:
        exp = claims.get("exp")
        # JSON numbers only: bool is an int subclass and "123" is a string.
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            return None
        if isinstance(exp, float) and not math.isfinite(exp):
            return None
        # Compared as a real number, no leeway: int vs float compares exactly.
        if not exp > now:
            return None
        tenant, user = claims.get("tid"), claims.get("sub")
        if not is_valid_id(tenant) or not is_valid_id(user):
            return None
        assert isinstance(tenant, str) and isinstance(user, str)
        return Principal(tenant, user)


def handshake_path(target: str) -> str:
    """The path of a request target, without the query."""
    return urlsplit(target).path
