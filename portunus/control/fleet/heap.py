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
_M_MMAP_THRESHOLD = -3  # glibc malloc.h
# Each TLS link's event-loop buffer is one 256 KiB allocation of which a page or two is
# ever written.  glibc raises its mmap threshold past that size after the first such
# buffer is freed, and from then on they come from the heap, where freed ones fragment
# it; a fixed threshold keeps every one its own mapping (RSS = pages written, returned
# to the kernel on free).  Measured: 81 -> 63 KiB per idle link at 1,000 links.  (The
# gateway's own TLS transport, tls_transport.py, has no such buffer; the control
# process's other uvloop transports still allocate theirs.)
MMAP_THRESHOLD = 128 * 1024


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
    return fn


def pin_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (no dynamic raise); True when it took."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, size))


def release_free_heap() -> bool:
    """Trim the heap; True when the C library could (``malloc_trim`` returned 1)."""
    global _trim, _loaded
    if not _loaded:
        _trim, _loaded = _load(), True
    return _trim is not None and _trim(0) == 1
