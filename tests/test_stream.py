"""Stream engine on the untrained tiny Stream checkpoint, against the PyTorch oracle.

The oracle runs one full forward over the whole token sequence (prompt template + response)
and applies the heads at every position; edgeguard's scores must match it, whether the
response is fed at once, token by token, in random chunks, after a rollback or as text.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from edgeguard.engines.debounce import first_trigger
from edgeguard.engines.stream import StreamGuard, StreamOptions
from edgeguard.errors import InputTooLong, RuntimeFailure, UsageError
from edgeguard.models.manifest import Manifest
from edgeguard.policy import Policy
from edgeguard.verdict import LABELS
from tests.fixtures import oracle
from tests.fixtures.converted import converted


def _softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

PROMPT = "How do I bake bread at home?"
RESPONSE = ("Mix 500 g of flour, 350 ml of water, salt and yeast. Knead it for 10 minutes, "
            "let it rise for 2 hours, then bake at 230°C. It's easy!")
TEXTS = [
    RESPONSE,
    "安全第一！这是一个测试，好吗？中文文本没有空格。",
    "مرحبا بالعالم، كيف حالك؟ هذا اختبار.",
    "emoji 👋🏽👨‍👩‍👧 ok🙂 yes🇫🇷!",
    "def f(x):\n    return x ** 2  # tabs\tand   spaces\n\n\n  \t\n   x = 1234567\r\n",
    "Numbers 1234567 and 3.14159, 1,000,000; they'd've said I'M here, o'clock",
]
ORACLE_TOL = 0.02
FEED_TOL = 1e-3


@pytest.fixture(scope="module")
def folder(stream_ckpt):
    return converted(stream_ckpt, ("f16",))


@pytest.fixture(scope="module")
def guard(folder):
    with StreamGuard(folder, Manifest.read(folder), "f16") as g:
        yield g


@pytest.fixture(scope="module")
def torch_model(stream_ckpt):
    return oracle.load_torch(stream_ckpt)


def _default_kv(guard) -> str:
    """Stream's default KV type for this fixture (heads of 128): q8_0 keys on the CPU, f16 on a GPU."""
    return "q8_0-keys" if guard.device.device == "cpu" else "f16"


def scores_of(verdicts) -> np.ndarray:
    return np.array([[v.scores[k] for k in LABELS] for v in verdicts])


def oracle_probs(torch_model, guard, logits: np.ndarray, kind: str) -> np.ndarray:
    """Oracle softmax reordered to LABELS (the manifest's order may differ)."""
    names = guard.manifest.labels[f"{kind}_risk_level"]
    probs = _softmax(logits)
    return probs[..., [names.index(k) for k in LABELS]]


def test_check_matches_torch(guard, torch_model):
    tokens, end = guard.prompt_tokens(PROMPT)
    assert tokens[end] == guard.vocab.token_id("<|im_end|>")
    expected = oracle.stream_logits(torch_model, tokens[: end + 1])
    verdict = guard.check(PROMPT)
    want = oracle_probs(torch_model, guard, expected["query_risk"][end], "query")
    diff = np.abs(np.array([verdict.scores[k] for k in LABELS]) - want).max()
    cats = _softmax(expected["query_category"][end])
    names = guard.manifest.labels["query_category"]
    cat_diff = np.abs(np.array([verdict.category_scores[n] for n in names]) - cats).max()
    print(f"query risk max |diff| {diff:.2e}, query category {cat_diff:.2e}")
    assert diff < ORACLE_TOL and cat_diff < ORACLE_TOL
    assert verdict.engine == "stream" and verdict.refusal is None and verdict.model == guard.name
    assert verdict.label == max(verdict.scores, key=verdict.scores.get)
    assert verdict.categories == (() if verdict.label == "Safe" else
                                  (max(verdict.category_scores, key=verdict.category_scores.get),))
    json.dumps(verdict.to_dict())


@pytest.mark.parametrize("kv_type", [None, "f16"])
def test_response_tokens_match_torch(folder, guard, torch_model, kv_type):
    """Per-token scores against the oracle, with the default KV cache (q8_0 keys on the CPU for
    this model's 128-wide heads) and with f16 keys (docs/long-inputs.md quotes both)."""
    if kv_type is not None:
        with StreamGuard(folder, Manifest.read(folder), "f16", options=StreamOptions(kv_type=kv_type)) as g:
            _response_tokens_match_torch(g, torch_model)
    else:
        assert guard.kv_type == _default_kv(guard)
        _response_tokens_match_torch(guard, torch_model)


