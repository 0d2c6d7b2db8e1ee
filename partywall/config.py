"""The one place thresholds and time limits come from: ``[tool.partywall]``.

Values are read from the ``pyproject.toml`` of the current directory when it
has a ``[tool.partywall]`` table (a team's own project), else from the one
shipped beside this package. ``--set key.sub=value`` on the command line
overrides any single value; nothing else changes them.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

from partywall.errors import HarnessError

_PACKAGED = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path} is not valid TOML ({exc}); fix the file or run elsewhere.") from exc
    table = data.get("tool", {}).get("partywall")
    return table if isinstance(table, dict) else None


def config_path() -> Path:
    """The file the configuration is read from."""
    here = Path.cwd() / "pyproject.toml"
    return here if _read(here) is not None else _PACKAGED


def load(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Return ``[tool.partywall]`` with ``KEY=VALUE`` overrides applied.

    A key is a dotted path into the table (``timing.response_ms=8000``); the
    value is parsed as JSON when it parses, else kept as a string. An unknown
    key is refused, so a typo cannot silently leave a threshold unchanged.
    """
    base = _read(config_path()) or _read(_PACKAGED)
    if base is None:
        raise HarnessError(f"no [tool.partywall] table in {config_path()}; partywall needs its thresholds.")
    cfg = copy.deepcopy(base)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise HarnessError(f"--set expects KEY=VALUE (got {item!r}).")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise HarnessError(f"--set {key}: [tool.partywall] has no table {part!r}.")
            node = node[part]
        if parts[-1] not in node:
            known = ", ".join(sorted(node))
            raise HarnessError(f"--set {key}: unknown setting {parts[-1]!r} (known here: {known}).")
        old = node[parts[-1]]
        if isinstance(old, bool) != isinstance(value, bool) or (
            isinstance(old, (int, float)) and not isinstance(value, (int, float))
        ):
            raise HarnessError(f"--set {key}: expected a value like {old!r} (got {raw!r}).")
        node[parts[-1]] = value
    return cfg
