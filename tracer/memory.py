"""Give freed memory back to the operating system, so that peak RSS follows what is alive; and read that peak.

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


def peak_rss_mb() -> float:
    """This process's peak resident set, in MB: Linux's VmHWM, which starts afresh at exec. Not `ru_maxrss`, which
    Linux carries across exec: a process started by one that had peaked reports the parent's peak as its own."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
