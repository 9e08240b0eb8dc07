"""Retokenizer: committed ids equal the tokenization of the whole text, however it is chunked.

Checked against the real Qwen vocabulary (llama.cpp, special-token parsing off) on fixed texts
in several scripts and on random strings built from the characters the commit rule is about.
"""

from __future__ import annotations

import random

import pytest

from edgeguard.engines.retokenize import Retokenizer, hard_pair
from edgeguard.engines.stream import atomic_texts
from edgeguard.errors import UsageError
from edgeguard.models.manifest import Manifest
from edgeguard.runtime.backend import Vocab
from tests.fixtures.converted import converted

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's what they'd've done, isn't it? I'M SURE.",
    "安全第一！这是一个测试，好吗？中文文本没有空格。",
    "مرحبا بالعالم، كيف حالك؟ هذا اختبار.",
    "emoji 👋🏽👨‍👩‍👧 ok🙂 yes🇫🇷!",
    "def f(x):\n    return x ** 2  # tabs\tand   spaces\n\n\n  \t\n   x = 1234567 + 0.5e-3\r\n",
    "Numbers 1234567 and 3.14159, 1,000,000; a1b2c3   99 bottles, ２０ ½ ²",
    "a<think>b</think>\n\n<|im_end|> <tool_call>{\"x\": 1}</tool_call><thin k> <think",
    "e\u0301 cafe\u0301 naïve Ünïcödé Straße 한국어 텍스트 가\u1161",
    "  leading and trailing   ",
    "\n\n\nx\n",
    "   1  2   3",
    "''s 's 'S 'LL x'll o'clock",
]
# Characters and strings around which the commit rule has to be careful.
POOL = list("aZé'sSltdmrevL1 9\n\r\t.,!?-_<>/|\"0") + [
    "\u0301", "\u00a0", "安", "，", "👋", "\u200d", "\u3000", "ع", "\u064e", "²", "\x85", "\x0b",
    "<think>", "</think>", "<tool_call>", "'ll", "'re", "  ", "\n\n", "가", "\u1161", "<|im_end|>",
]


@pytest.fixture(scope="module")
def vocab(stream_ckpt):
    folder = converted(stream_ckpt, ("f16",))
    with Vocab(folder / Manifest.read(folder).file_for("vocab")) as v:
        yield v


@pytest.fixture(scope="module")
def atomic(vocab):
    return atomic_texts(vocab)


def retokenize(vocab, atomic, pieces) -> tuple[list[int], int]:
    r = Retokenizer(vocab.tokenize, atomic=atomic)
    ids, longest = [], 0
    for piece in pieces:
        ids += r.push(piece)
        longest = max(longest, len(r.pending))
    return ids + r.finish(), longest


def random_cuts(rng: random.Random, data, most: int = 6):
    i, out = 0, []
    while i < len(data):
        k = rng.randint(1, most)
        out.append(data[i : i + k])
        i += k
    return out


def test_atomic_texts_are_the_user_defined_tokens(atomic):
    assert sorted(atomic) == sorted(["<think>", "</think>", "<tool_call>", "</tool_call>",
                                     "<tool_response>", "</tool_response>"])


def test_hard_pairs():
    assert hard_pair("a", " ") and hard_pair("a", ".") and hard_pair("a", "'") and hard_pair("a", "1")
    assert hard_pair("1", "2") and hard_pair("1", "a") and hard_pair("\n", "x") and hard_pair(".", "1")
    assert hard_pair("安", "，")
    assert not hard_pair("a", "b")  # one letter run
    assert not hard_pair(" ", "a")  # " a" is one pre-token
    assert not hard_pair(" ", "1")  # "a  1" splits "  " as " ", " " but "a  " keeps "  "
    assert not hard_pair("'", "s")
    assert not hard_pair("e", "\u0301")  # NFC may compose them
    assert not hard_pair("!", "?") and not hard_pair("\n", " ") and not hard_pair("a", "👋")


@pytest.mark.parametrize("text", TEXTS)
def test_chunked_text_commits_the_whole_tokenization(vocab, atomic, text):
    want = vocab.tokenize(text)
    rng = random.Random(len(text))
    for trial in range(60):
        data = text.encode("utf-8") if trial % 2 else text
        got, _ = retokenize(vocab, atomic, random_cuts(rng, data))
        assert got == want, (text, trial)


def test_random_strings(vocab, atomic):
    rng = random.Random(7)
    for trial in range(1500):
        text = "".join(rng.choice(POOL) for _ in range(rng.randint(1, 40)))
        data = text.encode("utf-8") if trial % 3 == 0 else text
        got, _ = retokenize(vocab, atomic, random_cuts(rng, data, most=5))
        assert got == vocab.tokenize(text), repr(text)


def test_one_character_at_a_time_keeps_pending_short(vocab, atomic):
    text = " ".join(TEXTS[:1] * 20)
    got, longest = retokenize(vocab, atomic, list(text))
    assert got == vocab.tokenize(text)
    assert longest <= 12


def test_commits_early(vocab, atomic):
    r = Retokenizer(vocab.tokenize, atomic=atomic)
    assert r.push("Hello wor") == vocab.tokenize("Hello")
    assert r.pending == " wor"
    assert r.push("ld") == []
    assert r.finish() == vocab.tokenize(" world")
    assert r.pending == "" and r.finish() == []


def test_bytes_split_inside_characters(vocab, atomic):
    text = "日本語のテキスト, ok 👋🏽 done"
    data = text.encode("utf-8")
    got, _ = retokenize(vocab, atomic, [data[i : i + 1] for i in range(len(data))])
    assert got == vocab.tokenize(text)


@pytest.mark.parametrize("chunks", [[b"ab\xff cd"], [b"ab", b"\xe6\x97", b"x"], [b"ok \xe6\x97"]])
def test_invalid_utf8_is_a_usage_error_like_the_cli(vocab, atomic, chunks):
    """The CLI rejects invalid UTF-8; feeding it in chunks must not silently replace it."""
    from edgeguard.engines.retokenize import Retokenizer
    from edgeguard.errors import UsageError

    retok = Retokenizer(vocab.tokenize, atomic=atomic)
    with pytest.raises(UsageError, match="UTF-8"):
        for chunk in chunks:
            retok.push(chunk)
        retok.finish()
    assert retok.pending == ""
    assert retok.push("fresh") + retok.finish() == vocab.tokenize("fresh")  # usable afterwards


def test_special_look_alikes_stay_text(vocab, atomic):
    text = "before <|im_end|> after <|endoftext|>"
    got, _ = retokenize(vocab, atomic, list(text))
    assert got == vocab.tokenize(text)
    assert vocab.token_id("<|im_end|>") not in got


def test_atomic_token_split_across_chunks(vocab, atomic):
    got, _ = retokenize(vocab, atomic, ["x <thin", "k>y"])
    assert got == vocab.tokenize("x <think>y")
    assert vocab.token_id("<think>") in got


def test_rejects_other_types(vocab):
    with pytest.raises(UsageError):
        Retokenizer(vocab.tokenize).push(42)
