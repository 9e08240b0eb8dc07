"""Small numeric helpers shared by the engines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeguard.errors import ModelError


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64. Non-finite logits (NaN or inf: damaged weights or
    hyperparameters) are a ModelError, never scores whose argmax would read "Safe"."""
    z = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(z).all():
        raise ModelError("the model produced non-finite scores (NaN or inf): its files are damaged "
                         "or were converted from a checkpoint with invalid values")
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (how much of a KV cache is reusable)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
