"""The seam between the suite and a wire protocol: the adapter API, version 1.

The state machines and invariants speak in logical operations (``start_agent``,
``user_message``, ...) and parsed frames. An adapter turns those into bytes on
a socket and back, and says what the service offers:

- ``api_version``: the adapter API it was written for; partywall refuses an
  adapter written for another one, naming both;
- ``operations``: the operations the service has (``REQUIRED_OPERATIONS``
  at least); the state machine draws only those, and the checks that need a
  missing one are listed under ``not_run``;
- ``limits``: its id and content limits, which the model predicts outcomes by
  and the generated boundaries (the longest id, the largest message) follow;
- ``semantics``: who a thread belongs to (its tenant, or the user who opened
  it) and who receives its fan-out (connections that joined it, every other
  connection of its owner, or nobody but the requester); the model, the probes
  and the checks follow them;
- ``handshake``, ``auth_message``, ``encode``, ``decode``: where the credential
  travels (a header, the query, a cookie, or a first message after the socket
  opens), how a request is framed, how a frame is parsed and checked, mapped
  onto the suite's vocabulary of events (`Frame`);
- ``completes`` and ``reply_types``: which frames answer a request and which
  one completes it (the driver and the checks ask these, never a table of
  protocol v1's);
- ``bad_frame``: the malformed frames of its wire format, and the answer the
  service owes each.

`Adapter` itself is protocol v1 of PROTOCOL.md over WebSocket text frames:
everything specific to v1 (its schema, limits, vocabulary, the rules only v1
states) lives in this class. A service with another protocol subclasses it and
overrides what differs; ``examples/chatline/adapter.py`` is a worked case.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import math
import re
import unicodedata
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Final, NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import attrs

from partywall.errors import HarnessError

ERROR_CODES = frozenset({"bad_request", "not_found", "too_large", "rate_limited", "internal"})

#: The frame type that completes each request (an ``error`` always completes one).
FINAL_REPLY = {
    "start_agent": "agent_started",
    "join_thread": "joined",
    "leave_thread": "left",
    "user_message": "agent_response",
    "get_history": "history",
    "list_threads": "threads",
    "ping": "pong",
}

#: Every reply type a request may receive, in protocol order.
REPLY_TYPES = {
    "start_agent": ("agent_started",),
    "join_thread": ("joined",),
    "leave_thread": ("left",),
    "user_message": ("ack", "agent_chunk", "agent_response"),
    "get_history": ("history",),
    "list_threads": ("threads",),
    "ping": ("pong",),
}

MAX_ID = 64
MAX_CONTENT = 16_384
MAX_FRAME_IN = 65_536

#: The adapter API this partywall speaks (`Adapter.api_version`).
API_VERSION = 1
#: Operations every service must have: the opening of each example and the audit use them.
REQUIRED_OPERATIONS = frozenset({"start_agent", "user_message", "get_history"})
#: Every operation the suite knows how to drive.
KNOWN_OPERATIONS = frozenset(FINAL_REPLY)


@attrs.frozen
class Limits:
    """The sizes a service accepts; the model predicts outcomes by them."""

    max_id: int = MAX_ID
    """Longest id (tenant, user, assistant name), in code points."""
    max_content: int = MAX_CONTENT
    """Longest message content, in bytes of UTF-8."""
    max_frame_in: int = MAX_FRAME_IN
    """Longest client message, in bytes."""
    max_in_flight: int = 64
    """Requests one connection may have in flight (sent, final answer not yet received) before the
    service may answer `rate_limited`: v1 servers allow at least 64."""


@attrs.frozen
class Refusals:
    """How the service refuses a handshake it must not open, as HTTP answers to the upgrade.

    The suite checks each refusal that came as an HTTP status against these (a service that
    lets the socket open and refuses in its first frame, `Adapter.auth_message`, has none).
    None accepts any status."""

    other_path: int | None = 404
    """The status for a path other than the service's, whatever credential came with it (v1:
    "The path is checked first (404), then the token")."""
    credential: int | None = 401
    """The status for a credential the service must refuse, on its own path."""
    empty_body: bool = True
    """Whether a refused credential's answer has an empty body (v1: "HTTP 401 and an empty body")."""


