"""Real verdicts end to end: tiny Qwen3Guard models trained by the tests (tests/fixtures/
trained.py), converted by edgeguard, run by llama.cpp (+ onnxruntime), through the CLI and API."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from edgeguard.loader import load
from tests.fixtures.converted import converted
from tests.fixtures.trained import (
    GEN_EXAMPLES,
    STREAM_EXAMPLES,
    STREAM_PROMPT_CATEGORY,
    trained_gen_checkpoint,
    trained_stream_checkpoint,
)


@pytest.fixture(scope="module")
def gen_model():
    return str(converted(trained_gen_checkpoint(), ("f16",)))


@pytest.fixture(scope="module")
def stream_model():
    return str(converted(trained_stream_checkpoint(), ("f16",)))


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


def _args(messages):
    args = ["check", messages[0]["content"]]
    if len(messages) > 1:
        args += ["--response", messages[1]["content"]]
    return args


def test_gen_cli_gives_the_trained_verdicts(gen_model):
    """Through `edgeguard check --json` (llama.cpp): the same verdict as the PyTorch model's
    read-outs on held-out and training conversations, and the expected one on the training
    conversations it was taught."""
    from transformers import AutoTokenizer

    from tests.fixtures.oracle import load_torch
    from tests.fixtures.trained import gen_train_sample
    from tests.test_trained import GEN_MIN_TRAIN_ACCURACY, oracle_verdict

    ckpt = trained_gen_checkpoint()
    tok, model = AutoTokenizer.from_pretrained(str(ckpt)), load_torch(ckpt)
    train = gen_train_sample(tok, 12)
    right = 0
    for messages, label, category, refusal in GEN_EXAMPLES + train:
        result = CliRunner().invoke(main, [*_args(messages), "--model", gen_model, "--json"])
        verdict = json.loads(result.stdout)
        got = (verdict["label"], (verdict["categories"] or ["None"])[0], verdict["refusal"])
        assert got == oracle_verdict(model, tok, messages)[1], (messages, verdict)
        assert result.exit_code == (0 if verdict["label"] == "Safe" else 1)
        right += (messages, label, category, refusal) in train and got == (label, category, refusal)
    assert right >= GEN_MIN_TRAIN_ACCURACY * len(train)


def test_generate_agrees_with_scoring(gen_model):
    """Greedy decoding and the scored read-outs agree, except on near ties (top two label
    probabilities within 0.1), where batched and one-token decodes may round either way."""
    compared = 0
    with load(gen_model) as guard:
        for messages, *_ in GEN_EXAMPLES:
            verdict = guard.check(messages)
            top, second = sorted(verdict.scores.values(), reverse=True)[:2]
            if top - second < 0.1:
                continue
            compared += 1
            text = guard.generate(messages)
            assert text.startswith(f"Safety: {verdict.label}\n"), text
            expected = ", ".join(verdict.categories) or "None"
            assert f"Categories: {expected}" in text, text
            if verdict.refusal is not None:
                assert f"Refusal: {verdict.refusal}" in text, text
    assert compared >= len(GEN_EXAMPLES) // 2


def test_stream_flags_planted_spans_and_spares_controls(stream_model):
    with load(stream_model) as guard:
        for prompt, response, prompt_label, start in STREAM_EXAMPLES:
            with guard.session(prompt) as session:
                verdicts = session.feed_text(response) + session.finish()
                assert "".join(v.text for v in verdicts) == response
                state = session.state
            assert session.prompt_verdict.label == prompt_label, prompt
            if prompt_label != "Safe":
                assert list(session.prompt_verdict.categories) == [STREAM_PROMPT_CATEGORY[prompt]]
            if start is None:
                assert not state.flagged, (prompt, response, state)
                continue
            assert state.flagged and state.label == "Unsafe", (response, state)
            flagged_char = sum(len(v.text) for v in verdicts[: state.flagged_at])
            assert flagged_char >= start, (response, start, flagged_char)


def test_stream_check_cli_prompt_verdicts(stream_model):
    for prompt, _, prompt_label, _ in STREAM_EXAMPLES[::2]:
        result = CliRunner().invoke(main, ["check", prompt, "--model", stream_model, "--json"])
        assert json.loads(result.stdout)["label"] == prompt_label, prompt
