"""What one key of a job spec must be: `Key` (the rule, the message, the conversion) and the
few rules every table uses (integers, numbers, choices, strings, flags). `vitlens.runner.spec`
describes each table's keys with them; imports neither torch, timm nor ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vitlens.errors import UserError
from vitlens.toml_files import toml_value


@dataclass(frozen=True)
class Key:
    """What one key's value must be: `must` completes "'KEY' must be ...", `ok` tests a
    value, `convert` turns an accepted value into the dataclass's type."""

    must: str
    ok: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def integer(minimum: int) -> Key:
    """An integer (not a bool, not a float) >= `minimum`."""
    return Key(f"an integer >= {minimum}", lambda v: is_int(v) and v >= minimum)


def positive_number() -> Key:
    """An int or float (not a bool) > 0, stored as a float."""
    return Key("a number > 0", lambda v: _is_number(v) and v > 0, float)


def one_of(choices: tuple[str, ...]) -> Key:
    """One of the strings `choices`."""
    return Key(f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices)


TEXT = Key("a non-empty string", _is_text)
TEXTS = Key("a non-empty list of non-empty strings",
            lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_text(s) for s in v), tuple)
FLAG = Key("true or false", lambda v: isinstance(v, bool))


def checked(key: Key, value: Any, name: str, source: str) -> Any:
    """`value` converted by `key`, or a `UserError` "SOURCE: 'NAME' must be ..., not VALUE"."""
    if not key.ok(value):
        raise UserError(f"{source}: '{name}' must be {key.must}, not {toml_value(value)}")
    return key.convert(value)
