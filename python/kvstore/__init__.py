"""kvstore: a KV-cache object store for LLM serving.

``kvstore.Store()`` is an embedded store in this process. See README.md for the API.
"""

from . import _errors
from ._errors import *  # noqa: F403 - the exception hierarchy; listed in _errors.__all__
from ._native import MAX_KEY_BYTES
from ._sizes import parse_size
from ._store import DEFAULT_SEGMENT_SIZE, Store

__version__ = "0.1.0"

__all__ = ["Store", "parse_size", "MAX_KEY_BYTES", "DEFAULT_SEGMENT_SIZE", *_errors.__all__]
