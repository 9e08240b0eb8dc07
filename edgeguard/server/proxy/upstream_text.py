"""What the proxy takes from an upstream's answer: its text fields, checked, and nothing else.

Only text the guard judges reaches the client. A whole answer is rebuilt from the fields that
carry the model's text (``content``, ``reasoning_content``, ``refusal``, tool calls'
arguments, a legacy ``function_call``'s arguments), each judged; the rest of the message and the
choice's ``logprobs`` (whose alternatives are text nobody judged) are dropped. A field of the
wrong type, or text the engines do not take (a lone surrogate, NUL), is the upstream's fault:
``sse.SSEError``, which the client gets as ``upstream_invalid``.

JSON can split a character outside the Basic Multilingual Plane into two ``\\uXXXX`` escapes, and
an upstream may send the two halves in consecutive chunks: ``Surrogates`` joins them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeguard.engines import inputs
from edgeguard.errors import UsageError
from edgeguard.server.proxy.release import SEPARATOR
from edgeguard.server.proxy.sse import SSEError

_HIGH = range(0xD800, 0xDC00)


def checked(value: Any, what: str) -> str:
    """``value`` if it is a text the guard can judge, else an SSEError naming ``what``."""
    try:
        return inputs.text(value, f"the upstream's {what}")
    except UsageError as e:
        raise SSEError(str(e)) from None


def optional_text(value: Any, what: str) -> str:
    """A text field that may be absent or null ("" then)."""
    return "" if value is None else checked(value, what)


class Surrogates:
    """Joins the halves of a surrogate pair that arrive in consecutive pieces of one field."""

    def __init__(self) -> None:
        self._held: dict[Any, str] = {}

    def join(self, key: Any, text: str) -> str:
        """``text`` with a high surrogate held from the last piece of ``key`` before it, pairs
        made whole, and a trailing high surrogate held for the next piece."""
        text = self._held.pop(key, "") + text
        if text and ord(text[-1]) in _HIGH:
            self._held[key] = text[-1]
            text = text[:-1]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # surrogates: pairs become their characters, lone ones stay
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        return text

    def check_ended(self) -> None:
        if self._held:
            raise SSEError("the upstream's answer ended inside a character (half a surrogate pair)")


def tool_calls(value: Any) -> list[Mapping[str, Any]]:
    """A message's or a delta's ``tool_calls``: a list of objects (empty when absent)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, Mapping) for c in value):
        raise SSEError(f"the upstream's 'tool_calls' is {inputs.kind(value)}, not a list of objects")
    return value


def function_of(call: Mapping[str, Any]) -> Mapping[str, Any]:
    function = call.get("function")
    if function is None:
        return {}
    if not isinstance(function, Mapping):
        raise SSEError("an upstream tool call's 'function' is not an object")
    return function


def whole_message(message: Mapping[str, Any], prefill: str) -> tuple[str, dict[str, Any]]:
    """(the text to judge, the message the client may get) for a whole answer's message."""
    judged: list[str] = []
    out: dict[str, Any] = {"role": "assistant"}
    reasoning = optional_text(message.get("reasoning_content"), "reasoning_content")
    if reasoning:
        judged.append(reasoning)
        out["reasoning_content"] = reasoning
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise SSEError("the upstream's content holds a part that is not text, which the guard "
                               "cannot judge")
            texts.append(checked(part.get("text"), "content"))
        text = "".join(texts)
        out["content"] = [{"type": "text", "text": t} for t in texts]
    else:
        text = optional_text(content, "content")
        out["content"] = content
    if prefill or text:
        judged.append(prefill + text)
    refusal = optional_text(message.get("refusal"), "refusal")
    if refusal:
        judged.append(refusal)
        out["refusal"] = refusal
    calls = []
    for call in tool_calls(message.get("tool_calls")):
        function = function_of(call)
        arguments = optional_text(function.get("arguments"), "tool call arguments")
        if arguments:
            judged.append(arguments)
        calls.append({"id": call.get("id"), "type": call.get("type", "function"),
                      "function": {"name": function.get("name"), "arguments": arguments}})
    if calls:
        out["tool_calls"] = calls
    if message.get("function_call") is not None:
        legacy = message["function_call"]
        if not isinstance(legacy, Mapping):
            raise SSEError("the upstream's 'function_call' is not an object")
        arguments = optional_text(legacy.get("arguments"), "function_call arguments")
        if arguments:
            judged.append(arguments)
        out["function_call"] = {"name": legacy.get("name"), "arguments": arguments}
    return SEPARATOR.join(judged), out
