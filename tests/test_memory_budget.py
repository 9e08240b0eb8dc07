"""max_memory_mb on a real engine: the KV type and token cap follow the budget, and a
conversation beyond it is a clear InputTooLong, never a truncation."""

from __future__ import annotations

import random

import pytest

from edgeguard.engines.stream import DEFAULTS, StreamGuard, StreamOptions
from edgeguard.errors import InputTooLong, UsageError
from edgeguard.models.manifest import Manifest
from edgeguard.runtime.backend import Backend
from tests.fixtures.converted import converted


@pytest.fixture(scope="module")
def folder(stream_ckpt):
    return converted(stream_ckpt, ("f16",))


@pytest.fixture(scope="module")
def sizes(folder):
    manifest = Manifest.read(folder)
    with Backend(folder / manifest.file_for("model", "f16"), n_ctx=64, mode="embeddings") as b:
        return b.weights_mb, b.kv_values_per_token, manifest.context_length


def test_budget_grows_through_faster_kv_types_first(folder, sizes):
    """Under a budget a session's context grows f16, then q8_0 keys, then q8_0 (with flash
    attention), each the fastest that fits; its scores stay those of an unbudgeted f16 guard
    (exactly while f16, then within what quantized caches cost here: 5e-3, measured 5e-4)."""
    weights_mb, values, max_ctx = sizes
    f16_mb = max_ctx * values * 2 / 2**20
    # f16 ~0.47, q8_0 keys ~0.61, q8_0 ~0.89 of max_ctx
    budget = int(weights_mb + DEFAULTS.runtime_mb + 0.47 * f16_mb) + 1
    manifest = Manifest.read(folder)
    rng = random.Random(4)
    with StreamGuard(folder, manifest, "f16") as ref:
        ids = [rng.randrange(300, ref.vocab.n_vocab) for _ in range(int(0.8 * max_ctx))]
        with ref.session("a long conversation") as s:
            expected = [v.scores for i in range(0, len(ids), 256) for v in s.feed(ids[i:i + 256])]
    kinds, got = [], []
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=budget)) as g, \
            g.session("a long conversation") as s:
        for i in range(0, len(ids), 256):
            got += [v.scores for v in s.feed(ids[i:i + 256])]
            if not kinds or kinds[-1][0] != g.kv_type:
                kinds.append((g.kv_type, i + 256))
    assert [k for k, _ in kinds] == ["f16", "q8_0-keys", "q8_0"], kinds
    first_switch = kinds[1][1] - 256
    diffs = [max(abs(a[k] - b[k]) for k in a) for a, b in zip(got, expected)]
    print(f"kinds {kinds}; max diff f16 part {max(diffs[:first_switch]):.1e}, after {max(diffs):.1e}")
    assert max(diffs[:first_switch]) < 1e-3 and max(diffs) < 5e-3


def test_budget_caps_the_context(folder, sizes):
    weights_mb, values, max_ctx = sizes
    f16_mb = max_ctx * values * 2 / 2**20
    manifest = Manifest.read(folder)
    # room for the whole context at q8_0 but not at f16
    budget = int(weights_mb + DEFAULTS.runtime_mb + 0.75 * f16_mb) + 1
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=budget)) as g:
        assert g.kv_type == "f16" and g.max_cached_tokens == max_ctx  # a short context fits at f16
        g.check("word " * int(0.9 * max_ctx))  # a long one does not (quantized: see the test above)
        assert g.kv_type in ("q8_0-keys", "q8_0")
    # room for about 1,500 tokens at q8_0 (MB granularity): a longer prompt is refused, naming the budget
    budget = int(weights_mb + DEFAULTS.runtime_mb + 1500 * values * (34 / 32) / 2**20)
    expected = int((budget - weights_mb - DEFAULTS.runtime_mb) * 2**20 / (values * 34 / 32))
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=budget)) as g:
        assert g.max_cached_tokens == expected < max_ctx
        with pytest.raises(InputTooLong, match="max_memory_mb"):
            g.check("word " * (expected + 200))
        assert g.check("short").label in ("Safe", "Unsafe", "Controversial")
    with pytest.raises(UsageError, match="raise max_memory_mb"):
        StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=int(weights_mb) + 10))


def test_caps_below_one_cell_per_session_are_refused(folder):
    """llama.cpp aborts the process on a context with fewer cells than sequences (it reserves an
    output row per sequence); a guard whose caps allow that is a clear UsageError instead."""
    manifest = Manifest.read(folder)
    for options in (StreamOptions(n_ctx=8), StreamOptions(max_cached_tokens=8, max_memory_mb=100000),
                    StreamOptions(max_sessions=64, n_ctx=63)):
        with pytest.raises(UsageError, match=f"needs at least {options.max_sessions}"):
            StreamGuard(folder, manifest, "f16", options=options)
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(n_ctx=16)) as g:
        assert g.check("hi").label in ("Safe", "Unsafe", "Controversial")
