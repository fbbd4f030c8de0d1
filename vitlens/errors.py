"""The one exception type for user mistakes (bad paths, options, files), and the one rule
for turning any error into a stored reason.

The CLI prints a `UserError` as one line and exits non-zero, without a traceback;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+")
_HEX_ID = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


class UserError(Exception):
    """A problem the user can fix: the message names the file, sample or option."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line_reason(error: BaseException | str, limit: int = 500) -> str:
    """A reason fit for a `rejects` row or a one-line message: deterministic and one line.

    ANSI colour codes and object addresses (`<_io.BytesIO object at 0x7f…>` becomes
    `<_io.BytesIO object>`) are removed; of a multi-line text (a traceback) only the last
    non-empty line is kept, which is where Python puts the exception itself; an exception
    is written as `TypeName: message`. At most `limit` characters.
    """
    if isinstance(error, BaseException):
        text = str(error)
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    else:
        text = error
    text = _ANSI.sub("", text)
    text = _ADDRESS.sub("", text)
    text = _HEX_ID.sub("0x…", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"
