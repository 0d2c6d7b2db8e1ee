"""partywall's adapter for chatline, the example service of this folder (see its PROTOCOL.md).

chatline differs from partywall's protocol v1 in every layer an adapter owns:

- **Credentials** travel in a cookie at the upgrade, or in a ``hello`` message
  right after the socket opens (what a browser client does). The suite draws
  ``header`` or ``query`` for each connection; here those mean the cookie and
  the hello message.
- **Framing**: ``{"op": ..., "ref": ...}`` requests, ``{"ev": ...}`` events,
  other names for every field, stream parts counted from 1, one error event
  with its own reasons.
- **Meaning**: a conversation is private to the user who opened it (another
  user of the same organisation must find it exactly as if it did not exist),
  and a turn is synced to the owner's other connections (multi-device sync)
  instead of to connections that joined. There is no join, leave, thread list,
  ping, or history ``limit``.

Everything below maps chatline onto the suite's vocabulary of events
(`partywall.adapter.Frame`: ``agent_started``, ``ack``, ``agent_chunk``, ...);
the state machine, the model and the invariants then need nothing else.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

from partywall.adapter import Adapter, BadFrame, Frame, Limits, Refusals, Semantics

#: chatline's error reasons, as the suite's error kinds.
REASONS = {"malformed": "bad_request", "unknown_conversation": "not_found", "too_big": "too_large", "busy": "rate_limited"}

#: Each chatline event: the suite's frame type, and its fields (chatline name -> (suite name, JSON kind)).
EVENTS: dict[str, tuple[str, dict[str, tuple[str, type | tuple[type, ...]]]]] = {
    "ready": ("welcome", {"org": ("tenant", str), "user": ("user", str), "session": ("connection_id", str)}),
    "denied": ("error", {"why": ("message", str)}),
    "opened": ("agent_started", {"ref": ("re", str), "conv": ("thread_id", str), "agent": ("agent_id", str),
                                 "persona": ("assistant", str), "warmup_ms": ("startup_ms", (int, float))}),
    "got": ("ack", {"ref": ("re", str), "conv": ("thread_id", str), "msg": ("message_id", str)}),
    "part": ("agent_chunk", {"conv": ("thread_id", str), "n": ("seq", int), "text": ("delta", str)}),
    "reply": ("agent_response", {"conv": ("thread_id", str), "msg": ("message_id", str), "text": ("content", str)}),
    "echo": ("thread_message", {"conv": ("thread_id", str), "msg": ("message_id", str), "who": ("user", str),
                                "text": ("content", str)}),
    "log": ("history", {"ref": ("re", str), "conv": ("thread_id", str), "items": ("messages", list)}),
    "fail": ("error", {"reason": ("code", str), "detail": ("message", str)}),
}
ITEM = {"msg": ("message_id", str), "by": ("role", str), "text": ("content", str), "at": ("created_at", (int, float))}


class ChatlineAdapter(Adapter):
    name = "chatline"
    operations: ClassVar[frozenset[str]] = frozenset({"start_agent", "user_message", "get_history"})
    limits: ClassVar[Limits] = Limits(max_id=40, max_content=8000, max_frame_in=131_072, max_in_flight=32)
    semantics: ClassVar[Semantics] = Semantics(thread_scope="user", fanout="owner")
    history_limit: ClassVar[bool] = False
    # A refused cookie gets 401 with a line saying why; another path gets 404.
    refusals: ClassVar[Refusals] = Refusals(empty_body=False)
    credential_ways: ClassVar[dict[str, str]] = {"header": "the chatline_session cookie",
                                                 "query": "a hello message after the socket opens"}

    # -- credentials ---------------------------------------------------------------

    def handshake(self, url: str, token: str, via: str) -> tuple[str, list[tuple[str, str]]]:
        if via == "header" and token:
            return url, [("Cookie", f"chatline_session={token}")]
        return url, []

    def auth_message(self, token: str, via: str) -> str | None:
        if via == "header" and token:
            return None  # the cookie carried it
        # No credential at all is a hello without a key, which chatline refuses at once.
        return json.dumps({"op": "hello", "key": token} if token else {"op": "hello"})

    # -- requests ------------------------------------------------------------------------

    def encode(self, req_type: str, req_id: str, fields: dict[str, Any]) -> str:
        if req_type == "start_agent":
            frame = {"op": "open", "ref": req_id, "persona": fields.get("assistant")}
        elif req_type == "user_message":
            frame = {"op": "say", "ref": req_id, "conv": fields.get("thread_id"), "text": fields.get("content")}
        elif req_type == "get_history":
            frame = {"op": "fetch", "ref": req_id, "conv": fields.get("thread_id")}
        else:
            raise ValueError(f"chatline has no {req_type}")
        return json.dumps(frame, ensure_ascii=False)

    def bad_frame(self, kind: str, req_id: str) -> BadFrame | None:
        rid = json.dumps(req_id)
        made = {
            "invalid_json": ('{"op": "fetch", "ref": ' + rid + ",", False),
            "binary": (json.dumps({"op": "fetch", "ref": req_id, "conv": "x"}).encode(), False),
            "nan": ('{"op": "fetch", "ref": ' + rid + ', "conv": NaN}', None),
            "non_object": (json.dumps(["fetch", req_id]), False),
            "unknown_type": (json.dumps({"op": "subscribe_everything", "ref": req_id}), True),
            "missing_field": (json.dumps({"op": "say", "ref": req_id, "text": "x"}), True),
            "wrong_type": (json.dumps({"op": "fetch", "ref": req_id, "conv": 42}), True),
            # 5,000 digits where a string belongs: malformed whether or not it parses as a number.
            "huge_number": ('{"op": "fetch", "ref": ' + rid + ', "conv": 1' + "0" * 4999 + "}", None),
        }
        if kind in made:
            message, readable = made[kind]
            return BadFrame(message, req_id, readable, "bad_request")
        if kind == "long_id":  # a ref longer than chatline's 64 characters: not readable as a ref
            long_ref = (req_id + "-" + "r" * 64)[:65]
            return BadFrame(json.dumps({"op": "fetch", "ref": long_ref, "conv": "x"}), long_ref, None, "bad_request")
        if kind == "oversize":
            pad = "x" * (self.limits.max_frame_in + 1)
            return BadFrame(json.dumps({"op": "fetch", "ref": req_id, "conv": pad}), req_id, False, "too_large")
        # lone_surrogate: chatline's PROTOCOL.md says nothing of it; oversize_16mib: chatline reads
        # at most 4 MiB and then closes with 1009 without its fail frame, which its README allows.
        return None

    # -- events ----------------------------------------------------------------------

    def decode(self, message: str | bytes) -> Frame:
        if isinstance(message, bytes):
            return Frame(None, {}, message.decode("utf-8", "replace"), ("a binary frame; chatline sends only text",))
        try:
            raw = json.loads(message, parse_constant=_refuse)
        except ValueError as exc:
            return Frame(None, {}, message, (f"not strict JSON ({exc})",))
        if not isinstance(raw, dict) or not isinstance(raw.get("ev"), str):
            return Frame(None, {}, message, ("not an object with a string field 'ev'",))
        ev = raw["ev"]
        if ev not in EVENTS:
            return Frame(ev, raw, message, (f"unknown event {ev!r}",))
        ftype, fields = EVENTS[ev]
        data, problems = _mapped(raw, fields, ev)
        data["type"] = ftype
        if "ref" in raw and ev in ("part", "reply", "fail") and raw["ref"] is not None:
            if isinstance(raw["ref"], str):
                data["re"] = raw["ref"]  # the requester's copy; without ref, a synced copy
            else:
                problems.append(f"{ev} field 'ref' must be a string or null")
        if ev == "part" and isinstance(data.get("seq"), int):
            if data["seq"] < 1:
                problems.append(f"part n must count from 1 (got {data['seq']})")
            data["seq"] -= 1  # the suite counts chunks from 0
        if ev == "fail" and isinstance(data.get("code"), str):
            reason = data["code"]
            if reason not in REASONS:
                problems.append(f"fail reason {reason!r} is not one of {sorted(REASONS)}")
            data["code"] = REASONS.get(reason, reason)
        if ev == "echo":
            data["role"] = "user"
        if ev == "log" and isinstance(data.get("messages"), list):
            data["messages"] = [self._item(item, i, problems) for i, item in enumerate(data["messages"])]
        return Frame(ftype, data, message, tuple(problems))

    def _item(self, item: Any, i: int, problems: list[str]) -> Any:
        if not isinstance(item, dict):
            problems.append(f"log.items[{i}] is not an object")
            return item
        out, more = _mapped(item, ITEM, f"log.items[{i}]")
        problems.extend(more)
        role = {"me": "user", "bot": "assistant"}.get(item.get("by"))
        if role is None:
            problems.append(f"log.items[{i}] by must be 'me' or 'bot' (got {item.get('by')!r})")
        out["role"] = role
        if role == "user":
            if not isinstance(item.get("who"), str):
                problems.append(f"log.items[{i}] by me has no string 'who'")
            else:
                out["user"] = item["who"]
        return out


def _mapped(raw: dict[str, Any], fields: dict[str, tuple[str, Any]], where: str) -> tuple[dict[str, Any], list[str]]:
    """``raw``'s fields under the suite's names, and what is missing or of the wrong type."""
    data: dict[str, Any] = {}
    problems: list[str] = []
    for name, (ours, kind) in fields.items():
        value = raw.get(name)
        if name not in raw:
            problems.append(f"{where} has no field {name!r}")
        elif not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            problems.append(f"{where} field {name!r} has the wrong type (got {value!r:.80})")
        else:
            data[ours] = value
    return data, problems


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
