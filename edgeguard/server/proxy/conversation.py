"""An OpenAI chat request, checked, and the conversation the guard judges from it.

Qwen3Guard judges user and assistant turns. From OpenAI's roles: ``user`` is a user turn, and
so is ``tool`` (a tool's output is text the LLM reads, the same way it reads the user's);
``assistant`` is an assistant turn (its text and its tool calls' arguments); ``system`` and
``developer`` messages are the app's own instructions and are not judged. Content may be a
string or a list of parts: the text parts are judged, joined by newlines (other parts, such as
images, pass to the upstream unjudged); so are the arguments of its tool calls and of a legacy
``function_call``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeguard.server.errors import HTTPError, check_text

_ROLES = {"user": "user", "tool": "user", "function": "user", "assistant": "assistant"}
_UNJUDGED = ("system", "developer")


def check_request(body: Mapping[str, Any]) -> None:
    """400 for what the proxy cannot forward faithfully; every other field passes untouched."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise HTTPError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                        "invalid_input")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise HTTPError(400, "'stream' must be true, false or null", "invalid_input")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise HTTPError(400, f"'n' must be 1 here: the guard judges one answer per request, got {n!r}",
                        "invalid_input")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise HTTPError(400, "'model' must be a string", "invalid_input")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in _ROLES and role not in _UNJUDGED:
            raise HTTPError(400, f"messages[{i}]: unknown role {role!r}", "invalid_input")
        check_text(text_of(message, i), f"messages[{i}]")


def text_of(message: Mapping[str, Any], i: int = 0) -> str:
    """The judged text of one message: its text content and its tool calls' arguments."""
    content = message.get("content")
    texts: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise HTTPError(400, f"messages[{i}]: a text part needs a string 'text'", "invalid_input")
                texts.append(part["text"])
    elif content is not None:
        raise HTTPError(400, f"messages[{i}]: 'content' must be a string, a list of parts or null",
                        "invalid_input")
    calls = message.get("tool_calls")
    if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, Mapping) for c in calls)):
        raise HTTPError(400, f"messages[{i}]: 'tool_calls' must be a list of objects", "invalid_input")
    legacy = message.get("function_call")
    if legacy is not None and not isinstance(legacy, Mapping):
        raise HTTPError(400, f"messages[{i}]: 'function_call' must be an object", "invalid_input")
    for function in [c.get("function") for c in calls or ()] + [legacy]:
        if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
            texts.append(function["arguments"])
    return "\n".join(t for t in texts if t)


def guard_conversation(messages: list[dict]) -> tuple[list[dict], str]:
    """(the turns judged as the prompt, ending with a user turn; an assistant prefill after it).

    A request may end with an assistant message for the LLM to continue: its text is the start
    of the answer the guard judges, though the client, who wrote it, is never sent it."""
    turns: list[dict] = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.get("role", ""))
        text = text_of(message, i)
        if role is None or not text.strip():
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n\n" + text}
        else:
            turns.append({"role": role, "content": text})
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    prefill = ""
    if turns and turns[-1]["role"] == "assistant":
        prefill = turns.pop()["content"]
    if not turns:
        raise HTTPError(400, "the conversation has no user text to judge", "invalid_input")
    return turns, prefill
