"""An exclusive, non-blocking lock on an open file, released when the file is closed or the
process ends (a crash leaves no stale lock behind).

POSIX: ``flock``. Windows: ``msvcrt.locking`` on one byte past any real end of file, so the
lock never covers bytes the holder itself reads or writes (Windows locks are mandatory: a locked
byte cannot be read through another handle, even by the same process)."""

from __future__ import annotations

import errno
import os
from types import ModuleType

fcntl: ModuleType | None
msvcrt: ModuleType | None
try:
    import fcntl
except ImportError:
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

# The byte msvcrt locks: past any scan output in practice, and below 2 GiB because the C
# runtime's _locking has taken its start from a 32-bit file position.
LOCK_OFFSET = (1 << 31) - 2


class LockHeld(Exception):
    """Another open file (this process or another) holds the lock."""


def lock_exclusively(fd: int) -> str | None:
    """Lock ``fd``'s file; LockHeld when it is already locked. The mechanism used ("flock",
    "msvcrt"), or None where the platform has neither (nothing is locked). OSError when the file
    system refuses locks (some network file systems)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld from None
        return "flock"
    if msvcrt is not None:
        here = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EDEADLK):  # the byte is locked by another handle
                raise LockHeld from None
            raise
        finally:
            os.lseek(fd, here, os.SEEK_SET)
        return "msvcrt"
    return None
