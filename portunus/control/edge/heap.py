"""Giving the allocator's free memory back to the kernel (glibc ``malloc_trim``).

Thousands of TLS handshakes at once (an enrollment or reconnect storm) raise the
heap's high-water mark: OpenSSL and the event loop allocate per handshake, free
most of it once the link settles, and glibc keeps the freed pages mapped.  RSS then
stays ~20 KiB per link above what the links hold.  ``malloc_trim(0)`` returns those
pages; it costs a few milliseconds on a heap of a few hundred MiB, so the gateway
calls it only after a burst of handshakes, at most every few seconds.  A no-op where
the C library has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_loaded = False


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def release_free_heap() -> bool:
    """Trim the heap; True when the C library could (``malloc_trim`` returned 1)."""
    global _trim, _loaded
    if not _loaded:
        _trim, _loaded = _load(), True
    return _trim is not None and _trim(0) == 1
