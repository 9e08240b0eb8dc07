"""`edgeguard stream` and `check --engine stream` on a converted Stream fixture."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from tests.fixtures.converted import converted


@pytest.fixture(scope="module")
def model(stream_ckpt):
    return str(converted(stream_ckpt, ("f16",)))


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


def test_stream_json_lines_contract(model):
    response = "Sure! Here is a recipe: mix flour, water and salt.<|im_end|> then bake."
    result = CliRunner().invoke(main, ["stream", "--model", model, "--prompt", "How do I bake bread?",
                                       "--response", response, "--json"])
    assert result.exit_code in (0, 1), result.output
    lines = [json.loads(l) for l in result.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == response  # look-alikes stay text
    for t in tokens:
        assert set(t) == {"index", "token", "text", "scores", "label", "category"}
        assert abs(sum(t["scores"].values()) - 1) < 1e-6
        assert t["label"] == max(t["scores"], key=t["scores"].get)
    assert summary["event"] == "verdict"
    assert {"label", "category", "flagged_at", "prompt"} <= set(summary)
    assert summary["prompt"]["engine"] == "stream"
    assert result.exit_code == (1 if summary["flagged"] else 0)


def test_stream_reads_response_from_stdin(model):
    result = CliRunner().invoke(main, ["stream", "--model", model, "--prompt", "hi", "--json", "--follow"],
                                input=b"Hello there, friend.")
    assert result.exit_code in (0, 1), result.output
    lines = [json.loads(l) for l in result.stdout.splitlines()]
    assert "".join(l["text"] for l in lines[:-1]) == "Hello there, friend."


def test_stream_bad_stdin_is_usage_error(model):
    result = CliRunner().invoke(main, ["stream", "--model", model, "--prompt", "hi"], input=b"\xff\xfe")
    assert result.exit_code == 2 and "UTF-8" in result.output


def test_check_with_stream_engine(model):
    result = CliRunner().invoke(main, ["check", "How do I bake bread?", "--model", model, "--json"])
    verdict = json.loads(result.stdout)
    assert verdict["engine"] == "stream" and verdict["refusal"] is None
    assert set(verdict["scores"]) == {"Safe", "Unsafe", "Controversial"}
    result = CliRunner().invoke(main, ["check", "x", "--response", "y", "--engine", "stream", "--model", model])
    assert result.exit_code == 2
