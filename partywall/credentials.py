"""Credentials: where the suite gets the credential of each identity it connects as.

The suite connects as ``(tenant, user)`` identities. A `Credentials` turns
one into the credential string the adapter puts on the wire (for protocol v1
a bearer token, sent in the ``Authorization`` header or the ``token`` query
parameter), and makes the kinds of credential a server must refuse.

Three sources, chosen by the options (`from_settings`):

- `MintedCredentials` (``--auth-secret SECRET``): HS256 tokens minted with
  the server's own secret, for any identity, and every kind of bad token of
  `partywall.tokens.BAD_TOKEN_KINDS`. This is what the embedded reference
  server uses.
- `CommandCredentials` (``--token-cmd CMD``): for a team that cannot hand a
  test tool its signing key. CMD runs without a shell as
  ``shlex.split(CMD) + [TENANT, USER]``, with ``PARTYWALL_TENANT`` and
  ``PARTYWALL_USER`` added to its environment; its standard output,
  stripped, is the credential (one line; logs go to stderr). Each identity's
  credential is asked for once and kept for the run. A command that cannot
  be started, exits non-zero, prints nothing, or takes longer than
  ``token_cmd_timeout_s`` (30 s by default) stops the run: a `HarnessError`
  quoting its stderr, so exit 2. It runs off the trio loop: the state
  machine calls it from its own thread, and code inside trio uses
  `Credentials.for_identity_async`.
- `ProvisionedCredentials` (``--identities FILE``): tenants and users that
  already exist on the server under test (a staging tenant, test accounts),
  read from a file. A user's credential comes from the file, or else from
  ``--token-cmd`` (or ``--auth-secret``). The state machine then reuses these
  tenants and users in every example instead of minting fresh tenant ids,
  and keeps examples apart by fresh threads and fresh markers.

The identities file, TOML (or JSON when its name ends in ``.json``)::

    [[tenants]]
    id = "acme-test"
    users = [{id = "alice", credential = "eyJhbGciOi..."}, {id = "bob"}]

    [[tenants]]
    id = "globex-test"
    users = [{id = "alice"}]

or ``{"tenants": [{"id": "acme-test", "users": [{"id": "alice",
"credential": "..."}, {"id": "bob"}]}, {"id": "globex-test", "users":
[{"id": "alice"}]}]}``. At least two tenants, at least two users in the
first (the opening of every example puts two users in one tenant and one in
another); ids as PROTOCOL.md allows them (1-64 code points, no whitespace or
control characters), unique (user ids within their tenant). A user without
``credential`` gets one from ``--token-cmd``. Anything else (an unknown key,
a wrong type) refuses the file with one line naming it. What the tenants
already hold (threads of earlier runs) is theirs: the checks never count it
as another tenant's.

Without the server's secret some refused-credential checks cannot be made:
a token that is expired, signed with HS512, or has a bad or missing claim
must be signed with the server's key to test what it claims to test. Those
are listed under ``not_run`` in the report (`Credentials.not_run`), and the
state machine draws a check that needs no secret in their place: no
credential at all (``missing``), a valid credential with one character
flipped (``tampered``), a token signed with a random key, an unsigned one,
and garbage.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from partywall import tokens
from partywall.adapter import valid_id
from partywall.errors import HarnessError

#: How long a --token-cmd may take for one identity (the default of ``token_cmd_timeout_s``).
TOKEN_CMD_TIMEOUT_S = 30.0
#: Environment variables the token command gets beside its two arguments.
TENANT_ENV = "PARTYWALL_TENANT"
USER_ENV = "PARTYWALL_USER"

#: Refused kinds beyond `tokens.BAD_TOKEN_KINDS`; no secret needed for either.
EXTRA_BAD_KINDS = (
    "missing",  # no credential at all: no Authorization header, no token parameter
    "tampered",  # a valid credential with one character flipped
)
#: Kinds that can be made without the server's secret (``wrong_key`` is signed with a random key).
SECRET_FREE_KINDS = ("unsigned", "wrong_key", "garbage", *EXTRA_BAD_KINDS)
#: Kinds that must be signed with the server's secret to test what they claim to test.
NEEDS_SECRET = tuple(k for k in tokens.BAD_TOKEN_KINDS if k not in SECRET_FREE_KINDS)
#: What the state machine sends instead of a drawn kind it cannot make (the draw stays the same).
INSTEAD: dict[str, str] = {
    "other_alg": "tampered",
    "expired": "tampered",
    "exp_string": "tampered",
    "missing_exp": "tampered",
    "missing_tid": "missing",
    "missing_sub": "missing",
    "blank_sub": "tampered",
    "long_tid": "missing",
    "numeric_sub": "missing",
    "empty_tid": "missing",
}
assert set(INSTEAD) == set(NEEDS_SECRET)


def tamper(credential: str) -> str:
    """``credential`` with one character flipped where it counts.

    In a JWT, in the middle of the signature (its last character may carry
    only padding bits, which a lenient decoder ignores); in any other
    credential, in the middle. The character is replaced by another of the
    same alphabet, so the result still looks well-formed.
    """
    if not credential:
        return "x"
    head, dot, sig = credential.rpartition(".")
    i = len(head) + 1 + len(sig) // 2 if dot and len(sig) >= 2 else len(credential) // 2
    flipped = "A" if credential[i] != "A" else "B"
    return credential[:i] + flipped + credential[i + 1:]


class Credentials:
    """Where credentials come from; see the module docstring for the three kinds.

    ``for_identity`` is synchronous and may block (a token command): call it
    from a plain thread, or `for_identity_async` inside trio.
    """

    kind = "abstract"

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret or None
        """The server's signing secret, when known: needed for some refused kinds only."""

    def for_identity(self, tenant: str, user: str) -> str:
        """The credential of ``user`` of ``tenant``, as it goes on the wire; HarnessError when there is none."""
        raise NotImplementedError

    async def for_identity_async(self, tenant: str, user: str) -> str:
        """`for_identity` from inside trio: run in a worker thread, so the loop never blocks on it."""
        return await trio.to_thread.run_sync(self.for_identity, tenant, user)

    @property
    def can_mint_bad(self) -> bool:
        """Whether every refused kind can be made (it needs the server's secret)."""
        return self.secret is not None

    def kind_for(self, drawn: str) -> str:
        """The refused kind actually sent for a drawn one: itself, or one that needs no secret."""
        return drawn if self.can_mint_bad or drawn not in INSTEAD else INSTEAD[drawn]

    def bad(self, kind: str, tenant: str, user: str) -> str:
        """A credential of ``kind`` for ``user`` of ``tenant`` that the server must refuse (empty: none at all)."""
        if kind == "missing":
            return ""
        if kind == "tampered":
            return tamper(self.for_identity(tenant, user))
        if self.secret is not None:
            return tokens.mint_bad(kind, self.secret, tenant, user)
        if kind == "wrong_key":
            return tokens.mint(secrets.token_urlsafe(32), tenant, user)
        if kind in ("unsigned", "garbage"):
            return tokens.mint_bad(kind, "", tenant, user)  # neither is signed
        if kind in NEEDS_SECRET:
            raise HarnessError(f"a {kind} token needs the server's secret (--auth-secret); "
                               f"use Credentials.kind_for to pick one that does not.")
        raise HarnessError(f"unknown refused-credential kind {kind!r} (known: "
                           f"{', '.join((*tokens.BAD_TOKEN_KINDS, *EXTRA_BAD_KINDS))}).")

    def expiring(self, tenant: str, user: str, exp: float) -> str | None:
        """A valid token for ``user`` of ``tenant`` that expires at ``exp`` (Unix seconds, a real
        number), or None without the server's secret."""
        return None if self.secret is None else tokens.mint_until(self.secret, tenant, user, exp)

    def with_other_claims(self, tenant: str, user: str) -> str | None:
        """A valid token for ``user`` of ``tenant`` that also carries claims the server must ignore
        (`tokens.other_claims`), or None without the server's secret."""
        if self.secret is None:
            return None
        now = time.time()
        return tokens.mint_until(self.secret, tenant, user, now + 3600, tokens.other_claims(now))

    def not_run(self) -> list[tuple[str, str]]:
        """(check, reason) of each refused-credential check these credentials cannot make."""
        if self.can_mint_bad:
            return []
        return [(f"refused_token:{kind}",
                 f"a refused token of kind {kind} must be signed with the server's secret, which this run "
                 f"does not have (credentials come from {self.source()}); bad_token sends a "
                 f"{INSTEAD[kind]} credential in its place")
                for kind in NEEDS_SECRET] + [
                ("valid_token:expires_within_a_second",
                 f"a token that expires within the second must be minted with the server's secret, which this "
                 f"run does not have (credentials come from {self.source()})"),
                ("valid_token:other_claims",
                 f"a valid token carrying claims the server must ignore (aud, iss, nbf, iat) must be minted with "
                 f"the server's secret, which this run does not have (credentials come from {self.source()})")]

    def source(self) -> str:
        """Where valid credentials come from, for messages (never a credential or a secret)."""
        return self.kind

    def describe(self) -> dict[str, Any]:
        """What the report says about the credentials (never a credential or a secret)."""
        return {"source": self.kind, "secret": self.secret is not None}


