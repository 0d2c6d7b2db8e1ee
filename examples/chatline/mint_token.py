#!/usr/bin/env python3
"""Print a chatline session token, valid for one hour.

Usage::

    CHATLINE_SECRET=s3cret python examples/chatline/mint_token.py ORG USER

ORG and USER default to the environment variables PARTYWALL_TENANT and
PARTYWALL_USER (how partywall's ``--token-cmd`` passes them). The secret
comes from CHATLINE_SECRET and must be the one the server was started with.

The token is ``cl1.<org_b64>.<user_b64>.<exp>.<sig>``: base64url (unpadded) of
the UTF-8 ids, the expiry in unix seconds, and the hex HMAC-SHA256 of
everything before the last dot. It works as the ``chatline_session`` cookie or
as the ``key`` of a hello frame (see PROTOCOL.md).

Standard library only, so it runs with any Python 3. Exit status 1, with one
line on stderr, when the secret or an id is missing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys
import time

LIFETIME_SECONDS = 3600


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=").decode("ascii")


def mint(secret: bytes, org: str, user: str, expires: int) -> str:
    """A token for `user` of `org`, signed with `secret`, expiring at unix time `expires`."""
    signed_text = f"cl1.{_b64(org)}.{_b64(user)}.{expires}"
    signature = hmac.new(secret, signed_text.encode("ascii"), hashlib.sha256).hexdigest()
    return f"{signed_text}.{signature}"


def main(argv: list[str] | None = None) -> int:
    # The two arguments are read as they are, not through an option parser: an id may begin
    # with "-" (ids are any characters but whitespace and controls), and is still an id.
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(args) > 2:
        print("mint_token: give at most ORG and USER", file=sys.stderr)
        return 1

    secret = os.environ.get("CHATLINE_SECRET", "")
    org = args[0] if len(args) > 0 else os.environ.get("PARTYWALL_TENANT", "")
    user = args[1] if len(args) > 1 else os.environ.get("PARTYWALL_USER", "")
    if not secret:
        print("mint_token: CHATLINE_SECRET is not set", file=sys.stderr)
        return 1
    if not org or not user:
        print("mint_token: give ORG and USER, or set PARTYWALL_TENANT and PARTYWALL_USER", file=sys.stderr)
        return 1
    try:
        token = mint(
            # surrogateescape: the exact bytes of a secret that is not valid UTF-8,
            # as the server reads it too
            secret.encode("utf-8", "surrogateescape"),
            org,
            user,
            int(time.time()) + LIFETIME_SECONDS,
        )
    except UnicodeEncodeError:
        print("mint_token: ORG and USER must be valid UTF-8", file=sys.stderr)
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
