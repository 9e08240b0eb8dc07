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


def test_budget_picks_one_kv_type_for_the_guards_life(folder, sizes):
    """Under a budget the guard picks one KV type when it loads (the one that holds the largest
    context the budget allows; f16 only where the model's head size rules the q8_0 kinds out) and
    keeps it as the context grows, so a session's scores are those of an unbudgeted guard with
    that KV type (within the batch-invariance bound, 1e-5)."""
    weights_mb, values, max_ctx = sizes
    f16_mb = max_ctx * values * 2 / 2**20
    budget = int(weights_mb + DEFAULTS.runtime_mb + 0.47 * f16_mb) + 1
    manifest = Manifest.read(folder)
    rng = random.Random(4)
    got, kinds = [], set()
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=budget)) as g:
        kv, cap = g.kv_type, g.max_cached_tokens
        ids = [rng.randrange(300, g.vocab.n_vocab) for _ in range(int(0.8 * cap) - 64)]
        with g.session("a long conversation") as s:
            for i in range(0, len(ids), 256):
                got += [v.scores for v in s.feed(ids[i:i + 256])]
                kinds.add(g.kv_type)
    assert kinds == {kv}
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(kv_type=kv)) as ref, \
            ref.session("a long conversation") as s:
        expected = [v.scores for i in range(0, len(ids), 256) for v in s.feed(ids[i:i + 256])]
    diffs = [max(abs(a[k] - b[k]) for k in a) for a, b in zip(got, expected)]
    print(f"kv {kv}, cap {cap}: max diff {max(diffs):.1e}")
    assert len(got) == len(expected) and max(diffs) <= 1e-5


def test_budget_caps_the_context(folder, sizes):
    weights_mb, values, max_ctx = sizes
    f16_mb = max_ctx * values * 2 / 2**20
    manifest = Manifest.read(folder)
    # room for the whole context at q8_0 but not at f16
    budget = int(weights_mb + DEFAULTS.runtime_mb + 0.75 * f16_mb) + 1
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(max_memory_mb=budget)) as g:
        kv = g.kv_type  # chosen at load for the largest context the budget holds
        if g.max_cached_tokens == max_ctx:
            g.check("word " * int(0.9 * max_ctx))
        assert g.kv_type == kv
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
    output row per sequence, the padding one included); a guard whose caps allow that is a clear
    UsageError instead."""
    manifest = Manifest.read(folder)
    for options in (StreamOptions(n_ctx=8), StreamOptions(max_cached_tokens=8, max_memory_mb=100000),
                    StreamOptions(max_sessions=64, n_ctx=63), StreamOptions(n_ctx=16)):
        with pytest.raises(UsageError, match=f"needs more than {options.max_sessions}"):
            StreamGuard(folder, manifest, "f16", options=options)
    with StreamGuard(folder, manifest, "f16", options=StreamOptions(n_ctx=17)) as g:
        assert g.check("hi").label in ("Safe", "Unsafe", "Controversial")
