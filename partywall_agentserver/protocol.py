"""The wire protocol, version 1, without any I/O.

Everything here is plain functions and frozen values over text: parsing and
validating client frames, building server frames, the size limits and the id
rules. The trio/WebSocket layer in `server.py` stays thin around it, so this
module can be read against PROTOCOL.md line by line.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from typing import Any, Final

import attrs

PROTOCOL_VERSION: Final = 1

#: A client message larger than this many bytes of UTF-8 gets `too_large` and
#: the connection is closed with 1009.
MAX_MESSAGE_BYTES: Final = 65_536
#: `user_message.content` limit, in bytes of UTF-8.
MAX_CONTENT_BYTES: Final = 16_384
#: Request ids (`id`) are strings of at most this many code points.
MAX_REQUEST_ID_CHARS: Final = 64
#: Tenant, user and assistant ids: 1 to this many code points.
MAX_ID_CHARS: Final = 64
#: Requests a single connection may have in flight (received, final reply not
#: yet sent) before further requests get `rate_limited`. PROTOCOL.md asks for
#: at least 64; 128 leaves a pipelining client room without letting one
#: connection queue unbounded work.
MAX_IN_FLIGHT: Final = 128

BAD_REQUEST: Final = "bad_request"
NOT_FOUND: Final = "not_found"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
INTERNAL: Final = "internal"

#: The one `not_found` message, for a thread that does not exist and for a
#: thread of another tenant alike. It must never name the id or its owner.
THREAD_NOT_FOUND_MESSAGE: Final = "No thread with that id exists for this tenant."

_SURROGATE = re.compile("[\ud800-\udfff]")


class ProtocolError(Exception):
    """A request the server refuses; becomes one `error` frame."""

    def __init__(self, code: str, message: str, re: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.re = re


def is_valid_id(value: object) -> bool:
    """Tenant, user and assistant ids: 1-64 code points, no whitespace, Cc or Cs."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        return False
    for ch in value:
        # isspace() covers the Unicode White_Space characters (Zs, line and
        # paragraph separators, the ASCII blanks); categories catch the rest.
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs"):
            return False
    return True


