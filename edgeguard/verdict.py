"""Result types: frozen dataclasses whose ``to_dict()`` is what the CLI and the server print.

Mappings are stored as read-only ``MappingProxyType`` over a private copy and sequences as
tuples, so a result cannot be changed after it is made, not even through its fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from edgeguard.kinds import ENGINES, LABELS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

REFUSALS = ("Yes", "No")

def _frozen_scores(name: str, scores: Mapping[str, float]) -> Mapping[str, float]:
    if not isinstance(scores, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(scores).__name__}")
    # float() turns numpy scalars into plain floats, so to_dict() is JSON-ready.
    return MappingProxyType({str(key): float(value) for key, value in scores.items()})


def _check_label(label: str) -> None:
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")


class _Frozen:
    """Pickling and deepcopy support: mapping proxies cannot be pickled, plain dicts can."""

    def __reduce__(self) -> tuple[type[_Frozen], tuple[Any, ...]]:
        values = []
        for f in fields(cast("DataclassInstance", self)):  # only dataclasses subclass _Frozen
            value = getattr(self, f.name)
            values.append(dict(value) if isinstance(value, MappingProxyType) else value)
        return (self.__class__, tuple(values))


@dataclass(frozen=True, eq=True)
class Verdict(_Frozen):
    """One moderation result for a prompt or a prompt+response pair.

    ``scores`` has exactly the keys Safe, Unsafe, Controversial. ``category_scores`` holds
    whatever the engine read out (Gen includes "None"). ``refusal`` is "Yes"/"No" in Gen
    response mode, else None. ``flagged`` is the policy's decision. A Stream verdict on a
    response (judged token by token) has ``response_tokens`` (how many) and ``flagged_at`` (the
    index of the token that triggered the debounce, or None); both then join ``to_dict()``.
    ``timings`` are milliseconds per stage and are not part of the ``--json`` contract.
    """

    label: str
    scores: Mapping[str, float]
    categories: tuple[str, ...]
    category_scores: Mapping[str, float]
    refusal: str | None
    flagged: bool
    policy: str
    engine: str
    model: str
    flagged_at: int | None = None
    response_tokens: int | None = None
    timings: Mapping[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_label(self.label)
        scores = _frozen_scores("scores", self.scores)
        if set(scores) != set(LABELS):
            raise ValueError(f"scores must have exactly the keys {LABELS}, got {sorted(scores)}")
        object.__setattr__(self, "scores", MappingProxyType({k: scores[k] for k in LABELS}))
        if isinstance(self.categories, str):
            raise TypeError("categories must be a sequence of names, not one string")
        object.__setattr__(self, "categories", tuple(str(c) for c in self.categories))
        object.__setattr__(
            self, "category_scores", _frozen_scores("category_scores", self.category_scores)
        )
        if self.refusal is not None and self.refusal not in REFUSALS:
            raise ValueError(f"refusal must be 'Yes', 'No' or None, got {self.refusal!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        object.__setattr__(self, "flagged", bool(self.flagged))
        object.__setattr__(self, "timings", _frozen_scores("timings", self.timings))

    def to_dict(self, *, timings: bool = False) -> dict[str, Any]:
        """The ``edgeguard check --json`` object; ``timings=True`` adds a "timings" key."""
        out: dict[str, Any] = {
            "label": self.label,
            "scores": dict(self.scores),
            "categories": list(self.categories),
            "category_scores": dict(self.category_scores),
            "refusal": self.refusal,
            "flagged": self.flagged,
            "policy": self.policy,
            "engine": self.engine,
            "model": self.model,
        }
        if self.response_tokens is not None:
            out["flagged_at"] = self.flagged_at
            out["response_tokens"] = self.response_tokens
        if timings:
            out["timings"] = dict(self.timings)
        return out


@dataclass(frozen=True, eq=True)
class TokenVerdict(_Frozen):
    """Stream's verdict on one response token: ``index`` counts response tokens from 0,
    ``token`` is the Qwen3 token id, ``text`` its decoded piece, ``scores`` the softmax of the
    response risk logits at that token, ``category`` the argmax of the category head
    (engines pass None where the label is Safe: the category means nothing there)."""

    index: int
    token: int
    text: str
    scores: Mapping[str, float]
    label: str
    category: str | None

    def __post_init__(self) -> None:
        _check_label(self.label)
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "token", int(self.token))
        object.__setattr__(self, "scores", _frozen_scores("scores", self.scores))

    def to_dict(self) -> dict[str, Any]:
        """One ``edgeguard stream --json`` line."""
        return {
            "index": self.index,
            "token": self.token,
            "text": self.text,
            "scores": dict(self.scores),
            "label": self.label,
            "category": self.category,
        }


@dataclass(frozen=True, eq=True)
class StreamState:
    """The debounced state of a streamed response (see ``edgeguard.engines.debounce``).

    ``flagged`` means the debounce has triggered (label Unsafe or Controversial); whether a
    Controversial trigger counts is the policy's call (``edgeguard.policy.decide``).
    ``flagged_at`` is the index of the token that completed the triggering pair.
    """

    flagged: bool
    label: str
    category: str | None
    flagged_at: int | None

    def __post_init__(self) -> None:
        _check_label(self.label)
        if self.flagged != (self.label != "Safe"):
            raise ValueError(f"flagged={self.flagged} contradicts label {self.label!r}")
        if self.flagged != (self.flagged_at is not None):
            raise ValueError("flagged_at must be set exactly when flagged")

    def to_dict(self) -> dict[str, Any]:
        """The label/category/flagged_at part of the ``edgeguard stream`` summary line."""
        return {"label": self.label, "category": self.category, "flagged_at": self.flagged_at}
