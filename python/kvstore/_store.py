"""The Pythonic store: ``kvstore.Store``."""

from __future__ import annotations

from types import TracebackType

from . import _native
from ._sizes import parse_size

#: Default size of the embedded store's host segment. Pages are committed on first use.
DEFAULT_SEGMENT_SIZE = 1 << 30


class Store(_native.Store):
    """An embedded, in-process KV-cache store: an in-process master and one host segment.

    Values are any C-contiguous buffer-protocol object (bytes, bytearray, memoryview, numpy
    arrays); each put copies the caller's bytes once, straight into the segment. Safe to use
    from many threads. Also a context manager (``with kvstore.Store() as s: ...``) that closes
    the store on exit; any call after ``close()`` raises ``StoreClosedError``.

    ``segment_size`` is in bytes, as an int or a string such as ``"1GiB"`` (default 1 GiB).
    Segment memory is committed on first use; ``prefault=True`` commits all of it now, so
    creation takes longer and later writes never wait for page faults.
    """

    def __init__(self, segment_size: int | str = DEFAULT_SEGMENT_SIZE, *, prefault: bool = False) -> None:
        super().__init__(parse_size(segment_size, name="segment_size"), bool(prefault))

    def __enter__(self) -> "Store":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<kvstore.Store closed>"
        s = self.stats()
        return f"<kvstore.Store objects={s['objects']} bytes_used={s['bytes_used']} capacity={s['capacity']}>"
