"""max_memory_mb on a real engine: the KV type and token cap follow the budget, and a
conversation beyond it is a clear InputTooLong, never a truncation."""

from __future__ import annotations

import pytest

from edgeguard.backend import Backend
from edgeguard.errors import InputTooLong, UsageError
from edgeguard.kernels import RUNTIME_MB
from edgeguard.manifest import Manifest
from edgeguard.stream import StreamGuard, StreamOptions
from tests.fixtures.converted import converted


@pytest.fixture(scope="module")
def folder(stream_ckpt):
    return converted(stream_ckpt, ("f16",))


@pytest.fixture(scope="module")
def sizes(folder):
    manifest = Manifest.read(folder)
    with Backend(folder / manifest.file_for("model", "f16"), n_ctx=64, mode="embeddings") as b:
        return b.weights_mb, b.kv_values_per_token, manifest.context_length


def test_budget_switches_to_q8_0_then_caps(folder, sizes):
    weights_mb, values, max_ctx = sizes
    f16_mb = max_ctx * values * 2 / 2**20
    manifest = Manifest.read(folder)
    # room for the whole context at q8_0 but not at f16
    budget = int(weights_mb + RUNTIME_MB + 0.75 * f16_mb) + 1
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=budget)) as g:
        assert g.kv_type == "q8_0" and g.max_cached_tokens == max_ctx
    # room for about 1,500 tokens at q8_0 (MB granularity): a longer prompt is refused, naming the budget
    budget = int(weights_mb + RUNTIME_MB + 1500 * values * (34 / 32) / 2**20)
    expected = int((budget - weights_mb - RUNTIME_MB) * 2**20 / (values * 34 / 32))
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=budget)) as g:
        assert g.kv_type == "q8_0" and g.max_cached_tokens == expected < max_ctx
        with pytest.raises(InputTooLong, match="max_memory_mb"):
            g.check("word " * (expected + 200))
        assert g.check("short").label in ("Safe", "Unsafe", "Controversial")
    with pytest.raises(UsageError, match="raise max_memory_mb"):
        StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=int(weights_mb) + 10))
