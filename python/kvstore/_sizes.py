"""Byte sizes written as ints or strings such as ``"1GiB"``."""

from __future__ import annotations

import re

from ._errors import ArgumentTypeError, InvalidArgumentError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Returns ``value`` in bytes.

    Accepts a non-negative int or a string: a number with an optional unit, where units are
    powers of 1024 and case-insensitive (``"512"``, ``"64KiB"``, ``"16MB"``, ``"1.5 GiB"``;
    ``KB`` and ``KiB`` both mean 1024 bytes, as in Mooncake's configuration).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ArgumentTypeError(f"{name} must be an int or a string such as '1GiB', not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"{name} must not be negative, got {value}")
        return value
    m = _PATTERN.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgumentError(f"{name} {value!r} is not a size; use bytes or a unit such as '64MiB' or '1GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
