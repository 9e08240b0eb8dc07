"""The process's heaps: giving the C heap's free pages back to the system, and keeping Python's
cyclic garbage collector off the objects a long-running process made at startup.

``trim_heap`` is glibc's ``malloc_trim`` where it exists. Elsewhere it is a no-op: macOS's
allocator returns free pages by itself and has no ``malloc_trim``; on Windows
``ctypes.CDLL(None)`` raises TypeError (there is no "this process" library handle to look
symbols up in); musl has no ``malloc_trim`` either."""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


def trim_heap() -> bool:
    """``malloc_trim(0)`` where glibc has it; whether it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def freeze_startup_objects() -> int:
    """Collect, then move every object that is left out of the collector's reach (``gc.freeze``).

    A server's imports and loaded models leave tens of thousands of long-lived objects; each
    full collection would walk them all again (15-30 ms on a 2-core CPU with a Stream model
    loaded), a pause that lands in some client's stream. Frozen, a full collection walks only
    what was made since. Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