#: The kinds of malformed frame the suite sends (`Adapter.bad_frame` makes each in the service's format).
BAD_FRAME_KINDS = (
    "invalid_json",
    "binary",
    "nan",
    "non_object",
    "unknown_type",
    "missing_field",
    "wrong_type",
    "lone_surrogate",
    "huge_number",
    "long_id",
    "oversize",
    "oversize_16mib",
)

#: Other paths of the service's own host and port (`Adapter.other_path`), each of which it must refuse
#: at the handshake even with a valid credential.
OTHER_PATH_KINDS = ("root", "sibling", "child", "trailing_slash", "dot_segment")

#: Who a thread belongs to: everyone of its tenant, or only the user who opened it.
THREAD_SCOPES = ("tenant", "user")
#: Who receives a thread's fan-out besides the requester's own replies.
FANOUT_RULES = ("joined", "owner", "requester")


@attrs.frozen
class Semantics:
    """What a thread means on this service; the model, the probes and the checks follow it."""

    thread_scope: str = attrs.field(default="tenant", validator=attrs.validators.in_(THREAD_SCOPES))
    """``tenant``: a thread is shared by every user of the tenant that opened it (protocol v1).
    ``user``: it is private to the user who opened it; another user of the same tenant must
    find it exactly as if it did not exist, and nothing of it may reach that user."""
    fanout: str = attrs.field(default="joined", validator=attrs.validators.in_(FANOUT_RULES))
    """``joined``: connections that joined the thread receive its turns (protocol v1; the
    service then needs join_thread, and a message may only be sent by a joined connection).
    ``owner``: every other open connection of the thread's owner receives them (multi-device
    sync; any connection of the owner may send). ``requester``: nobody but the requester."""


class BadFrame(NamedTuple):
    """A malformed frame and the answer the service owes it."""

    message: str | bytes
    req_id: str
    """The request id written in it."""
    readable: bool | None
    """Whether the error must carry that id as its ``re`` (None: the protocol leaves it open)."""
    expect: str
    """The error kind the service must answer with."""


def valid_id(value: Any, max_len: int = MAX_ID) -> bool:
    """An id as PROTOCOL.md allows: 1-64 code points, none whitespace, Cc or Cs."""
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        return False
    return not any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs") for ch in value)


_STR, _NUM, _INT, _LIST = "string", "number", "integer", "array"

#: Required fields of each server frame and their JSON types. Extra fields are allowed.
SCHEMA: dict[str, dict[str, str]] = {
    "welcome": {"protocol": _INT, "tenant": _STR, "user": _STR, "connection_id": _STR, "server_time": _NUM},
    "agent_started": {"re": _STR, "agent_id": _STR, "assistant_id": _STR, "thread_id": _STR, "startup_ms": _NUM},
    "joined": {"re": _STR, "thread_id": _STR},
    "left": {"re": _STR, "thread_id": _STR},
    "ack": {"re": _STR, "thread_id": _STR, "message_id": _STR},
    "agent_chunk": {"thread_id": _STR, "seq": _INT, "delta": _STR},
    "agent_response": {"thread_id": _STR, "message_id": _STR, "content": _STR},
    "thread_message": {"thread_id": _STR, "message_id": _STR, "role": _STR, "user": _STR, "content": _STR},
    "history": {"re": _STR, "thread_id": _STR, "messages": _LIST},
    "threads": {"re": _STR, "threads": _LIST},
    "pong": {"re": _STR, "server_time": _NUM},
    "error": {"code": _STR, "message": _STR},
}
_HISTORY_ITEM = {"message_id": _STR, "role": _STR, "content": _STR, "created_at": _NUM}
_THREAD_ITEM = {"thread_id": _STR, "assistant": _STR, "created_at": _NUM, "message_count": _INT}