def utf8_length(text: str) -> int:
    """Bytes of UTF-8 that `text` takes, cheaply for short text."""
    if len(text) * 4 <= MAX_CONTENT_BYTES:
        # Four bytes per code point at most, so short text cannot be over any
        # limit we check against; skip the encode.
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def message_too_large(message: str | bytes) -> bool:
    """True when a client message is over MAX_MESSAGE_BYTES of UTF-8."""
    if isinstance(message, bytes):
        return len(message) > MAX_MESSAGE_BYTES
    if len(message) * 4 <= MAX_MESSAGE_BYTES:
        return False
    if len(message) > MAX_MESSAGE_BYTES:
        return True
    return len(message.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES


# --------------------------------------------------------------------------
# Requests: one frozen class per request type.
# --------------------------------------------------------------------------


@attrs.frozen
class StartAgent:
    id: str
    """The client's request id, echoed as `re`."""
    assistant: str
    """Assistant name, a valid id."""
    instructions: str | None
    """Optional instructions, stored with the thread; the echo agent ignores them."""


@attrs.frozen
class JoinThread:
    id: str
    thread_id: str


@attrs.frozen
class LeaveThread:
    id: str
    thread_id: str


@attrs.frozen
class UserMessage:
    id: str
    thread_id: str
    content: str


@attrs.frozen
class GetHistory:
    id: str
    thread_id: str
    limit: int | None
    """Return only the newest `limit` messages (still oldest first)."""


@attrs.frozen
class ListThreads:
    id: str


@attrs.frozen
class Ping:
    id: str


Request = StartAgent | JoinThread | LeaveThread | UserMessage | GetHistory | ListThreads | Ping


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # RFC 8259 leaves duplicate names to the implementation; two parsers
        # that pick different duplicates is how request smuggling starts, so
        # refuse them outright.
        raise ValueError("duplicate object key")
    return obj


_decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _value_problem(exc: ValueError) -> str:
    text = str(exc)
    if "is not valid JSON" in text:  # NaN, Infinity, -Infinity (`_reject_constant`)
        return "The frame is not valid JSON: NaN and Infinity are not JSON numbers."
    if "duplicate object key" in text:
        return "The frame is not valid JSON for this protocol: an object repeats a key."
    return "The frame has a number too large to accept."


class RequestParser:
    """Turns one client message into a Request, or raises ProtocolError.

    A class rather than a function so a planted fault can replace a single
    rule (`check_id`, `check_content`) without a branch in the request path.
    """

    max_in_flight: int = MAX_IN_FLIGHT
    """Requests one connection may have in flight; the next gets `rate_limited`."""

    def over_limit(self, conn: Any) -> str | None:
        """Why ``conn``'s next request gets `rate_limited` (its message), or None to serve it."""
        if conn.in_flight < self.max_in_flight:
            return None
        return (f"At most {self.max_in_flight} requests may be in flight on one connection; "
                "wait for replies before sending more.")

    def parse(self, message: str | bytes) -> Request:
        if isinstance(message, bytes):
            raise ProtocolError(
                BAD_REQUEST, "Binary frames are not accepted; send a JSON object in a text frame."
            )
        try:
            obj = _decoder.decode(message)
        except RecursionError:
            raise ProtocolError(BAD_REQUEST, "The frame is nested too deeply.") from None
        except json.JSONDecodeError as exc:
            raise ProtocolError(BAD_REQUEST, f"The frame is not valid JSON (at character {exc.pos}).") from None
        except ValueError as exc:
            # NaN/Infinity, duplicate keys, and ints past Python's digit limit land here. The
            # message is for the client: it names what is wrong with the frame, never the
            # library's own wording (Python's advice on its digit limit is for us, not them).
            raise ProtocolError(BAD_REQUEST, _value_problem(exc)) from None
        if not isinstance(obj, dict):
            raise ProtocolError(BAD_REQUEST, "A frame must be a JSON object.")
        # The text came through a UTF-8 decoder, so a surrogate can only have
        # arrived as a \u escape; skip the walk when there is none.
        if "\\u" in message and _has_surrogate(obj):
            raw_id = obj.get("id")
            re_ = raw_id if isinstance(raw_id, str) and not _has_surrogate(raw_id) else None
            raise ProtocolError(
                BAD_REQUEST, "The frame contains a lone surrogate, which is not valid Unicode.", re_
            )
        request_id = obj.get("id")
        if not isinstance(request_id, str):
            raise ProtocolError(BAD_REQUEST, "Every request needs `id`, a string.")
        self.check_id(request_id)
        kind = obj.get("type")
        if not isinstance(kind, str):
            raise ProtocolError(BAD_REQUEST, "Every request needs `type`, a string.", request_id)
        builder = self._builders.get(kind)
        if builder is None:
            raise ProtocolError(BAD_REQUEST, f"Unknown request type {kind!r}."[:200], request_id)
        request: Request = getattr(self, builder)(request_id, obj)
        return request

    # -- field rules -------------------------------------------------------

    def check_id(self, request_id: str) -> None:
        """A request's own `id`: at most 64 characters (code points), any of them."""
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise ProtocolError(
                BAD_REQUEST,
                f"`id` must be at most {MAX_REQUEST_ID_CHARS} characters (got {len(request_id)}).",
                request_id,
            )

    @staticmethod
    def _string(obj: dict[str, Any], name: str, request_id: str) -> str:
        value = obj.get(name)
        if not isinstance(value, str):
            missing = name not in obj
            raise ProtocolError(
                BAD_REQUEST,
                f"`{name}` is required and must be a string."
                if missing
                else f"`{name}` must be a string (got {type(value).__name__}).",
                request_id,
            )
        return value

    def check_content(self, content: str, request_id: str) -> None:
        size = utf8_length(content)
        if size > MAX_CONTENT_BYTES:
            raise ProtocolError(
                BAD_REQUEST,
                f"`content` must be at most {MAX_CONTENT_BYTES} bytes of UTF-8 (got {size}).",
                request_id,
            )

    def _start_agent(self, request_id: str, obj: dict[str, Any]) -> StartAgent:
        assistant = obj.get("assistant")
        if not is_valid_id(assistant):
            raise ProtocolError(
                BAD_REQUEST,
                "`assistant` must be a name of 1 to 64 characters without whitespace "
                "or control characters.",
                request_id,
            )
        assert isinstance(assistant, str)
        instructions = obj.get("instructions")
        if "instructions" in obj and not isinstance(instructions, str):
            raise ProtocolError(
                BAD_REQUEST, "`instructions` must be a string when given.", request_id
            )
        return StartAgent(request_id, assistant, instructions)

    def _join(self, request_id: str, obj: dict[str, Any]) -> JoinThread:
        return JoinThread(request_id, self._string(obj, "thread_id", request_id))

    def _leave(self, request_id: str, obj: dict[str, Any]) -> LeaveThread:
        return LeaveThread(request_id, self._string(obj, "thread_id", request_id))

    def _user_message(self, request_id: str, obj: dict[str, Any]) -> UserMessage:
        thread_id = self._string(obj, "thread_id", request_id)
        content = self._string(obj, "content", request_id)
        self.check_content(content, request_id)
        return UserMessage(request_id, thread_id, content)

    def _history(self, request_id: str, obj: dict[str, Any]) -> GetHistory:
        thread_id = self._string(obj, "thread_id", request_id)
        limit = obj.get("limit")
        if "limit" in obj:
            # bool is an int subclass in Python; JSON `true` is not a number.
            if type(limit) is not int or limit < 1:
                raise ProtocolError(
                    BAD_REQUEST, "`limit` must be an integer of at least 1 when given.", request_id
                )
        return GetHistory(request_id, thread_id, limit)

    def _list_threads(self, request_id: str, obj: dict[str, Any]) -> ListThreads:
        return ListThreads(request_id)

    def _ping(self, request_id: str, obj: dict[str, Any]) -> Ping:
        return Ping(request_id)

    #: The method that builds each request type, by name, so a subclass may override one.
    _builders: Final[dict[str, str]] = {
        "start_agent": "_start_agent",
        "join_thread": "_join",
        "leave_thread": "_leave",
        "user_message": "_user_message",
        "get_history": "_history",
        "list_threads": "_list_threads",
        "ping": "_ping",
    }


# --------------------------------------------------------------------------
# Server frames.
# --------------------------------------------------------------------------

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
encode = _encoder.encode


def error_frame(code: str, message: str, re: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "error"}
    if re is not None:
        frame["re"] = re
    frame["code"] = code
    frame["message"] = message
    return encode(frame)


def not_found_frame(re: str, message: str = THREAD_NOT_FOUND_MESSAGE) -> str:
    return error_frame(NOT_FOUND, message, re)


def welcome_frame(tenant: str, user: str, connection_id: str) -> str:
    return encode(
        {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "tenant": tenant,
            "user": user,
            "connection_id": connection_id,
            "server_time": time.time(),
        }
    )


def pong_frame(re: str) -> str:
    return encode({"type": "pong", "re": re, "server_time": time.time()})
