"""Rendering a conversation with the model's own chat template, and tokenizing it safely.

The rendering is split only at the template's own control tokens; the users' text never is.
To know which control tokens belong to the template, the template is rendered once with
placeholders in place of every message's content: control tokens found in that rendering are
the template's, and the contents are then put back as plain text (special-token parsing off),
so a user who types ``<|im_end|>`` gets the characters, not the token.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgeguard.errors import ModelError, UsageError

CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
ROLES = ("user", "assistant")
_CONTROL_RE = re.compile("|".join(re.escape(t) for t in CONTROL_TOKENS))


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def as_messages(prompt: str | Sequence, response: str | None = None) -> list[Message]:
    """A prompt (+ response) or a list of {role, content} mappings as validated messages."""
    raw: list[object]
    if isinstance(prompt, str):
        raw = [{"role": "user", "content": prompt}]
        if response is not None:
            raw.append({"role": "assistant", "content": response})
    else:
        if response is not None:
            raise UsageError("give either a list of messages or a prompt and a response, not both")
        raw = list(prompt)
    messages = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if role not in ROLES:
            raise UsageError(f"message {i}: role must be 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str):
            raise UsageError(f"message {i}: content must be text")
        if not content.strip():
            raise UsageError(f"message {i}: empty {role} text")
        messages.append(Message(role, content))
    if not messages:
        raise UsageError("nothing to check: no messages")
    if messages[0].role != "user":
        raise UsageError("the conversation must start with a user message")
    return messages


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except (TemplateError, RecursionError, MemoryError) as e:
            raise ModelError(f"the model's chat template does not parse: {e}") from e

    def render(self, messages: Sequence[Message], **kwargs) -> str:
        data = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(messages=data, add_generation_prompt=False, **kwargs)
        except TemplateError as e:
            raise UsageError(f"the model's chat template rejects this conversation: {e}") from e
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError, MemoryError) as e:
            # a template that fails by itself (an overflowing range, endless recursion, a string
            # too large to build): the model file is at fault, not the conversation
            raise ModelError(f"the model's chat template fails: {type(e).__name__}: {str(e)[:200]}") from e

    def pieces(self, messages: Sequence[Message], **kwargs) -> list[tuple[bool, str]]:
        """The rendering as (is_control, text) pieces: the template's control tokens, and text
        pieces that hold the message contents."""
        nonce = secrets.token_hex(4)
        holes = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        masked = self.render([Message(m.role, h) for m, h in zip(messages, holes)], **kwargs)
        pieces, pos = [], 0
        for match in _CONTROL_RE.finditer(masked):
            if match.start() > pos:
                pieces.append((False, masked[pos : match.start()]))
            pieces.append((True, match.group()))
            pos = match.end()
        if pos < len(masked):
            pieces.append((False, masked[pos:]))
        filled = []
        for is_control, piece in pieces:
            for hole, m in zip(holes, messages):
                piece = piece.replace(hole, m.content)
            filled.append((is_control, piece))
        if "".join(p for _, p in filled) != self.render(messages, **kwargs):
            raise ModelError("the chat template transforms message text; edgeguard cannot tokenize it safely")
        return filled


def tokenize_pieces(
    pieces: Sequence[tuple[bool, str]], tokenize: Callable[[str], list[int]], control_id: Callable[[str], int]
) -> list[int]:
    """Token ids of a piece list: control tokens by id, text with special-token parsing off."""
    ids: list[int] = []
    for is_control, piece in pieces:
        if is_control:
            ids.append(control_id(piece))
        else:
            ids.extend(tokenize(piece))
    return ids
