"""The bench's seeded plan: which users there are and everything each of them will do.

A `Plan` is a pure function of ``(seed, users, tenants, messages_per_user)``:
which tenant each user belongs to, its user id (tenants share ids: every
tenant has an ``alice``), the assistant it starts, whether its token goes in
the header or the query, and the text of each message (non-ASCII included).
The seed suite's "100 user test" drew nothing from a seed, so two runs never
did the same thing and could not be compared. `Plan.fingerprint` is the
SHA-256 of the plan's canonical JSON, so two reports with one fingerprint
ran the same plan. What is particular to one run (the tenant prefix that
keeps runs apart on a shared server, the markers, request ids) is not part
of the plan. ``--shard K/N`` (`parse_shard`) or a pytest-xdist worker
(`xdist_shard`) runs a share of its users.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from partywall.errors import HarnessError

#: Bumped whenever plan generation changes, so an old fingerprint can never match a new plan.
PLAN_VERSION = 1

# Tenants and users share names across tenants on purpose: PROTOCOL.md says
# `alice` of one tenant and `alice` of another are two people, and a server
# that keys anything by user id alone shows it here. Some are non-ASCII,
# because ids are code points compared byte for byte.
TENANT_NAMES = ("acme", "globex", "initech", "umbrella", "hooli", "Ünïcorp", "東京商事", "stark", "wayne", "Ωmega",
                "vandelay", "soylent")
USER_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
              "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "zoë", "José", "李雷",
              "Жанна", "Ærin")
ASSISTANTS = ("helper", "support", "analyst", "writer", "planner", "coder", "Résumé-bot", "助手")
_WORDS_ASCII = ("the", "agent", "please", "summarise", "report", "quarterly", "numbers", "for", "our", "team",
                "and", "check", "invoice", "shipping", "status", "today", "draft", "reply", "customer", "budget")
_WORDS_OTHER = ("naïve", "Grüße", "日本語", "привет", "Ελλάδα", "مرحبا", "façade", "straße", "한국어", "🚀",
                "café", "ångström", "€100", "שלום")


def nth_name(names: Sequence[str], k: int) -> str:
    """The k-th name of a list, with a numeric suffix once the list runs out (alice, ..., alice2)."""
    base = names[k % len(names)]
    return base if k < len(names) else f"{base}{k // len(names) + 1}"


def _body(rng: random.Random) -> str:
    words = [rng.choice(_WORDS_ASCII + _WORDS_OTHER) for _ in range(rng.randint(3, 12))]
    # At least one non-ASCII word in every message: UTF-8 must survive the round trip every time.
    words[rng.randrange(len(words))] = rng.choice(_WORDS_OTHER)
    return " ".join(words)


@attrs.frozen
class PlannedUser:
    """One user of the plan and everything it will do."""

    index: int = attrs.field(validator=attrs.validators.instance_of(int))
    """Position in the plan, from 0; shard k of n runs the users with index % n == k."""
    tenant: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The tenant's name in the plan; a run prefixes it so that runs never share tenants."""
    user: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The user id inside its tenant (every tenant has an alice)."""
    assistant: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The assistant name it starts an agent of (names repeat across tenants)."""
    via: str = attrs.field(validator=attrs.validators.in_(("header", "query")))
    """Where its token goes: the Authorization header or the ``token`` query parameter."""
    messages: tuple[str, ...] = attrs.field(converter=lambda v: tuple(str(x) for x in v))
    """The text of each message; the run puts a fresh marker in front of each."""

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "tenant": self.tenant, "user": self.user, "assistant": self.assistant,
                "via": self.via, "messages": list(self.messages)}


@attrs.frozen
class Plan:
    """The whole seeded workload; build it with `Plan.generate`."""

    seed: int
    """The seed every choice is drawn from."""
    users: int
    """How many users the plan has (all shards together)."""
    tenants: int
    """How many tenants the users are spread over."""
    messages_per_user: int
    """Messages each user sends (each waits for the previous reply)."""
    members: tuple[PlannedUser, ...] = attrs.field(repr=False)
    """The users, by index."""

    @classmethod
    def generate(cls, seed: int, users: int, tenants: int, messages_per_user: int) -> Plan:
        """The plan of a seed: the same arguments give the same plan in any process, on any machine."""
        for name, value, least in (("users", users, 1), ("tenants", tenants, 1),
                                   ("messages_per_user", messages_per_user, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise HarnessError(f"the bench plan needs {name} to be an integer >= {least} (got {value!r}).")
        # A string seed goes through SHA-512 in random.seed, never through the
        # per-process salted hash() that made the seed suite irreproducible.
        rng = random.Random(f"partywall-bench-plan/{PLAN_VERSION}/{seed}")
        # Spread users over tenants evenly but not by index order: deal a
        # shuffled deck, so a shard (index % n) still sees every tenant.
        order = list(range(users))
        rng.shuffle(order)
        tenant_of = {user: pos % tenants for pos, user in enumerate(order)}
        taken: dict[int, int] = {}
        members = []
        for i in range(users):
            t = tenant_of[i]
            k = taken.get(t, 0)
            taken[t] = k + 1
            members.append(PlannedUser(
                index=i,
                tenant=nth_name(TENANT_NAMES, t),
                user=nth_name(USER_NAMES, k),
                assistant=rng.choice(ASSISTANTS),
                via=rng.choice(("header", "query")),
                messages=tuple(_body(rng) for _ in range(messages_per_user)),
            ))
        return cls(seed, users, tenants, messages_per_user, tuple(members))

    @classmethod
    def from_config(cls, bench: Mapping[str, Any], *, seed: int | None = None, users: int | None = None) -> Plan:
        """The plan ``[tool.partywall.bench]`` describes, with the command line's seed and user count."""
        return cls.generate(
            int(bench["seed"] if seed is None else seed),
            int(bench["users"] if users is None else users),
            int(bench["tenants"]),
            int(bench["messages_per_user"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "seed": self.seed, "users": self.users, "tenants": self.tenants,
                "messages_per_user": self.messages_per_user, "members": [m.to_json() for m in self.members]}

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the plan (sorted keys, no spaces, UTF-8)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def shard(self, index: int, count: int) -> tuple[PlannedUser, ...]:
        """The users shard ``index`` (0-based) of ``count`` runs."""
        if not 0 <= index < count:
            raise HarnessError(f"shard {index + 1}/{count} does not exist; K/N needs 1 <= K <= N.")
        return tuple(m for m in self.members if m.index % count == index)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1-based K, as people count) → ``(K - 1, N)``."""
    k, sep, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index = count = 0
    if not sep or count < 1 or not 1 <= index <= count:
        raise HarnessError(f"--shard (--partywall-shard) expects K/N with 1 <= K <= N, e.g. 2/4 (got {text!r}).")
    return index - 1, count


def xdist_shard(workerinput: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """Shard of this pytest-xdist worker (gw0 of 4 → (0, 4)), or None outside xdist.

    Read from the worker's own ``config.workerinput``, not from the
    environment, which a process started by a test under xdist inherits.
    """
    if not workerinput:
        return None
    worker, count = str(workerinput.get("workerid", "")), workerinput.get("workercount")
    if not worker.startswith("gw") or not count:
        return None
    return int(worker[2:]), int(count)
