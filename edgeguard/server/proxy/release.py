"""Which judged text may reach the client: the release rule, and the answer's text by field.

The rule (the principle "nothing unjudged reaches a user"): a token is released once it and
every token before it are judged, no flagged pair (the debounce: two consecutive Unsafe tokens,
or Controversial ones under a strict policy) lies before it, and it cannot be the first token of
such a pair, i.e. its own label is not one a pair the policy flags can have (``holds``: Unsafe
and Controversial under a strict policy, Unsafe under a loose one, none where the policy allows
every category) or the next token is judged too. ``holdback`` tokens more are held (room for
CARE to roll back before a flagged pair), except at the end of the answer.
Release stops only where the tokens so far make whole UTF-8 characters, so the session can be
rolled back exactly to what the client has.

The judged text is the answer's content, reasoning and tool-call arguments, in the order the
upstream sent them (a blank line between fields); ``Transcript`` maps released characters back
onto the fields they came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeguard.engines.debounce import PAIR_LABELS

SEPARATOR = "\n\n"  # judged between two fields of the answer; never sent


@dataclass
class Segment:
    field: str  # "content", "reasoning_content" or "tool_calls"; "" for text never sent
    text: str
    start: int  # offset of the text in the judged text
    tool: dict[str, Any] | None = None  # a tool call's index, id, type and name
    sent: int = 0  # characters of it the client has

    @property
    def end(self) -> int:
        return self.start + len(self.text)


STRICT_HOLDS = frozenset(PAIR_LABELS)  # labels that may start a flagged pair under a strict policy


def releasable(labels: Sequence[str], released: int, flagged_at: int | None, *, holdback: int, final: bool,
               holds: frozenset[str] = STRICT_HOLDS) -> int:
    """How many tokens may be released, given the labels of all judged tokens; ``holds``: the
    labels with which a token may start a pair the policy flags."""
    n = len(labels)
    if flagged_at is not None:  # the pair starts at flagged_at - 1; held tokens before it are dropped
        return max(released, min(n, flagged_at - 1) - holdback)
    if final:
        return n
    k = n - 1 if n and labels[-1] in holds else n
    return max(released, k - holdback)


@dataclass
class Transcript:
    """The answer's judged text, its tokens' verdicts, and what has been released and sent."""

    holdback: int
    piece_bytes: Callable[[int], int]  # a token's length in bytes
    holds: frozenset[str] = STRICT_HOLDS  # labels with which a token may start a flagged pair
    segments: list[Segment] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    _chars: list[int] = field(default_factory=lambda: [0])  # characters decoded after k tokens
    _bytes: list[int] = field(default_factory=lambda: [0])  # bytes of the first k tokens
    _utf8: list[int] = field(default_factory=lambda: [0])  # UTF-8 bytes of those characters
    released: int = 0  # tokens
    tokens: int = 0  # tokens judged

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def size(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @property
    def released_chars(self) -> int:
        return self._chars[self.released]

    def add(self, field_name: str, text: str, tool: dict[str, Any] | None = None) -> str:
        """Add upstream text of a field ("" for text judged but never sent, such as a client's
        own prefill); returns the text to judge, with a separator before a new field or tool
        call. A new tool call (``tool``: its index, id, type, name) starts a segment even empty."""
        last = self.segments[-1] if self.segments else None
        if last is not None and last.field == field_name and tool is None:
            last.text += text
            return text
        if not text and tool is None:
            return ""
        judged = ""
        if last is not None and last.field and self.size:
            self.segments.append(Segment("", SEPARATOR, self.size))
            judged = SEPARATOR
        self.segments.append(Segment(field_name, text, self.size, tool))
        return judged + text

    def judged(self, verdicts: Sequence[Any], *, flagged_at: int | None, final: bool) -> None:
        """Record verdicts (objects with ``token``, ``text``, ``label``) and move the release."""
        for v in verdicts:
            self.labels.append(v.label)
            self._chars.append(self._chars[-1] + len(v.text))
            self._bytes.append(self._bytes[-1] + self.piece_bytes(v.token))
            self._utf8.append(self._utf8[-1] + len(v.text.encode("utf-8")))
        self.tokens = len(self.labels)
        k = releasable(self.labels, self.released, flagged_at, holdback=self.holdback, final=final,
                       holds=self.holds)
        while k > self.released and self._bytes[k] != self._utf8[k]:  # ends inside a character
            k -= 1
        self.released = k

    def take(self) -> list[tuple[Segment, str]]:
        """The released text the client does not have yet, as (segment, piece) in order; tool
        segments come with an empty piece when only their head is new."""
        limit = self.released_chars
        out = []
        for s in self.segments:
            if s.start > limit or (s.start == limit and s.tool is None):
                break
            piece = s.text[s.sent: max(s.sent, min(len(s.text), limit - s.start))]
            new_head = s.tool is not None and not s.tool.get("sent")
            if s.field and (piece or new_head):
                out.append((s, piece))
            s.sent += len(piece)
            if s.tool is not None:
                s.tool["sent"] = True
        return out

    def rollback(self) -> int:
        """Drop every judged token and text after the released ones (after a flag); returns
        how many tokens the session must roll back. The text kept is exactly the released text."""
        n = self.tokens - self.released
        limit = self.released_chars
        kept = []
        for s in self.segments:
            if s.start < limit or (s.start == limit and s.tool is not None and s.tool.get("sent")):
                s.text = s.text[: limit - s.start]
                kept.append(s)
        self.segments = kept
        del self.labels[self.released:]
        del self._chars[self.released + 1:]
        del self._bytes[self.released + 1:]
        del self._utf8[self.released + 1:]
        self.tokens = self.released
        return n

    def content_sent(self) -> str:
        """The content the client has received so far."""
        return "".join(s.text[: s.sent] for s in self.segments if s.field == "content")
