"""kvstore's exception hierarchy.

Every failure of the native core arrives as a status code; ``_BY_CODE`` below is the one
place that maps codes to classes (the extension looks classes up in it).
"""

from __future__ import annotations

from . import _native

__all__ = [
    "StoreError",
    "ObjectNotFoundError",
    "ObjectExistsError",
    "NoSpaceError",
    "LeaseHeldError",
    "InvalidArgumentError",
    "ArgumentTypeError",
    "TransferError",
    "StoreClosedError",
    "UnsupportedError",
    "InternalError",
]


class StoreError(Exception):
    """Base class of every error kvstore raises."""

    #: Stable status code of the native core (see ``kvstore_abi.h``).
    code: int = 0

    def __str__(self) -> str:  # KeyError would quote the message; keep it plain
        return str(self.args[0]) if self.args else self.__class__.__name__


class ObjectNotFoundError(StoreError, KeyError):
    """No object with that key (never written, removed, or not yet complete)."""

    code = 1


class ObjectExistsError(StoreError):
    """``put`` of a key that already exists; the stored value is unchanged."""

    code = 2


class NoSpaceError(StoreError, MemoryError):
    """The store has no room for the object."""

    code = 3


class LeaseHeldError(StoreError):
    """The object is leased by a reader and cannot be removed or replaced now."""

    code = 4


class InvalidArgumentError(StoreError, ValueError):
    """An argument has a bad value (empty key, too-small buffer, mismatched batch lists...)."""

    code = 5


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument has the wrong type (a non-str key, None as a value...).

    Both an ``InvalidArgumentError`` and a ``TypeError``.
    """

    code = 10


class TransferError(StoreError):
    """Moving bytes failed (a peer died mid-transfer, a device copy failed)."""

    code = 6


class StoreClosedError(StoreError):
    """The store was closed."""

    code = 7


class UnsupportedError(StoreError):
    """A feature this build or this machine lacks."""

    code = 8


class InternalError(StoreError):
    """A broken invariant inside kvstore: a bug, please report it."""

    code = 9


_BY_CODE: dict[int, type[StoreError]] = {
    cls.code: cls
    for cls in (
        ObjectNotFoundError,
        ObjectExistsError,
        NoSpaceError,
        LeaseHeldError,
        InvalidArgumentError,
        TransferError,
        StoreClosedError,
        UnsupportedError,
        InternalError,
        ArgumentTypeError,
    )
}

_native._set_error_classes(_BY_CODE)
