"""Policies: pure functions from a verdict's label and categories to flagged or not.

A policy has a base (does Controversial count?) and optional per-category rules:

- ``"flag"``: a verdict whose predicted categories include it is flagged, even a
  Controversial one under a policy that lets Controversial pass;
- ``"allow"``: the category alone never flags, even on an Unsafe verdict;
- a number t in [0, 1]: flag when that category's score is >= t; a predicted category whose
  score stays under t is allowed.

``decide`` never flags a Safe label: the category is meaningless there (Stream has no "None"
class, so it always names one). For a non-Safe label, in this order:
1. a predicted category with rule "flag", or any category with a threshold it reaches -> flagged;
2. every predicted category has a rule (allow, or a threshold not reached) -> not flagged;
3. otherwise the base: Unsafe is flagged, Controversial is flagged iff ``flag_controversial``.

"Predicted categories" are the names given, when ``decide`` gets a list of names (each then
scores 1.0), or the top-scoring name(s) when it gets a mapping of category scores, where a top
"None" (Gen's no-category answer) means no category.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from edgeguard.errors import UsageError
from edgeguard.tomlfile import read_toml
from edgeguard.verdict import LABELS

# The real Qwen3Guard names: the eight response categories, plus Jailbreak for prompts.
KNOWN_CATEGORIES = (
    "Violent",
    "Sexual Content or Sexual Acts",
    "Suicide & Self-Harm",
    "Politically Sensitive Topics",
    "PII",
    "Copyright Violation",
    "Non-violent Illegal Acts",
    "Unethical Acts",
    "Jailbreak",
)
NO_CATEGORY = "None"

Rule = str | float


def _check_rule(value: object) -> Rule:
    """A valid rule, or ValueError saying what is accepted."""
    if value in ("allow", "flag"):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f'expected "allow", "flag" or a score threshold in [0, 1], got {value!r}')


@dataclass(frozen=True)
class Policy:
    name: str
    flag_controversial: bool
    categories: Mapping[str, Rule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rules = {}
        for category, rule in self.categories.items():
            try:
                rules[category] = _check_rule(rule)
            except ValueError as error:
                raise ValueError(f"policy {self.name!r}, category {category!r}: {error}") from None
        object.__setattr__(self, "categories", MappingProxyType(rules))
        object.__setattr__(self, "flag_controversial", bool(self.flag_controversial))

    def __reduce__(self):
        return (Policy, (self.name, self.flag_controversial, dict(self.categories)))


STRICT = Policy("strict", flag_controversial=True)
LOOSE = Policy("loose", flag_controversial=False)
BUILTIN = {p.name: p for p in (STRICT, LOOSE)}


def _evidence(categories: Mapping[str, float] | Sequence[str]) -> tuple[dict[str, float], set[str]]:
    if isinstance(categories, str):
        raise TypeError("categories must be a mapping of scores or a sequence of names")
    if isinstance(categories, Mapping):
        scores = {name: float(score) for name, score in categories.items()}
        if not scores:
            return scores, set()
        top = max(scores.values())
        predicted = {name for name, score in scores.items() if score == top}
        return scores, predicted - {NO_CATEGORY}
    predicted = set(categories) - {NO_CATEGORY}
    return {name: 1.0 for name in predicted}, predicted


def decide(
    policy: Policy, label: str, categories: Mapping[str, float] | Sequence[str] = ()
) -> bool:
    """Whether a verdict with this label and categories (names or scores) is flagged."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if label == "Safe":
        return False
    scores, predicted = _evidence(categories)
    rules = policy.categories
    if any(rules.get(name) == "flag" for name in predicted):
        return True
    for name, rule in rules.items():
        if isinstance(rule, float) and scores.get(name, 0.0) >= rule:
            return True
    if predicted and all(name in rules for name in predicted):
        return False
    return label == "Unsafe" or policy.flag_controversial


def can_flag(policy: Policy, label: str, categories: Collection[str]) -> bool:
    """Whether a verdict with this label and one of these categories (with none, if there are
    none) is flagged: for Stream, whose non-Safe tokens always name one category."""
    probes: list[tuple[str, ...]] = [(c,) for c in categories] or [()]
    return any(decide(policy, label, names) for names in probes)


def validate_categories(policy: Policy, known: Collection[str], *, source: str = "") -> None:
    """UsageError if a rule names a category the model does not have."""
    unknown = [name for name in policy.categories if name not in known]
    if unknown:
        where = f"{source}: " if source else f"policy {policy.name!r}: "
        raise UsageError(
            f"{where}[categories] {unknown[0]!r} is not a category of this model "
            f"(known: {', '.join(known)})"
        )


def load_policy(
    name_or_path: str | os.PathLike[str] | Policy,
    *,
    known_categories: Collection[str] = KNOWN_CATEGORIES,
) -> Policy:
    """A built-in policy ("strict", "loose") or one read from a TOML file:

    ```toml
    [policy]
    base = "strict"              # or "loose"; default "strict"
    name = "my-policy"           # optional; default: the file's stem
    flag_controversial = false   # optional; overrides the base
    [categories]
    "Violent" = "flag"
    "Politically Sensitive Topics" = "allow"
    "PII" = 0.7
    ```
    """
    if isinstance(name_or_path, Policy):
        validate_categories(name_or_path, known_categories)
        return name_or_path
    text = os.fspath(name_or_path)
    if text.lower() in BUILTIN:
        return BUILTIN[text.lower()]
    path = Path(text)
    if not path.is_file():
        raise UsageError(
            f"unknown policy {text!r}: use {', '.join(BUILTIN)} or the path of a TOML file"
        )
    policy = _parse_policy_file(path)
    validate_categories(policy, known_categories, source=str(path))
    return policy


def _parse_policy_file(path: Path) -> Policy:
    data = read_toml(path, "policy file")
    for key in data:
        if key not in ("policy", "categories"):
            raise UsageError(f"{path}: unknown key {key!r} (expected [policy] and [categories])")
    header = _table(path, data, "policy")
    categories = _table(path, data, "categories")
    for key in header:
        if key not in ("base", "name", "flag_controversial"):
            raise UsageError(f"{path}: unknown key policy.{key}")
    base_name = header.get("base", STRICT.name)
    if base_name not in BUILTIN:
        raise UsageError(
            f"{path}: policy.base must be one of {', '.join(BUILTIN)}, got {base_name!r}"
        )
    base = BUILTIN[base_name]
    name = header.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{path}: policy.name must be a non-empty string")
    flag_controversial = header.get("flag_controversial", base.flag_controversial)
    if not isinstance(flag_controversial, bool):
        raise UsageError(f"{path}: policy.flag_controversial must be true or false")
    rules = dict(base.categories)
    for category, value in categories.items():
        try:
            rules[category] = _check_rule(value)
        except ValueError as error:
            raise UsageError(f"{path}: categories.{category!r}: {error}") from None
    return Policy(name, flag_controversial, rules)


def _table(path: Path, data: dict, key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{path}: {key} must be a table ([{key}])")
    return value
