"""kvstore: a KV-cache object store for LLM serving.

``kvstore.Store()`` is an embedded store in this process. See README.md for the API.
"""

from . import _errors
from ._errors import *  # noqa: F403 - the exception hierarchy; listed in _errors.__all__
from ._native import MAX_KEY_BYTES
from ._native import devices as _devices
from ._sizes import parse_size
from ._store import DEFAULT_SEGMENT_SIZE, Store

__version__ = "0.1.0"


def devices(refresh: bool = False) -> list[str]:
    """Devices kvstore can move memory on, host first: ``["cpu:0", "cuda:0", ...]``.

    Probed once per process (CUDA through the driver library, loaded at run time);
    ``refresh=True`` probes again.
    """
    return _devices(bool(refresh))

__all__ = ["Store", "devices", "parse_size", "MAX_KEY_BYTES", "DEFAULT_SEGMENT_SIZE", *_errors.__all__]
