"""Binary-mode opens and positioned reads.

Windows opens a file descriptor in text mode unless ``O_BINARY`` is given: every ``\\n`` written
becomes ``\\r\\n`` and reads translate back, so offsets and lengths computed from the bytes read
no longer match the file (a resumed scan would cut its output in the middle of a line). Windows
also has no ``os.pread``/``os.preadv``: the fallback there is a seek and a read under a lock.
"""

from __future__ import annotations

import io
import os
import threading
from typing import BinaryIO, cast

import numpy as np

O_BINARY: int = getattr(os, "O_BINARY", 0)  # 0 where every file is binary (POSIX)


def open_fd(path: str | os.PathLike[str], flags: int, mode: int = 0o666) -> int:
    """``os.open`` in binary mode on every platform."""
    return os.open(path, flags | O_BINARY, mode)


def open_binary(path: str | os.PathLike[str], flags: int, mode: int = 0o666) -> BinaryIO:
    """A binary file object over ``os.open(path, flags)``: read-write with ``O_RDWR``, else
    write-only with ``O_WRONLY``, else read-only."""
    fd = open_fd(path, flags, mode)
    access = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
    try:
        return cast(BinaryIO, os.fdopen(fd, {os.O_RDWR: "r+b", os.O_WRONLY: "wb"}.get(access, "rb")))
    except BaseException:
        os.close(fd)
        raise


class PositionedReader:
    """Reads at given offsets into given buffers, safe from several threads at once.

    ``os.preadv`` (Linux, macOS) reads straight into the buffer and shares no file offset;
    ``os.pread`` copies once; where neither exists (Windows) a seek and a ``readinto`` run under
    one lock per reader."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file: io.FileIO | None = io.FileIO(path, "r")  # binary on Windows too (O_BINARY)
        self._lock = threading.Lock()

    def read_rows(self, out: np.ndarray, offsets: list[int]) -> bool:
        """Fill ``out[i]`` (a C-contiguous row) from ``offsets[i]``; False on any short read."""
        if self._file is None:
            raise ValueError("the file is closed")
        fd = self._file.fileno()
        preadv = getattr(os, "preadv", None)
        pread = getattr(os, "pread", None)
        if preadv is not None:
            return all(preadv(fd, [row], offset) == row.nbytes for row, offset in zip(out, offsets))
        if pread is not None:
            for row, offset in zip(out, offsets):
                data = pread(fd, row.nbytes, offset)
                if len(data) != row.nbytes:
                    return False
                row.view(np.uint8)[:] = np.frombuffer(data, np.uint8)
            return True
        with self._lock:
            f = self._file
            for row, offset in zip(out, offsets):
                f.seek(offset)
                if f.readinto(row.view(np.uint8)) != row.nbytes:
                    return False
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
