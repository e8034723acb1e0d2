"""kvstore: a KV-cache object store for LLM serving.

``kvstore.Store()`` is an embedded store in this process. See README.md for the API.
"""

from ._errors import (
    ArgumentTypeError,
    InternalError,
    InvalidArgumentError,
    LeaseHeldError,
    NoSpaceError,
    ObjectExistsError,
    ObjectNotFoundError,
    StoreClosedError,
    StoreError,
    TransferError,
    UnsupportedError,
)
from ._native import MAX_KEY_BYTES
from ._sizes import parse_size
from ._store import DEFAULT_SEGMENT_SIZE, Store

__version__ = "0.1.0"

__all__ = [
    "Store",
    "parse_size",
    "MAX_KEY_BYTES",
    "DEFAULT_SEGMENT_SIZE",
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
