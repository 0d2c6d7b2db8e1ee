"""The reference agent: replies `echo: ` + the user's content, in chunks."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
import trio


def _check_range(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) for v in value)
        or not 0 <= value[0] <= value[1]
    ):
        raise ValueError(
            f"{attribute.name} must be (min, max) with 0 <= min <= max (got {value!r})"
        )


@attrs.frozen
class AgentConfig:
    startup_ms: tuple[float, float] = attrs.field(default=(50.0, 150.0), validator=_check_range)
    """Start-up delay of `start_agent`, drawn uniformly from [min, max] ms."""
    chunks: int = attrs.field(default=4, validator=attrs.validators.ge(0))
    """How many `agent_chunk` frames a reply streams as (fewer for very short replies)."""
    chunk_delay_ms: tuple[float, float] = attrs.field(default=(10.0, 30.0), validator=_check_range)
    """Delay before each chunk, drawn uniformly from [min, max] ms."""


def split_reply(text: str, chunks: int) -> list[str]:
    """`text` cut into at most `chunks` non-empty pieces of near-equal length."""
    if chunks <= 0 or not text:
        return []
    count = min(chunks, len(text))
    size, extra = divmod(len(text), count)
    pieces, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


class Agent:
    """Paces start-ups and replies. One instance serves every thread."""

    def __init__(self, config: AgentConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    def _delay(self, bounds: tuple[float, float]) -> float:
        low, high = bounds
        return self._rng.uniform(low, high) / 1000.0 if high > 0 else 0.0

    async def start(self) -> float:
        """Start an agent; returns how long it took, in ms."""
        began = trio.current_time()
        delay = self._delay(self.config.startup_ms)
        if delay:
            await trio.sleep(delay)
        return (trio.current_time() - began) * 1000.0

    @staticmethod
    def elapsed_ms(began: float) -> float:
        """Milliseconds since ``began`` (a `trio.current_time()`): what `startup_ms` reports."""
        return (trio.current_time() - began) * 1000.0

    @staticmethod
    def reply_text(content: str) -> str:
        # Verbatim, so whatever a user writes comes back to that thread.
        return "echo: " + content

    async def stream(self, content: str, emit: Callable[[str], None]) -> str:
        """Stream the reply to `emit` chunk by chunk; returns the whole reply."""
        text = self.reply_text(content)
        for piece in split_reply(text, self.config.chunks):
            delay = self._delay(self.config.chunk_delay_ms)
            if delay:
                await trio.sleep(delay)
            emit(piece)
        return text