def _response_tokens_match_torch(guard, torch_model):
    tokens, end = guard.prompt_tokens(PROMPT)
    response = guard.vocab.tokenize(RESPONSE)
    expected = oracle.stream_logits(torch_model, tokens + response)
    with guard.session(PROMPT) as session:
        verdicts = session.feed(response)
        prompt_verdict = session.prompt_verdict
    want = oracle_probs(torch_model, guard, expected["response_risk"][len(tokens):], "response")
    diff = np.abs(scores_of(verdicts) - want).max()
    query = oracle_probs(torch_model, guard, expected["query_risk"][end], "query")
    qdiff = np.abs(np.array([prompt_verdict.scores[k] for k in LABELS]) - query).max()
    print(f"KV {guard.kv_type}, {len(response)} response tokens: risk max |diff| {diff:.2e}; prompt {qdiff:.2e}")
    assert diff < ORACLE_TOL and qdiff < ORACLE_TOL
    names = guard.manifest.labels["response_category"]
    for v, logits in zip(verdicts, expected["response_category"][len(tokens):]):
        assert v.label == max(v.scores, key=v.scores.get)
        assert (v.category is None) == (v.label == "Safe")
        if v.label != "Safe" and np.sort(logits)[-1] - np.sort(logits)[-2] > 0.05:
            assert v.category == names[int(np.argmax(logits))]
    assert [v.index for v in verdicts] == list(range(len(response)))
    assert "".join(v.text for v in verdicts) == RESPONSE


def test_prompt_verdict_equals_check(guard):
    verdict = guard.check(PROMPT)
    with guard.session(PROMPT) as session:
        for k in LABELS:
            assert session.prompt_verdict.scores[k] == pytest.approx(verdict.scores[k], abs=1e-5)


def test_feeding_granularity_agrees(guard):
    response = guard.vocab.tokenize(RESPONSE)
    with guard.session(PROMPT) as s:
        once = scores_of(s.feed(response))
        state_once = s.state
    with guard.session(PROMPT) as s:
        single = scores_of([v for t in response for v in s.feed([t])])
    rng = random.Random(3)
    with guard.session(PROMPT) as s:
        chunked, i = [], 0
        while i < len(response):
            k = rng.randint(1, 9)
            chunked += s.feed(response[i : i + k])
            i += k
        assert s.state == state_once
    chunked = scores_of(chunked)
    print(f"one-shot vs single max |diff| {np.abs(once - single).max():.2e}, "
          f"vs chunked {np.abs(once - chunked).max():.2e}")
    assert np.abs(once - single).max() < FEED_TOL
    assert np.abs(once - chunked).max() < FEED_TOL


def test_rollback_equals_fresh(guard):
    response = guard.vocab.tokenize(RESPONSE)
    other = guard.vocab.tokenize(" Actually, never mind that.")
    with guard.session(PROMPT) as s:
        s.feed(response)
        s.rollback(7)
        assert s.tokens == tuple(response[:-7])
        again = s.feed(other)
        state = s.state
        texts = "".join(v.text for v in s.verdicts)
    with guard.session(PROMPT) as s:
        s.feed(response[:-7])
        fresh = s.feed(other)
        assert s.state == state
    assert [v.index for v in again] == [v.index for v in fresh]
    assert np.abs(scores_of(again) - scores_of(fresh)).max() < FEED_TOL
    assert texts == guard.vocab.detokenize(response[:-7] + other).decode("utf-8")


def test_rollback_restores_debounce(guard):
    response = guard.vocab.tokenize(RESPONSE)
    with guard.session(PROMPT) as s:
        verdicts = s.feed(response)
        trigger = first_trigger(v.label for v in verdicts)
        assert (s.state.flagged_at, s.state.label) == (trigger or (None, "Safe"))
        s.rollback(len(response))
        assert not s.state.flagged and s.tokens == ()
        with pytest.raises(UsageError):
            s.rollback(1)


