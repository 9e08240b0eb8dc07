"""What the engines accept from a caller, checked in one place: the Python API's entry points
and the server's request parsing call these, so both refuse the same inputs with the same
``UsageError`` message (the server answers it as a 400).

Text is a ``str`` of valid Unicode without NUL characters:

- a lone surrogate (which Python strings and JSON's ``\\ud800`` escapes can carry) has no UTF-8
  form, so the tokenizer cannot see the text the caller meant;
- NUL is refused because the text judged must be the text used: C strings, many loggers and
  databases (PostgreSQL's ``text``) cut a string at its first NUL, so a filter that judged the
  whole string would approve words a downstream reader never sees, or miss the ones it does.
  A caller whose texts legitimately carry NUL strips or replaces them and judges that text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from edgeguard.errors import UsageError

ROLES = ("user", "assistant")
MESSAGE_SHAPE = '{"role", "content"}'


def kind(value: Any) -> str:
    """A value's type in words a Python caller and a JSON client both read."""
    if value is None:
        return "None (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes (decode them to str first)"
    if isinstance(value, Mapping):
        return "an object (dict)"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def text(value: Any, what: str) -> str:
    """``value`` if it is a text the engines take, else a UsageError naming ``what``."""
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string, got {kind(value)}")
    nul = value.find("\x00")
    if nul >= 0:
        raise UsageError(f"{what} contains a NUL character (at {nul})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid Unicode (a lone surrogate at {e.start})") from e
    return value


def chunk(value: Any, what: str = "text") -> str | bytes:
    """A streamed text chunk: ``text`` rules for a str; bytes (UTF-8, possibly cut inside a
    character) without NUL; the UTF-8 itself is checked as it is decoded."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        nul = data.find(b"\x00")
        if nul >= 0:
            raise UsageError(f"{what} contains a NUL character (at byte {nul})")
        return data
    return text(value, what)


def messages(value: Any, what: str = "messages") -> list:
    """A list of ``{"role", "content"}`` mappings (or objects with those attributes, such as
    ``template.Message``): the shape, the roles and every content's text."""
    if isinstance(value, (str, bytes, bytearray, Mapping)) or not isinstance(value, Sequence):
        raise UsageError(f"{what} must be a list of {MESSAGE_SHAPE} objects, got {kind(value)}")
    if not value:
        raise UsageError("nothing to check: no messages")
    for i, m in enumerate(value):
        if isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        elif hasattr(m, "role") and hasattr(m, "content"):
            role, content = m.role, m.content
        else:
            raise UsageError(f"{what}[{i}] must be a {MESSAGE_SHAPE} object, got {kind(m)}")
        if role not in ROLES:
            raise UsageError(f"message {i}: role must be 'user' or 'assistant', got {role!r}")
        text(content, f"{what}[{i}].content")
    return list(value)


def conversation(prompt: Any, response: Any = None) -> None:
    """What ``check(prompt, response)`` and ``session(prompt)`` take: a prompt text (and a
    response text), or a list of messages (and no response)."""
    if isinstance(prompt, str):
        text(prompt, "prompt")
        if response is not None:
            text(response, "response")
        return
    if isinstance(prompt, (bytes, bytearray, memoryview, Mapping)) or not isinstance(prompt, Sequence):
        raise UsageError(f"prompt must be a string or a list of {MESSAGE_SHAPE} objects, got {kind(prompt)}")
    if response is not None:
        raise UsageError("give either a list of messages or a prompt and a response, not both")
    messages(prompt)


def token_ids(values: Any, n_vocab: int) -> list[int]:
    """Token ids as a list of ints in ``[0, n_vocab)`` (numpy integers too)."""
    if isinstance(values, (str, bytes, bytearray, Mapping)) or not isinstance(values, Iterable):
        raise UsageError(f"token ids must be a list of integers, got {kind(values)}")
    ids = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageError(f"token ids must be integers, got {value!r}")
        if not 0 <= int(value) < n_vocab:
            raise UsageError(f"token id {value} is not a token of this model (ids lie in [0, {n_vocab}))")
        ids.append(int(value))
    return ids

