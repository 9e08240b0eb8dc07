"""Labelled evaluation data: JSON Lines read and validated up front.

One line is an object with either ``prompt`` (+ optional ``response``) or ``message`` (or
``messages``: a list of ``{role, content}``, the Qwen3GuardTest shape), a gold ``label``
(Safe/Unsafe/Controversial, any case), and optionally ``category``, ``refusal`` (Yes/No),
``subset``, ``id``, and the Qwen3GuardTest ``_loc`` fields ``unsafe_start_index`` /
``unsafe_end_index``. A line that breaks these rules is recorded with its reason and skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgeguard.errors import UsageError
from edgeguard.verdict import LABELS

DEFAULT_SUBSET = "all"
_LABELS = {label.lower(): label for label in LABELS}


@dataclass(frozen=True)
class Item:
    """One labelled conversation. ``messages`` is a tuple of (role, content) pairs."""

    line: int
    id: object
    messages: tuple[tuple[str, str], ...]
    label: str
    category: str | None = None
    refusal: str | None = None
    subset: str = DEFAULT_SUBSET
    unsafe_start: int | None = None
    unsafe_end: int | None = None

    @property
    def key(self) -> str:
        """A stable name for the item in reports: its id, else its line number."""
        return f"line {self.line}" if self.id is None else str(self.id)

    @property
    def mode(self) -> str:
        return "response" if self.messages[-1][0] == "assistant" else "prompt"

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation up to the last user turn."""
        last_user = max(i for i, (role, _) in enumerate(self.messages) if role == "user")
        return [{"role": r, "content": c} for r, c in self.messages[: last_user + 1]]

    @property
    def response(self) -> str | None:
        return self.messages[-1][1] if self.mode == "response" else None

    @property
    def text(self) -> str:
        """The last message's text (what the verdict is about), for listings."""
        return self.messages[-1][1]


@dataclass(frozen=True)
class Malformed:
    line: int
    reason: str


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    items: tuple[Item, ...]
    malformed: tuple[Malformed, ...]

    @property
    def subsets(self) -> list[str]:
        return sorted({item.subset for item in self.items})

    def summary(self) -> dict:
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "items": len(self.items),
            "malformed": len(self.malformed),
            "malformed_lines": [{"line": m.line, "reason": m.reason} for m in self.malformed],
            "labels": dict(sorted(Counter(i.label for i in self.items).items())),
            "modes": dict(sorted(Counter(i.mode for i in self.items).items())),
            "subsets": dict(sorted(Counter(i.subset for i in self.items).items())),
            "with_category": sum(i.category is not None for i in self.items),
            "with_refusal": sum(i.refusal is not None for i in self.items),
            "with_span": sum(i.unsafe_start is not None for i in self.items),
        }


class _Bad(Exception):
    pass


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f'"{what}" must be non-empty text')
    return value


def _messages(obj: dict) -> tuple[tuple[str, str], ...]:
    raw = obj.get("message", obj.get("messages"))
    if raw is not None:
        if "prompt" in obj:
            raise _Bad('give either "prompt" or "message", not both')
        if not isinstance(raw, list) or not raw:
            raise _Bad('"message" must be a non-empty list of {role, content}')
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                raise _Bad(f"message {i}: role must be 'user' or 'assistant'")
            out.append((m["role"], _text(m.get("content"), f"message {i} content")))
        if out[0][0] != "user":
            raise _Bad("the conversation must start with a user message")
        return tuple(out)
    prompt = _text(obj.get("prompt"), "prompt")
    response = obj.get("response")
    if response is None:
        return (("user", prompt),)
    return (("user", prompt), ("assistant", _text(response, "response")))


def _index(obj: dict, name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f'"{name}" must be a non-negative integer')
    return value


def parse_item(obj, line: int) -> Item:
    """An Item from one decoded JSON value; raises ``_Bad`` with the reason."""
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object")
    messages = _messages(obj)
    label = obj.get("label")
    if label is None:
        raise _Bad('"label" is missing')
    if not isinstance(label, str) or label.strip().lower() not in _LABELS:
        raise _Bad(f'"label" must be one of {", ".join(LABELS)}, got {label!r}')
    label = _LABELS[label.strip().lower()]
    category = obj.get("category")
    if category is not None and (not isinstance(category, str) or not category.strip()):
        raise _Bad('"category" must be text')
    refusal = obj.get("refusal")
    if refusal is not None:
        if not isinstance(refusal, str) or refusal.strip().capitalize() not in ("Yes", "No"):
            raise _Bad('"refusal" must be Yes or No')
        refusal = refusal.strip().capitalize()
    subset = obj.get("subset", DEFAULT_SUBSET)
    if not isinstance(subset, str) or not subset:
        raise _Bad('"subset" must be text')
    start, end = _index(obj, "unsafe_start_index"), _index(obj, "unsafe_end_index")
    if (start is None) != (end is None):
        raise _Bad('"unsafe_start_index" and "unsafe_end_index" come together')
    if start is not None:
        assert end is not None  # start and end are both set or both None (checked just above)
        if end < start:
            raise _Bad('"unsafe_end_index" lies before "unsafe_start_index"')
        if messages[-1][0] != "assistant":
            raise _Bad("an unsafe span needs a response")
    return Item(line=line, id=obj.get("id"), messages=messages, label=label,
                category=category.strip() if category else None, refusal=refusal, subset=subset,
                unsafe_start=start, unsafe_end=end)


def load(path: str | Path) -> Dataset:
    """Read and validate every line; raises UsageError only when nothing usable is left."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    items, bad = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            items.append(parse_item(obj, number))
        except UnicodeDecodeError:
            bad.append(Malformed(number, "not valid UTF-8"))
        except json.JSONDecodeError as e:
            bad.append(Malformed(number, f"not JSON ({e.msg})"))
        except _Bad as e:
            bad.append(Malformed(number, str(e)))
    if not items:
        raise UsageError(f"{path}: no usable labelled item ({len(bad)} malformed lines)")
    return Dataset(path, hashlib.sha256(data).hexdigest(), tuple(items), tuple(bad))
