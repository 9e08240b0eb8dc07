"""Giving the C heap's free pages back to the system: glibc's ``malloc_trim``, where it exists.

Elsewhere this is a no-op: macOS's allocator returns free pages by itself and has no
``malloc_trim``; on Windows ``ctypes.CDLL(None)`` raises TypeError (there is no "this process"
library handle to look symbols up in); musl has no ``malloc_trim`` either."""

from __future__ import annotations

import ctypes
import functools


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
