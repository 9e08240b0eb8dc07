"""File names handed to llama.cpp for files it creates.

llama.cpp opens the files it reads through ``ggml_fopen``, which takes UTF-8 on every platform,
but its quantizer creates its output with a narrow ``std::ofstream``: on Windows that name is
read in the ANSI code page (cp1252 and the like), so a path under ``C:\\Users\\Jörg`` may be
fine and one under ``C:\\Users\\Дмитрий`` cannot be opened. There the name passed is, in order:
the path itself when the code page can spell it; its 8.3 short name (ASCII, where the volume
keeps short names); else a file in an ASCII-named temporary folder, moved into place after."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

IS_WINDOWS = sys.platform == "win32"
ANSI_ENCODING = "mbcs"  # Windows' ANSI code page, whichever it is on this machine


def ansi_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """``path`` in the ANSI code page, or None where the code page cannot spell it."""
    try:
        return os.fspath(path).encode(ANSI_ENCODING, "strict")
    except (UnicodeEncodeError, LookupError):
        return None


def short_path(path: str | os.PathLike[str]) -> str | None:
    """The 8.3 short name of an existing file (Windows); None where there is none."""
    if not IS_WINDOWS:
        return None
    import ctypes
    from ctypes import wintypes

    get = ctypes.windll.kernel32.GetShortPathNameW  # type: ignore[attr-defined,unused-ignore]
    get.argtypes, get.restype = [wintypes.LPCWSTR, wintypes.LPWSTR, wintypes.DWORD], wintypes.DWORD
    size = get(os.fspath(path), None, 0)
    if not size:
        return None
    buffer = ctypes.create_unicode_buffer(size)
    return buffer.value if get(os.fspath(path), buffer, size) else None


def _ascii_folders() -> Iterator[str]:
    """Where a temporary file may go when the destination's name cannot be passed."""
    for candidate in (tempfile.gettempdir(), os.environ.get("PUBLIC"), os.environ.get("PROGRAMDATA")):
        if candidate and ansi_bytes(candidate) is not None:
            yield candidate


@contextlib.contextmanager
def native_output_path(dst: str | os.PathLike[str]) -> Iterator[bytes]:
    """The name to give llama.cpp for a file it will create at ``dst``; after the block the file
    is at ``dst``, whichever name was used."""
    dst = Path(dst)
    if not IS_WINDOWS:
        yield os.fsencode(dst)
        return
    direct = ansi_bytes(dst)
    if direct is not None:
        yield direct
        return
    dst.touch()  # a short name exists only for an existing file; llama.cpp truncates it
    short = short_path(dst)
    encoded = ansi_bytes(short) if short else None
    if encoded is not None:
        yield encoded
        return
    dst.unlink()
    for folder in _ascii_folders():
        try:
            tmp = Path(tempfile.mkdtemp(prefix="edgeguard-", dir=folder))
        except OSError:
            continue
        try:
            staged = tmp / "out.bin"
            yield ansi_bytes(staged) or os.fsencode(staged)
            if staged.exists():
                shutil.move(os.fspath(staged), dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    raise OSError(f"cannot give llama.cpp a name for {dst}: the Windows code page cannot spell it, the volume "
                  "keeps no short names and no ASCII-named temporary folder is writable; choose a folder "
                  "whose path is ASCII")
