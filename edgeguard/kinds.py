"""The closed sets of names edgeguard's API takes, as types a checker can hold callers to."""

from __future__ import annotations

from typing import Literal, get_args

Engine = Literal["gen", "stream"]
"""Qwen3Guard-Gen (whole-text verdicts) or Qwen3Guard-Stream (per-token verdicts)."""
KVType = Literal["f16", "q8_0-keys", "q8_0"]
"""KV-cache element types: f16, q8_0 keys with f16 values, or q8_0 for both."""
Device = Literal["auto", "cpu", "gpu"]
Label = Literal["Safe", "Unsafe", "Controversial"]

ENGINES: tuple[Engine, ...] = get_args(Engine)
KV_TYPES: tuple[KVType, ...] = get_args(KVType)
LABELS: tuple[Label, ...] = get_args(Label)
