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
    "ChecksumError",
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

    code = _native.ABI["E_OBJECT_NOT_FOUND"]


class ObjectExistsError(StoreError):
    """``put`` of a key that already exists; the stored value is unchanged."""

    code = _native.ABI["E_OBJECT_EXISTS"]


class NoSpaceError(StoreError, MemoryError):
    """The store has no room for the object."""

    code = _native.ABI["E_NO_SPACE"]


class LeaseHeldError(StoreError):
    """The object is leased by a reader and cannot be removed or replaced now."""

    code = _native.ABI["E_LEASE_HELD"]


class InvalidArgumentError(StoreError, ValueError):
    """An argument has a bad value (empty key, too-small buffer, mismatched batch lists...)."""

    code = _native.ABI["E_INVALID_ARGUMENT"]


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument has the wrong type (a non-str key, None as a value...).

    Both an ``InvalidArgumentError`` and a ``TypeError``.
    """

    code = _native.ABI["E_ARGUMENT_TYPE"]


class TransferError(StoreError):
    """Moving bytes failed (a peer died mid-transfer, a device copy failed)."""

    code = _native.ABI["E_TRANSFER"]


class ChecksumError(TransferError):
    """A read's copy differed from the CRC32C its writer stored, on every replica: the object's
    bytes are corrupt, and were not returned (``checksum=True``)."""

    code = _native.ABI["E_CHECKSUM"]


class StoreClosedError(StoreError):
    """The store was closed."""

    code = _native.ABI["E_STORE_CLOSED"]


class UnsupportedError(StoreError):
    """A feature this build or this machine lacks."""

    code = _native.ABI["E_UNSUPPORTED"]


class InternalError(StoreError):
    """A broken invariant inside kvstore: a bug, please report it."""

    code = _native.ABI["E_INTERNAL"]


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
        ChecksumError,
    )
}

_native._set_error_classes(_BY_CODE)
