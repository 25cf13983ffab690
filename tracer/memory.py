"""Give freed memory back to the operating system, so that peak RSS follows what is alive.

glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap; after a whole Keras tower
and hundreds of activations are freed, `trim()` returns those pages. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None. Looked up once: `find_library` runs a helper program (ldconfig) each call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def trim() -> None:
    """Return the heap's free pages (after a model or a tower is dropped)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)