class MintedCredentials(Credentials):
    """HS256 tokens minted with the server's secret: any identity, every refused kind."""

    kind = "minted"

    def __init__(self, secret: str | None) -> None:
        if not secret:
            raise HarnessError("minting tokens needs the server's secret: pass --auth-secret SECRET.")
        super().__init__(secret)
        self._secret = secret

    def for_identity(self, tenant: str, user: str) -> str:
        return tokens.mint(self._secret, tenant, user)

    def source(self) -> str:
        return "--auth-secret"


class CommandCredentials(Credentials):
    """``--token-cmd``: a command prints each identity's credential; kept per identity for the run."""

    kind = "command"

    def __init__(self, cmd: str, *, secret: str | None = None, timeout_s: float = TOKEN_CMD_TIMEOUT_S) -> None:
        super().__init__(secret)
        try:
            self.argv = shlex.split(cmd)
        except ValueError as exc:
            raise HarnessError(f"--token-cmd {cmd!r} cannot be split into arguments ({exc}).") from None
        if not self.argv:
            raise HarnessError("--token-cmd is empty; pass the command that prints a credential, "
                               "e.g. --token-cmd './mint-test-token'.")
        program = self.argv[0]
        if shutil.which(program) is None:
            raise HarnessError(f"--token-cmd: cannot find the program {program!r} (not on PATH, or not "
                               "executable); it runs without a shell.")
        self.cmd = cmd
        self.timeout_s = float(timeout_s)
        self._cache: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self.calls = 0
        """How many times the command ran (once per identity, unless it failed)."""

    def for_identity(self, tenant: str, user: str) -> str:
        key = (tenant, user)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        credential = self._run(tenant, user)
        with self._lock:
            return self._cache.setdefault(key, credential)

    def _run(self, tenant: str, user: str) -> str:
        who = f"tenant {tenant!r}, user {user!r}"
        env = {**os.environ, TENANT_ENV: tenant, USER_ENV: user}
        self.calls += 1
        try:
            # A session of its own: a time-out kills everything the command started, so no
            # grandchild keeps its pipes open and the suite waiting.
            proc = subprocess.Popen([*self.argv, tenant, user], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise HarnessError(f"--token-cmd {self.cmd!r} could not be started for {who} "
                               f"({exc.strerror or exc}).") from None
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # the whole group is already gone
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise HarnessError(f"--token-cmd {self.cmd!r} took longer than {self.timeout_s:g} s for {who}, so it "
                               f"was stopped{_stderr_said(err)}") from None
        if proc.returncode != 0:
            how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with code {proc.returncode}"
            raise HarnessError(f"--token-cmd {self.cmd!r} {how} for {who}{_stderr_said(err)}")
        text = out.decode("utf-8", "replace").strip()
        if not text:
            raise HarnessError(f"--token-cmd {self.cmd!r} printed nothing for {who}; it must print the "
                               f"credential on stdout{_stderr_said(err)}")
        if "\n" in text or "\r" in text:
            raise HarnessError(f"--token-cmd {self.cmd!r} printed {len(text.splitlines())} lines for {who}; it "
                               "must print only the credential on stdout (logs go to stderr).")
        return text

    def source(self) -> str:
        return "--token-cmd"

    def describe(self) -> dict[str, Any]:
        # Not the command itself: a command line may carry a key of its own.
        return {**super().describe(), "identities_asked": len(self._cache)}


def _stderr_said(err: bytes) -> str:
    """``; its stderr: ...`` on one line (the last 400 characters), or ``(no stderr)``."""
    text = " / ".join(line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip())
    if not text:
        return " (it wrote nothing on stderr)."
    if len(text) > 400:
        text = "..." + text[-400:]
    return f"; its stderr: {text}"


# -- pre-provisioned identities ------------------------------------------------------


@attrs.frozen
class ProvisionedUser:
    id: str
    credential: str | None = attrs.field(default=None, repr=False)
    """The credential from the file; None when --token-cmd makes it."""


@attrs.frozen
class ProvisionedTenant:
    id: str
    users: tuple[ProvisionedUser, ...]

    @property
    def user_ids(self) -> tuple[str, ...]:
        return tuple(u.id for u in self.users)


@attrs.frozen
class Identities:
    """The tenants and users of an ``--identities`` file, in the file's order."""

    path: str
    tenants: tuple[ProvisionedTenant, ...]

    def tenant_at(self, i: int) -> ProvisionedTenant:
        """The i-th tenant, cyclically (the state machine's tenant draws map onto the file this way)."""
        return self.tenants[i % len(self.tenants)]

    def tenant(self, tid: str) -> ProvisionedTenant:
        for t in self.tenants:
            if t.id == tid:
                return t
        raise HarnessError(f"{self.path}: the suite asked for tenant {tid!r}, which the file does not provision.")

    def user_at(self, tid: str, i: int) -> str:
        """The i-th user of tenant ``tid``, cyclically."""
        users = self.tenant(tid).users
        return users[i % len(users)].id

    def credential(self, tid: str, uid: str) -> str | None:
        for u in self.tenant(tid).users:
            if u.id == uid:
                return u.credential
        raise HarnessError(f"{self.path}: the suite asked for user {uid!r} of tenant {tid!r}, which the file "
                           "does not provision.")

    def without_credential(self) -> list[tuple[str, str]]:
        """(tenant, user) of every user whose credential must come from elsewhere."""
        return [(t.id, u.id) for t in self.tenants for u in t.users if u.credential is None]

    def describe(self) -> dict[str, Any]:
        return {"file": self.path, "tenants": {t.id: list(t.user_ids) for t in self.tenants}}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identities:
        """Read and check an identities file; HarnessError of one line naming the file otherwise."""
        where = str(path)
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise HarnessError(f"--identities {where}: cannot read the file ({exc.strerror or exc}).") from None
        except UnicodeDecodeError:
            raise HarnessError(f"--identities {where}: the file is not UTF-8 text.") from None
        try:
            data: Any = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
        except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are both ValueErrors
            what = "JSON" if p.suffix.lower() == ".json" else "TOML (name a JSON file *.json)"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise HarnessError(f"--identities {where}: not valid {what} ({first}).") from None
        return cls.from_data(data, where)

    @classmethod
    def from_data(cls, data: Any, where: str) -> Identities:
        def bad(msg: str) -> HarnessError:
            return HarnessError(f"--identities {where}: {msg}")

        if not isinstance(data, Mapping):
            raise bad("expected a table with a `tenants` list at the top.")
        _only_keys(data, {"tenants"}, "the top level", bad)
        raw_tenants = data.get("tenants")
        if not isinstance(raw_tenants, list):
            raise bad("expected `tenants`, a list of tables ([[tenants]] with `id` and `users`).")
        tenants: list[ProvisionedTenant] = []
        seen: set[str] = set()
        for n, raw in enumerate(raw_tenants, 1):
            at = f"tenant {n}"
            if not isinstance(raw, Mapping):
                raise bad(f"{at} is not a table with `id` and `users`.")
            _only_keys(raw, {"id", "users"}, at, bad)
            tid = raw.get("id")
            if not valid_id(tid):
                raise bad(f"{at} needs `id`, a tenant id of 1-64 code points without whitespace or control "
                          f"characters (got {tid!r}).")
            if tid in seen:
                raise bad(f"tenant {tid!r} appears twice.")
            seen.add(tid)
            at = f"tenant {tid!r}"
            raw_users = raw.get("users")
            if not isinstance(raw_users, list) or not raw_users:
                raise bad(f"{at} needs `users`, a non-empty list of tables like {{id = \"alice\"}}.")
            users: list[ProvisionedUser] = []
            for u in raw_users:
                if not isinstance(u, Mapping):
                    raise bad(f"{at}: a user is {u!r}, not a table like {{id = \"alice\"}}.")
                _only_keys(u, {"id", "credential"}, f"{at}'s user {u.get('id')!r}", bad)
                uid = u.get("id")
                if not valid_id(uid):
                    raise bad(f"{at}: user id {uid!r} is not 1-64 code points without whitespace or control "
                              "characters.")
                if uid in (x.id for x in users):
                    raise bad(f"{at}: user {uid!r} appears twice.")
                cred = u.get("credential")
                if cred is not None and (not isinstance(cred, str) or not cred.strip() or "\n" in cred):
                    raise bad(f"{at}: the credential of user {uid!r} must be a non-empty one-line string.")
                users.append(ProvisionedUser(uid, cred.strip() if cred is not None else None))
            tenants.append(ProvisionedTenant(tid, tuple(users)))
        if len(tenants) < 2 or len(tenants[0].users) < 2:
            got = f"{len(tenants)} tenant{'s' * (len(tenants) != 1)}" + (
                f", {len(tenants[0].users)} user(s) in the first" if tenants else "")
            raise bad(f"needs at least 2 tenants with at least 2 users in the first (got {got}).")
        return cls(where, tuple(tenants))


def _only_keys(table: Mapping[str, Any], allowed: set[str], at: str, bad: Any) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise bad(f"{at} has unknown key(s) {', '.join(map(repr, extra))} (allowed: {', '.join(sorted(allowed))}).")


class ProvisionedCredentials(Credentials):
    """``--identities``: credentials from the file, else from ``fallback`` (``--token-cmd`` or the secret)."""

    kind = "identities"

    def __init__(self, identities: Identities, fallback: Credentials | None = None) -> None:
        super().__init__(fallback.secret if fallback is not None else None)
        self.identities = identities
        self.fallback = fallback
        missing = identities.without_credential()
        if missing and fallback is None:
            tid, uid = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise HarnessError(f"--identities {identities.path}: user {uid!r} of tenant {tid!r}{more} has no "
                               "credential; add `credential = \"...\"` or pass --token-cmd CMD.")

    def for_identity(self, tenant: str, user: str) -> str:
        found = self.identities.credential(tenant, user)
        if found is not None:
            return found
        assert self.fallback is not None  # checked in __init__ for every user of the file
        return self.fallback.for_identity(tenant, user)

    def prefetch(self) -> None:
        """Ask for every credential the file does not hold now, so a failing command stops the run at once."""
        for tid, uid in self.identities.without_credential():
            self.for_identity(tid, uid)

    def source(self) -> str:
        return f"--identities {self.identities.path}" + (
            f" and {self.fallback.source()}" if self.fallback is not None and self.identities.without_credential()
            else "")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "identities": self.identities.describe(),
                "fallback": self.fallback.kind if self.fallback is not None else None}


