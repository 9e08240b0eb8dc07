"""The standard streams of a console program and of a windowed app.

A windowed app (``pythonw``, a PyInstaller ``--windowed`` build) has ``sys.stderr`` (and
``sys.stdout``) set to None: progress bars and messages are then dropped, not written. A
redirected stdout on Windows is encoded in the console's code page (cp1252 and the like), which
cannot encode most text: JSON written there is ASCII-escaped, which every code page reads the
same, and plain text gets backslash escapes for what the code page lacks instead of failing."""

from __future__ import annotations

import codecs
import json
import sys
from typing import Any, TextIO


def stderr() -> TextIO | None:
    """``sys.stderr`` as it is now, or None where there is none to write to."""
    stream = sys.stderr
    if stream is None or getattr(stream, "closed", False):
        return None
    return stream


def is_utf8(stream: TextIO | None) -> bool:
    """Whether ``stream`` encodes text as UTF-8 (a stream that names no encoding: assumed so)."""
    encoding = getattr(stream, "encoding", None)
    if not encoding:
        return True
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def json_text(obj: Any, stream: TextIO | None = None, **kwargs: Any) -> str:
    """``json.dumps(obj)`` for ``stream`` (default ``sys.stdout``): readable UTF-8 where the stream
    is UTF-8, ``\\u`` escapes elsewhere (the same JSON value, in ASCII)."""
    target = sys.stdout if stream is None else stream
    return json.dumps(obj, ensure_ascii=not is_utf8(target), **kwargs)


def tolerant_stdout() -> None:
    """Let plain text on a non-UTF-8 stdout escape what its encoding lacks instead of raising
    UnicodeEncodeError (JSON goes through ``json_text`` and never needs it)."""
    stream = sys.stdout
    if stream is None or is_utf8(stream):
        return
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # a stream that cannot change now: leave it as it is
            pass
