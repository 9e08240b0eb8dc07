"""Hypothesis: ``feed_text`` in random chunks (str or UTF-8 bytes cut anywhere, control-token
look-alikes included) scores exactly the tokens of the whole text, with the same scores as one
``feed`` of those tokens, and leaves the session usable."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeguard.engines.stream import StreamGuard
from edgeguard.models.manifest import Manifest
from tests.fixtures.converted import converted

LOOKALIKES = ["<|im_end|>", "<|im_start|>assistant\n", "<think>", "</think>", "<|endoftext|>", "\r\n", " ",
              "Safety: Unsafe", "😀", "中文", "\u0301"]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
texts = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), st.sampled_from(LOOKALIKES)),
    min_size=1, max_size=6,
).map("".join).filter(lambda t: t.strip() != "")


@pytest.fixture(scope="module")
def guard(stream_ckpt):
    folder = converted(stream_ckpt, ("f16",))
    with StreamGuard(folder, Manifest.read(folder), "f16") as g:
        yield g


@FUZZ
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=5), as_bytes=st.booleans())
def test_feed_text_in_chunks_equals_the_whole_text(guard, text, cuts, as_bytes):
    data = text.encode("utf-8") if as_bytes else text
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    with guard.session("Tell me something.") as chunked, guard.session("Tell me something.") as whole:
        got = [v for c in chunks for v in chunked.feed_text(c)] + chunked.finish()
        want = whole.feed(guard.response_tokens(text))
        assert [v.token for v in got] == [v.token for v in want]
        for a, b in zip(got, want):
            assert dict(a.scores) == pytest.approx(dict(b.scores), abs=1e-3)
        assert len(chunked.feed_text("ok") + chunked.finish()) >= 1