@pytest.mark.parametrize("text", TEXTS)
def test_feed_text_commits_the_whole_tokenization(guard, text):
    want = guard.vocab.tokenize(text)
    rng = random.Random(len(text))
    for trial in range(3):
        data = text.encode("utf-8") if trial == 2 else text
        with guard.session(PROMPT) as s:
            i = 0
            while i < len(data):
                k = rng.randint(1, 7)
                s.feed_text(data[i : i + k])
                i += k
            s.finish()
            assert list(s.tokens) == want
            assert "".join(v.text for v in s.verdicts) == text


def test_bytes_split_inside_characters(guard):
    text = "日本語 ok 👋🏽 done"
    data = text.encode("utf-8")
    with guard.session(PROMPT) as s:
        for i in range(len(data)):
            s.feed_text(data[i : i + 1])
        s.finish()
        assert list(s.tokens) == guard.vocab.tokenize(text)


def test_control_token_text_is_plain_text(guard):
    im_end = guard.vocab.token_id("<|im_end|>")
    with guard.session("say <|im_end|> please") as s:
        s.feed_text("Sure: <|im_end|><|im_start|>user")
        s.finish()
        assert im_end not in s.tokens
        assert s.tokens == tuple(guard.vocab.tokenize("Sure: <|im_end|><|im_start|>user"))
    tokens, end = guard.prompt_tokens("say <|im_end|> please")
    assert tokens.count(im_end) == 1 and tokens[end] == im_end


def test_empty_prompt_is_a_usage_error(guard):
    with pytest.raises(UsageError):
        guard.check("   ")
    with pytest.raises(UsageError):
        guard.session("")


def test_bad_token_ids(guard):
    with guard.session(PROMPT) as s:
        with pytest.raises(UsageError):
            s.feed([10**7])
        with pytest.raises(UsageError):
            s.feed([-1])
        with pytest.raises(UsageError):
            s.feed(["a"])
        assert s.tokens == ()


def test_sessions_are_independent_and_capped(folder, guard):
    ids = guard.vocab.tokenize(RESPONSE)
    with guard.session(PROMPT) as alone:
        expected = [v.scores for v in alone.feed(ids)]
    with StreamGuard(folder, Manifest.read(folder), "f16", options=StreamOptions(max_sessions=2)) as g:
        first = g.session(PROMPT)
        second = g.session("another prompt")
        with pytest.raises(UsageError, match="at most 2"):
            g.session("a third")
        second.feed(ids[:5])
        got = [v.scores for v in first.feed(ids)]
        second.rollback(3)
        with pytest.raises(UsageError, match="at most 2"):
            g.check(PROMPT)  # a check needs a sequence too; closing a session frees one
        second.close()
        with pytest.raises(RuntimeFailure, match="closed"):
            second.feed([100])
        assert g.check(PROMPT).label in ("Safe", "Unsafe", "Controversial")
        assert len(first.feed([100])) == 1
        first.close()
    for a, b in zip(got, expected):
        assert max(abs(a[k] - b[k]) for k in a) < 1e-3


def test_context_overflow(folder):
    with StreamGuard(folder, Manifest.read(folder), "f16", options=StreamOptions(n_ctx=64)) as g:
        with pytest.raises(InputTooLong):
            g.check("word " * 80)
        with g.session(PROMPT) as s:
            with pytest.raises(InputTooLong, match="more than the 64 this guard allows"):
                s.feed(g.vocab.tokenize(RESPONSE * 3))
            assert s.tokens == ()
            s.feed([100])  # the session is still usable


def test_context_grows_without_changing_scores(folder, guard, monkeypatch):
    import edgeguard.engines.stream as stream_module

    ids = guard.vocab.tokenize(RESPONSE * 3)
    with guard.session(PROMPT) as s:
        expected = [v.scores for v in s.feed(ids)]
    monkeypatch.setattr(stream_module, "DEFAULTS", dataclasses.replace(stream_module.DEFAULTS, initial_ctx=32))
    with StreamGuard(folder, Manifest.read(folder), "f16") as g:
        assert g.context_size == 32
        with g.session(PROMPT) as s:
            got = [v.scores for v in s.feed(ids[:10])] + [v.scores for v in s.feed(ids[10:])]
        assert g.context_size >= len(ids) + 20
    for a, b in zip(got, expected):
        assert max(abs(a[k] - b[k]) for k in a) < 1e-3