def from_settings(*, secret: str | None, token_cmd: str | None, identities: str | None,
                  timeout_s: float = TOKEN_CMD_TIMEOUT_S) -> tuple[Credentials, Identities | None]:
    """The credentials the options ask for, and the identities file's contents (None without one).

    ``--token-cmd`` gives valid credentials (the secret, if also given, only
    refused ones); ``--identities`` puts its file's credentials first. With
    neither, tokens are minted with ``secret``. HarnessError (one line) when
    nothing gives a credential or the file is refused. Runs no command.
    """
    base: Credentials | None = None
    if token_cmd:
        base = CommandCredentials(token_cmd, secret=secret, timeout_s=timeout_s)
    elif secret:
        base = MintedCredentials(secret)
    if identities:
        found = Identities.load(identities)
        return ProvisionedCredentials(found, base), found
    if base is None:
        raise HarnessError("no credentials: pass --auth-secret SECRET (the server's HS256 secret), "
                           "--token-cmd CMD (prints a credential for TENANT USER), or --identities FILE.")
    return base, None


def secretless_option(get: Callable[[str], Any]) -> str | None:
    """The option set (``get`` reads a setting by name) that gives credentials without the secret, if any."""
    for name, flag in (("token_cmd", "--token-cmd"), ("identities", "--identities")):
        if get(name):
            return flag
    return None


def user_index(uid: str, known: Iterable[str] = ("alice", "bob")) -> int:
    """Which provisioned user (an index, taken cyclically) a drawn user id stands for.

    The fixed ids of every example's opening come first (``alice`` 0,
    ``bob`` 1), so the opening's two users of one tenant are two people;
    any other id by a stable hash of its text, the same in every process.
    """
    for i, name in enumerate(known):
        if uid == name:
            return i
    return zlib.crc32(uid.encode("utf-8", "surrogatepass"))
