"""edgeguard.engines.scoring.softmax against a float64 reference, and its refusal of non-finite logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeguard.engines.scoring import softmax
from edgeguard.errors import ModelError


def test_softmax_matches_the_definition():
    logits = np.array([[2.0, -1.0, 0.5], [1000.0, 999.0, -1000.0]], dtype=np.float32)
    got = softmax(logits)
    for row, probs in zip(logits.astype(np.float64), got):
        expected = [math.exp(x - max(row)) / sum(math.exp(y - max(row)) for y in row) for x in row]
        assert np.allclose(probs, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_are_a_model_error_not_a_verdict(bad):
    """Damaged weights gave all-NaN scores, whose argmax read "Safe" (fuzzing)."""
    with pytest.raises(ModelError, match="non-finite"):
        softmax(np.array([0.1, bad, 0.3]))