def _is(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == _LIST:
        return isinstance(value, list)
    raise AssertionError(kind)


def _fields(obj: dict[str, Any], schema: dict[str, str], where: str) -> list[str]:
    problems = []
    for name, kind in schema.items():
        if name not in obj:
            problems.append(f"{where} has no field {name!r}")
        elif not _is(obj[name], kind):
            problems.append(f"{where} field {name!r} must be a JSON {kind} (got {obj[name]!r:.80})")
    return problems


@attrs.frozen
class Frame:
    """A frame as received, parsed, with what is wrong with it."""

    type: str | None
    """The ``type`` field, or None when it has none."""
    data: dict[str, Any]
    """The parsed JSON object (empty when it did not parse)."""
    raw: str
    """The text as received (binary frames are decoded with replacement)."""
    problems: tuple[str, ...] = ()
    """Schema problems; empty for a well-formed frame."""
    request: str | None = None
    """The suite's own id of the request the frame answers, set by the driver from its ``re`` and
    the ids its connection sent (`Adapter.request_ids`: ids on the wire are per connection, so
    two connections send the same ones); an ``re`` the connection never sent becomes
    `STRAY` followed by it. None when the frame did not come through the driver."""

    @property
    def wire_re(self) -> str | None:
        """``re`` as it came on the wire (a string), or None."""
        re_ = self.data.get("re")
        return re_ if isinstance(re_, str) else None

    @property
    def re(self) -> str | None:
        """The request the frame answers (the suite's id for it), or None for a frame without ``re``."""
        return self.request if self.request is not None else self.wire_re


STRAY: Final = "(stray) "
"""Begins `Frame.request` for an ``re`` its connection never sent (no request of the suite has
such an id)."""



def _padded_ping(rid: str, pad: int, char: str = "x") -> str:
    """A well-formed ``ping`` (``rid``: its id, JSON-encoded) with ``pad`` characters ``char`` of padding.

    Joined as text rather than through `json.dumps`, which scans every one of up to 16 Mi
    characters for escapes (about 80 ms a frame); the padding needs none.
    """
    return '{"type": "ping", "id": ' + rid + ', "pad": "' + char * pad + '"}'

class Adapter:
    """Protocol version 1 of PROTOCOL.md over WebSocket text frames."""

    api_version: ClassVar[int] = API_VERSION
    """The adapter API this class was written for."""
    name = "protocol-v1"
    operations: ClassVar[frozenset[str]] = KNOWN_OPERATIONS
    """The operations the service has."""
    limits: ClassVar[Limits] = Limits()
    semantics: ClassVar[Semantics] = Semantics()
    """Threads shared in the tenant, fan-out to the connections that joined them."""
    refusals: ClassVar[Refusals] = Refusals()
    """The HTTP answers to a handshake the service must refuse."""
    history_limit: ClassVar[bool] = True
    """Whether get_history takes a ``limit`` (the newest N messages)."""
    credential_ways: ClassVar[dict[str, str]] = {"header": "an Authorization: Bearer header",
                                                 "query": "the token query parameter",
                                                 "both": "a token in the header and another in the query: "
                                                         "the header's counts"}
    """The two ways the machine draws (``header`` and ``query``) and what each means on this
    service, for the report (two ways of its own, or the same one twice); and ``both`` where the
    service takes a credential both ways at once and the one sent as ``header`` must count
    (`handshake_both`; without it that rule is listed under ``not_run``)."""

    def completes(self, req_type: str, frame: Frame) -> bool:
        """Whether ``frame``, an answer to a request of ``req_type``, is its last one."""
        return frame.type == "error" or frame.type == FINAL_REPLY.get(req_type)

    def reply_types(self, req_type: str) -> tuple[str, ...]:
        """Every frame type (but ``error``) that may answer a request of ``req_type``, in order."""
        return REPLY_TYPES.get(req_type, ())

    def valid_id(self, value: Any) -> bool:
        """Whether the service must accept ``value`` as an id."""
        return valid_id(value, self.limits.max_id)

    bearer_spellings: ClassVar[tuple[str, ...]] = ("bearer", "Bearer", "BEARER")
    """The header's scheme name, spelt each of these ways in turn, one handshake after another
    (PROTOCOL.md: "the scheme name is case-insensitive")."""

    def handshake(self, url: str, token: str, via: str) -> tuple[str, list[tuple[str, str]]]:
        """Return the URL to open and the extra headers, for a token sent ``via`` header or query.

        An empty token is no credential at all: no header and no query parameter.
        """
        if via in ("header", "query") and not token:
            return url, []
        if via == "header":
            turn = self.__dict__.setdefault("_header_turns", itertools.count())
            scheme = self.bearer_spellings[next(turn) % len(self.bearer_spellings)]
            return url, [("Authorization", f"{scheme} {token}")]
        if via == "query":
            parts = urlsplit(url)
            query = (parts.query + "&" if parts.query else "") + "token=" + quote(token, safe="")
            return urlunsplit(parts._replace(query=query)), []
        raise HarnessError(f"token must go via 'header' or 'query' (got {via!r}).")

    def handshake_both(self, url: str, header_token: str, query_token: str) -> tuple[str, list[tuple[str, str]]]:
        """The URL and headers carrying one credential as ``header`` and another as ``query`` at once."""
        url, _ = self.handshake(url, query_token, "query")
        return url, self.handshake(url, header_token, "header")[1]

    def other_path(self, url: str, kind: str) -> str:
        """The service's URL with another path of kind ``kind`` (one of `OTHER_PATH_KINDS`), which
        the service must refuse at the handshake (v1: HTTP 404): the same host, another path."""
        parts = urlsplit(url)
        own = parts.path.rstrip("/") or ""
        path = {"root": "/", "sibling": own + "x", "child": own + "/admin", "trailing_slash": own + "/",
                "dot_segment": own + "/../admin"}[kind]
        if path == (parts.path or "/"):  # a service at the root: its own path is not another
            path = own + "/partywall-other-path"
        return urlunsplit(parts._replace(path=path))

    def auth_message(self, token: str, via: str) -> str | bytes | None:
        """The first message after the socket opens, for a service that authenticates there
        (None, as in v1: the credential went with the handshake). The service's answer to it
        is the first frame, decoded as ``welcome`` when it let the connection in."""
        return None

    def request_ids(self, conn: str) -> Iterator[str]:
        """The ids the requests of connection ``conn`` carry on the wire, in order (the suite keeps
        its own run-wide ids and maps each reply's ``re`` back through its connection's).

        An id is chosen by the client and answers are matched per connection, so ids collide
        across connections, as they do in production: most connections count from 1, as most
        clients do, so two connections, of one tenant or of two, send the same id at the same
        moment (a crowd's first requests are all ``"1"``); one in eight sends random UUIDs (which
        never collide), and one in four sends ids of 64 characters, two- and three-byte ones after
        a counter (the protocol's limit, in characters, not bytes). The kind depends only on the
        connection's name, so a program replays with the same ids (but the UUIDs)."""
        digits = re.search(r"\d+$", conn)
        n = int(digits.group()) if digits else zlib.crc32(conn.encode("utf-8", "surrogatepass"))
        counter = itertools.count(1)
        if n % 4 == 3:
            return ((f"{k}-" + "請求é" * self.limits.max_id)[: self.limits.max_id] for k in counter)
        if n % 8 == 5:
            return (str(uuid.uuid4()) for _ in counter)
        return (str(k) for k in counter)

    def encode(self, req_type: str, req_id: str, fields: dict[str, Any]) -> str:
        """The text frame for a request (``req_id``: the id it carries on the wire)."""
        return json.dumps({"type": req_type, "id": req_id, **fields}, ensure_ascii=False)

    def bad_frame(self, kind: str, req_id: str) -> BadFrame | None:
        """The malformed frame of ``kind`` (one of ``BAD_FRAME_KINDS``) carrying ``req_id``, and
        the answer PROTOCOL.md requires; None where the wire format has no such frame."""
        rid = json.dumps(req_id)
        if kind == "invalid_json":
            return BadFrame('{"type": "ping", "id": ' + rid + ",", req_id, False, "bad_request")
        if kind == "binary":
            return BadFrame(json.dumps({"type": "ping", "id": req_id}).encode(), req_id, False, "bad_request")
        if kind == "nan":
            return BadFrame('{"type": "get_history", "id": ' + rid + ', "thread_id": "x", "limit": NaN}', req_id, None,
                            "bad_request")
        if kind == "non_object":
            return BadFrame(json.dumps(["ping", req_id]), req_id, False, "bad_request")
        if kind == "unknown_type":
            return BadFrame(json.dumps({"type": "subscribe_all_tenants", "id": req_id}), req_id, True, "bad_request")
        if kind == "missing_field":
            return BadFrame(json.dumps({"type": "user_message", "id": req_id, "content": "x"}), req_id, True, "bad_request")
        if kind == "wrong_type":
            return BadFrame(json.dumps({"type": "join_thread", "id": req_id, "thread_id": 42}), req_id, True, "bad_request")
        if kind == "lone_surrogate":
            return BadFrame('{"type": "ping", "id": ' + rid + ', "note": "\\ud800"}', req_id, None, "bad_request")
        if kind == "huge_number":  # 5,000 digits where a string belongs: ill-typed however it parses
            return BadFrame('{"type": "join_thread", "id": ' + rid + ', "thread_id": 1' + "0" * 4999 + "}", req_id, None,
                            "bad_request")
        if kind == "oversize_16mib":  # PROTOCOL.md: too_large holds for messages up to at least 16 MiB
            return BadFrame(_padded_ping(rid, 16 * 1024 * 1024), req_id, False, "too_large")
        if kind == "long_id":
            long_id = (req_id + "-" + "i" * self.limits.max_id)[: self.limits.max_id + 1]
            return BadFrame(json.dumps({"type": "ping", "id": long_id}), long_id, None, "bad_request")
        if kind == "oversize":
            # Two-byte characters: over the limit in bytes of UTF-8, with about half as many
            # characters, so a service that measures characters is seen.
            return BadFrame(_padded_ping(rid, self.limits.max_frame_in // 2 + 1, "\u00e9"), req_id, False, "too_large")
        return None

    def decode(self, message: str | bytes) -> Frame:
        """Parse a server frame and check it against the schema of its type."""
        if isinstance(message, bytes):
            raw = message.decode("utf-8", "replace")
            return Frame(None, {}, raw, ("a binary frame; the protocol sends only text frames",))
        try:
            data = json.loads(message, parse_constant=_refuse_constant)
        except ValueError as exc:
            return Frame(None, {}, message, (f"not strict JSON ({exc})",))
        if not isinstance(data, dict):
            return Frame(None, {}, message, (f"not a JSON object (a {type(data).__name__})",))
        ftype = data.get("type")
        if not isinstance(ftype, str):
            return Frame(None, data, message, ("no string field 'type'",))
        schema = SCHEMA.get(ftype)
        if schema is None:
            return Frame(ftype, data, message, (f"unknown frame type {ftype!r}",))
        problems = _fields(data, schema, ftype)
        if ftype == "error" and isinstance(data.get("code"), str) and data["code"] not in ERROR_CODES:
            problems.append(f"error code {data['code']!r} is not one of {sorted(ERROR_CODES)}")
        if ftype == "agent_chunk" and isinstance(data.get("seq"), int) and data["seq"] < 0:
            problems.append("agent_chunk seq is negative")
        if "re" in data and not isinstance(data["re"], str):
            problems.append(f"{ftype} field 're' must be a string")
        if ftype == "history" and isinstance(data.get("messages"), list):
            for i, item in enumerate(data["messages"]):
                problems.extend(_item(item, _HISTORY_ITEM, f"history.messages[{i}]"))
                if isinstance(item, dict):
                    role = item.get("role")
                    if role not in ("user", "assistant"):
                        problems.append(f"history.messages[{i}] role must be 'user' or 'assistant' (got {role!r})")
                    elif role == "user" and not isinstance(item.get("user"), str):
                        problems.append(f"history.messages[{i}] of role user has no string 'user'")
        if ftype == "threads" and isinstance(data.get("threads"), list):
            for i, item in enumerate(data["threads"]):
                problems.extend(_item(item, _THREAD_ITEM, f"threads.threads[{i}]"))
        if ftype == "welcome" and data.get("protocol") != 1:
            problems.append(f"welcome says protocol {data.get('protocol')!r}, not 1")
        if ftype == "thread_message" and data.get("role") != "user":
            problems.append(f"thread_message role must be 'user' (got {data.get('role')!r})")
        return Frame(ftype, data, message, tuple(problems))


def _item(item: Any, schema: dict[str, str], where: str) -> list[str]:
    if not isinstance(item, dict):
        return [f"{where} is not an object"]
    return _fields(item, schema, where)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_adapter(spec: str | None) -> Adapter:
    """The adapter named ``MODULE:CLASS`` or ``path/to/file.py:CLASS`` (protocol v1's when None).

    Refused, with the adapter's name and what is wrong: one that cannot be
    loaded, is not an `Adapter`, was written for another API version, or
    declares operations partywall does not know or lacks a required one.
    """
    if not spec:
        return Adapter()
    where, _, class_name = spec.rpartition(":")
    if not where or not class_name:
        raise HarnessError(f"--adapter {spec!r}: expected MODULE:CLASS or path/to/file.py:CLASS.")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise HarnessError(f"--adapter {spec!r}: no file {where}.")
            module_spec = importlib.util.spec_from_file_location(f"partywall_adapter_{path.stem}", path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        cls = getattr(module, class_name)
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the adapter's module raises, say so in one line
        raise HarnessError(f"--adapter {spec!r}: cannot load it ({type(exc).__name__}: {exc}).") from None
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise HarnessError(f"--adapter {spec!r} is not a subclass of partywall.adapter.Adapter.")
    if cls.api_version != API_VERSION:
        raise HarnessError(f"--adapter {spec!r} was written for adapter API version {cls.api_version!r}; this "
                           f"partywall speaks version {API_VERSION}.")
    ops = frozenset(cls.operations)
    if ops - KNOWN_OPERATIONS:
        raise HarnessError(f"--adapter {spec!r} declares operations partywall does not know: "
                           f"{', '.join(sorted(ops - KNOWN_OPERATIONS))} (known: {', '.join(sorted(KNOWN_OPERATIONS))}).")
    if REQUIRED_OPERATIONS - ops:
        raise HarnessError(f"--adapter {spec!r} lacks required operations: "
                           f"{', '.join(sorted(REQUIRED_OPERATIONS - ops))}.")
    sem = cls.semantics
    if not isinstance(sem, Semantics):
        raise HarnessError(f"--adapter {spec!r}: semantics must be a partywall.adapter.Semantics (got {sem!r}).")
    if sem.fanout == "joined" and "join_thread" not in ops:
        raise HarnessError(f"--adapter {spec!r} declares fan-out to joined connections but no join_thread.")
    if sem.fanout != "joined" and ops & {"join_thread", "leave_thread"}:
        raise HarnessError(f"--adapter {spec!r} declares join_thread/leave_thread, which only fan-out to joined "
                           f"connections uses (its fan-out is {sem.fanout!r}).")
    return cls()