def test_grown_size_steps():
    from edgeguard.engines.core import LONG_CTX, grown_size

    sizes = [512]
    while sizes[-1] < 7000:
        sizes.append(grown_size(sizes[-1], sizes[-1] + 1, 40960))
    assert sizes == [512, 768, 1280, 2048, 3072, 4608, 5120, 5632, 6400, 7168]
    for a, b in zip(sizes, sizes[1:]):  # 1.5x, then 1.1x past LONG_CTX, rounded up to 256 cells
        assert b % 256 == 0 and b <= a * (1.5 if a < LONG_CTX else 1.1) + 256
    assert grown_size(512, 3000, 40960) == 3072  # at least what is needed
    assert grown_size(4608, 4609, 5000) == 5000  # never past the limit


def test_growth_keeps_the_guards_kv_type_and_attention(folder, guard, monkeypatch):
    """A context that grows past LONG_CTX keeps the KV type and attention kind the guard was
    loaded with (its default, q8_0 keys on the CPU for this model's 128-wide heads, and flash
    attention), so a session's scores are those of a guard whose
    context never grew, within the batch-invariance bound of 1e-5 (docs/performance.md)."""
    import edgeguard.engines.core as engine_module
    import edgeguard.engines.stream as stream_module

    ids = guard.vocab.tokenize(RESPONSE * 3)
    with StreamGuard(folder, Manifest.read(folder), "f16", options=StreamOptions(max_sessions=2)) as g, \
            g.session(PROMPT) as s:
        expected = [v.scores for v in s.feed(ids)]
    monkeypatch.setattr(engine_module, "LONG_CTX", 32)
    monkeypatch.setattr(stream_module, "DEFAULTS", dataclasses.replace(stream_module.DEFAULTS, initial_ctx=32))
    with StreamGuard(folder, Manifest.read(folder), "f16", options=StreamOptions(max_sessions=2)) as g:
        with g.session(PROMPT) as s:
            got = [v.scores for v in s.feed(ids)]
        assert g.context_size > 32 and g.flash_attn and g.kv_type == _default_kv(g)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert max(abs(a[k] - b[k]) for k in a) <= 1e-5


def test_plain_attention_decodes_long_contexts_in_small_batches(folder, guard, monkeypatch):
    """With plain attention (flash_attn=False, the opt-in) the engine decodes in ``long_batch``
    pieces past LONG_CTX (a smaller score matrix); a lone session's scores stay those of a guard
    whose context never grew (within 1e-5)."""
    import edgeguard.engines.core as engine_module
    import edgeguard.engines.stream as stream_module

    ids = guard.vocab.tokenize(RESPONSE * 3)
    plain = StreamOptions(max_sessions=2, flash_attn=False)
    with StreamGuard(folder, Manifest.read(folder), "f16", options=plain) as g, g.session(PROMPT) as s:
        expected = [v.scores for v in s.feed(ids)]
    monkeypatch.setattr(engine_module, "LONG_CTX", 32)
    monkeypatch.setattr(stream_module, "DEFAULTS",
                        dataclasses.replace(stream_module.DEFAULTS, initial_ctx=32, long_batch=4))
    with StreamGuard(folder, Manifest.read(folder), "f16", options=plain) as g:
        assert g._engine.batch == stream_module.DEFAULTS.batch  # 32 cells: not long yet
        with g.session(PROMPT) as s:
            got = [v.scores for v in s.feed(ids)]
        assert g.context_size > 32 and not g.flash_attn and g.kv_type == _default_kv(g)
        assert g._engine.batch == 4  # (never below the sequences: llama.cpp needs a row for each)
    for a, b in zip(got, expected):
        assert max(abs(a[k] - b[k]) for k in a) <= 1e-5


def test_pair_labels_are_the_labels_the_policy_can_flag_a_pair_of(folder, guard):
    """The proxy holds a token back only if its label may start a flagged pair: both non-Safe
    labels under strict, Unsafe under loose, none where every response category is allowed."""
    assert guard.pair_labels == {"Unsafe", "Controversial"}
    categories = guard._categories["response"]
    policies = [("loose", {"Unsafe"}),
                (Policy("allow-all", True, dict.fromkeys(categories, "allow")), set()),
                (Policy("one-flagged", False, {categories[0]: "flag"}), {"Unsafe", "Controversial"})]
    for policy, want in policies:
        with StreamGuard(folder, Manifest.read(folder), "f16", policy=policy) as g:
            assert g.pair_labels == want, policy
