"""Incremental re-tokenization of streamed text: token ids that never need taking back.

A text that arrives in chunks (from another model, a socket, a file) must be scored with the
Qwen3 tokenization of the WHOLE text, but BPE can merge across a chunk edge ("hel" + "lo").
``Retokenizer`` keeps the text whose tokens could still change pending and commits the rest.

Commit rule (proved for the Qwen2 pre-tokenizer regex

    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*
    |\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

and for NFC): BPE never merges across a pre-token edge, so position b of the pending text is
final once no match of the regex can contain both the characters x = text[b-1] and y = text[b],
whatever follows y, and normalization cannot join them. Listing the pairs each alternative can
contain (letter-letter, apostrophe-letter, non-newline-non-alphanumeric-letter, space-symbol,
symbol-symbol, symbol-newline, whitespace-whitespace) leaves these "hard" pairs:

1. x is a letter or a digit and y is neither a letter (after a letter) nor a combining mark:
   a letter run, a digit and a contraction all end at x;
2. x is a newline (or carriage return) and y is not whitespace: ``\\s*[\\r\\n]+`` and the
   ``[\\r\\n]*`` tail of a symbol run both end at the last newline;
3. x is not whitespace and y is an ASCII digit: digits are always pre-tokens of their own.
   (Whitespace before a digit is excluded on purpose: ``\\s+(?!\\S)`` splits "a  1" as
   "a", " ", " ", "1" but "a  " alone as "a", "  ".)

The end of the pending text is never a boundary, since y is unknown there. Characters whose
Unicode category may differ between Python's database and the tokenizer's (anything not
assigned with the same category in Unicode 3.2, such as recent emoji) never form a hard pair;
neither do format characters (zero-width joiners). Texts the tokenizer matches atomically
before pre-tokenization (llama.cpp does so for user-defined added tokens such as ``<think>``,
even with special-token parsing off) are passed as ``atomic``: a boundary is refused while an
atomic text could still cover it. A refused or missing boundary only delays a commit.

Pending text stays short on ordinary text (a word, a run of whitespace or of CJK letters); the
work per push is proportional to the chunk plus the text committed.
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Callable, Iterable

from edgeguard.errors import UsageError

_OLD = unicodedata.ucd_3_2_0
_NEWLINES = "\r\n"
_NONSPACE = ("L", "N", "P", "S")
_AFTER_LETTER = ("N", "P", "S", "Z")
_AFTER_DIGIT = ("L", "N", "P", "S", "Z")


def _category(c: str) -> str:
    """The Unicode category where Python and any tokenizer surely agree, else "Cn"."""
    if c < "\x80":
        return unicodedata.category(c)
    category = unicodedata.category(c)
    return category if _OLD.category(c) == category else "Cn"


def _is_space(c: str) -> bool:
    return c.isspace() or _category(c)[0] in ("Z", "C")


def hard_pair(x: str, y: str) -> bool:
    """Whether the pre-tokenization surely splits between adjacent characters x and y."""
    cx = _category(x)[0]
    cy = _category(y)
    if cx == "L":
        return cy[0] in _AFTER_LETTER or (y < "\x80" and cy[0] == "C" and y.isspace())
    if cx == "N":
        return cy[0] in _AFTER_DIGIT or (y < "\x80" and cy[0] == "C" and y.isspace())
    if x in _NEWLINES:
        return cy[0] in _NONSPACE
    return "0" <= y <= "9" and not _is_space(x) and cx != "C"


class Retokenizer:
    """Feed text in chunks; get the ids of ``tokenize(whole text)`` as they become final.

    ``push(chunk)`` returns the newly committed ids, ``finish()`` the rest; concatenated, they
    equal ``tokenize(text)`` for the concatenation of all chunks, however the text was cut.
    Bytes chunks may split a UTF-8 character; invalid UTF-8 is a UsageError (the CLI rejects it
    the same way), after which the retokenizer is empty. After ``finish()`` a new text may start.
    """

    def __init__(self, tokenize: Callable[[str], list[int]], *, atomic: Iterable[str] = ()):
        self._tokenize = tokenize
        # (x, y) -> [(text, k)]: an atomic text with the hard pair x, y at k-1, k.
        self._atomic: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for text in set(atomic):
            for k in range(1, len(text)):
                if hard_pair(text[k - 1], text[k]):
                    self._atomic.setdefault((text[k - 1], text[k]), []).append((text, k))
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._pending = ""

    @property
    def pending(self) -> str:
        """Text received but not committed yet."""
        return self._pending

    def push(self, chunk: str | bytes) -> list[int]:
        """Add the next chunk; returns the ids that became final with it (often none)."""
        try:
            if isinstance(chunk, (bytes, bytearray, memoryview)):
                text = self._decoder.decode(bytes(chunk))
            elif isinstance(chunk, str):
                text = self._decoder.decode(b"", final=True) + chunk
            else:
                raise UsageError(f"text chunks must be str or bytes, not {type(chunk).__name__}")
        except UnicodeDecodeError as e:
            self.reset()
            raise UsageError(f"the text is not valid UTF-8 ({e.reason})") from e
        if not text:
            return []
        start = max(1, len(self._pending))
        self._pending += text
        cut = self._last_boundary(start)
        if cut is None:
            return []
        done, self._pending = self._pending[:cut], self._pending[cut:]
        return list(self._tokenize(done))

    def finish(self) -> list[int]:
        """Commit everything pending (the text has ended); the retokenizer is then empty."""
        try:
            rest = self._pending + self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise UsageError("the text ends inside a UTF-8 character") from e
        finally:
            self.reset()
        return list(self._tokenize(rest)) if rest else []

    def reset(self) -> None:
        """Forget pending text and any partial UTF-8 character."""
        self._decoder.reset()
        self._pending = ""

    def _last_boundary(self, start: int) -> int | None:
        """The last hard boundary b >= start of the pending text (earlier ones were refused)."""
        text = self._pending
        for b in range(len(text) - 1, start - 1, -1):
            if hard_pair(text[b - 1], text[b]) and not self._covered(text, b):
                return b
        return None

    def _covered(self, text: str, b: int) -> bool:
        """Whether an atomic text could lie across b, given the text known so far."""
        for atom, k in self._atomic.get((text[b - 1], text[b]), ()):
            s = b - k
            # s < 0 would put it across the previous commit, which was refused then.
            if s >= 0:
                known = text[s : s + len(atom)]
                if atom.startswith(known):
                    return True
        return False
