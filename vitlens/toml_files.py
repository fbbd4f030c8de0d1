"""Reading the project's TOML files (job specs, training configs) with user-facing errors."""

from __future__ import annotations

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
