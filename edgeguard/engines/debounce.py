"""The official Stream debounce, offline (``first_trigger``) and streaming (``Debouncer``).

Official rule (Qwen3Guard evaluation code): a response is Unsafe at the first index i where
tokens i-1 and i are both Unsafe; only if that never happens over the whole response is it
Controversial, at the first index i where tokens i-1 and i are both Controversial. A mixed
Unsafe/Controversial pair never triggers. The response's category is the category of the
token at the triggering index.

Streaming cannot know whether an Unsafe pair comes later, so ``Debouncer`` reports:
- an Unsafe pair as soon as it appears; it is final (nothing later can change it);
- a Controversial pair as a provisional "Controversial" state, upgraded to Unsafe (with that
  pair's index and category) if an Unsafe pair appears later.
After the last token the state therefore equals the offline rule exactly. Labels only ever
escalate (Safe -> Controversial -> Unsafe), so a caller may stop generation on the first
state it considers flagged without having missed an earlier one.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgeguard.verdict import LABELS, StreamState

# The labels of which two consecutive tokens flag a response, Unsafe's pair taking precedence.
PAIR_LABELS: tuple[str, ...] = ("Unsafe", "Controversial")

_SAFE = StreamState(flagged=False, label="Safe", category=None, flagged_at=None)


def _check(label: str) -> str:
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    return label


def first_trigger(labels: Iterable[str]) -> tuple[int, str] | None:
    """The offline rule: ``(index, "Unsafe")``, else ``(index, "Controversial")``, else None."""
    first_controversial = None
    previous = None
    for index, label in enumerate(labels):
        _check(label)
        if label == previous == "Unsafe":
            return index, "Unsafe"
        if label == previous == "Controversial" and first_controversial is None:
            first_controversial = index
        previous = label
    if first_controversial is not None:
        return first_controversial, "Controversial"
    return None


class Debouncer:
    """Streaming debounce state machine; indices count pushes from 0."""

    def __init__(self) -> None:
        self._labels: list[str] = []
        self._categories: list[str | None] = []
        self._first_unsafe: int | None = None
        self._first_controversial: int | None = None

    def __len__(self) -> int:
        return len(self._labels)

    def push(self, label: str, category: str | None = None) -> StreamState:
        """Add the next token's label and category; returns the state after it."""
        index = len(self._labels)
        previous = self._labels[-1] if self._labels else None
        self._labels.append(_check(label))
        self._categories.append(category)
        if label == previous == "Unsafe" and self._first_unsafe is None:
            self._first_unsafe = index
        if label == previous == "Controversial" and self._first_controversial is None:
            self._first_controversial = index
        return self.state

    def rollback(self, n: int) -> StreamState:
        """Forget the last ``n`` pushes; the state is what it was before them."""
        if not 0 <= n <= len(self._labels):
            raise ValueError(f"cannot roll back {n} of {len(self._labels)} pushed tokens")
        keep = len(self._labels) - n
        del self._labels[keep:]
        del self._categories[keep:]
        # A trigger depends only on the tokens up to it, so earlier triggers stay valid.
        if self._first_unsafe is not None and self._first_unsafe >= keep:
            self._first_unsafe = None
        if self._first_controversial is not None and self._first_controversial >= keep:
            self._first_controversial = None
        return self.state

    def reset(self) -> None:
        self.rollback(len(self._labels))

    @property
    def state(self) -> StreamState:
        for index, label in ((self._first_unsafe, "Unsafe"),
                             (self._first_controversial, "Controversial")):
            if index is not None:
                return StreamState(flagged=True, label=label,
                                   category=self._categories[index], flagged_at=index)
        return _SAFE
