"""Server-sent events: the upstream's stream parsed incrementally, and the client's written.

Parsing follows the SSE format as OpenAI-compatible servers use it: events end at a blank line,
their ``data:`` lines join with newlines, comments (``:``) and other fields are ignored, and
``\\n``, ``\\r\\n`` and ``\\r`` all end a line. An event past ``max_event`` bytes is an error
(nothing of it is kept), so a hostile or broken upstream cannot grow memory without bound.
"""

from __future__ import annotations

import json
from typing import Any

DONE = "[DONE]"


class SSEError(Exception):
    """The upstream's stream is not what an OpenAI-compatible server sends."""


class SSEParser:
    def __init__(self, max_event: int):
        self.max_event = max_event
        self._buffer = b""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event the chunk completes, in order."""
        self._buffer += chunk
        events: list[str] = []
        while True:
            cut = min((i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                if len(self._buffer) + self._size > self.max_event:
                    raise SSEError(f"an upstream event is larger than {self.max_event} bytes")
                return events
            if self._buffer[cut:cut + 1] == b"\r" and cut + 1 == len(self._buffer):
                return events  # a "\r" may be the first half of "\r\n": wait for the next byte
            line = self._buffer[:cut]
            step = 2 if self._buffer[cut:cut + 2] == b"\r\n" else 1
            self._buffer = self._buffer[cut + step:]
            if not line:
                if self._data:
                    events.append(self._event())
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                value = value[1:] if value.startswith(b" ") else value
                self._size += len(value) + 1
                if self._size > self.max_event:
                    raise SSEError(f"an upstream event is larger than {self.max_event} bytes")
                self._data.append(value)

    def close(self) -> list[str]:
        """Events left when the stream ends (a last event without its blank line counts)."""
        if self._buffer.startswith(b"data:"):
            self.feed(b"\n")
        self._buffer = b""
        return [self._event()] if self._data else []

    def _event(self) -> str:
        data = b"\n".join(self._data)
        self._data, self._size = [], 0
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SSEError(f"an upstream event is not valid UTF-8 ({e.reason})") from e


def parse_chunk(data: str) -> dict[str, Any]:
    """One ``chat.completion.chunk`` object from an event's data."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SSEError(f"an upstream event is not JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(chunk, dict):
        raise SSEError("an upstream event is not a JSON object")
    if chunk.get("error") is not None:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise SSEError(f"the upstream reported an error: {str(message)[:500]}")
    choices = chunk.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise SSEError("an upstream chunk's 'choices' is not a list of objects")
    return chunk


def event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def done() -> bytes:
    return b"data: [DONE]\n\n"
