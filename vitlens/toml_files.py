"""Reading the project's TOML files (job specs, training configs) with user-facing errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from vitlens.errors import UserError


def read_toml(path: Path, what: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The TOML table in `path` with `overrides` applied; a missing or invalid file is a
    `UserError` naming it (`what` says what the file is, e.g. "job spec")."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None
    raw.update(overrides or {})
    return raw


def toml_value(value: Any, limit: int = 80) -> str:
    """`value` as it is spelled in TOML, on one line, for messages: `true`, `"1"`, `1.5`,
    `["a", 2]`, `a table` (at most `limit` characters)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(toml_value(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "a table"
    elif value is None:
        text = "nothing"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
