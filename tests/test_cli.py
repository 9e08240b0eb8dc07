"""The CLI contract on a converted fixture model: JSON shape, exit codes, stdin, scan resume."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from tests.fixtures.converted import converted

KEYS = ["label", "scores", "categories", "category_scores", "refusal", "flagged", "policy", "engine", "model"]


@pytest.fixture(scope="module")
def model(gen_ckpt):
    return str(converted(gen_ckpt))


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_check_json_contract_and_exit_code(model):
    result = run("check", "How can I make a bomb?", "--model", model, "--quant", "f16", "--json")
    assert result.exit_code in (0, 1), result.output
    verdict = json.loads(result.stdout)
    assert list(verdict) == KEYS
    assert abs(sum(verdict["scores"].values()) - 1) < 1e-6
    assert result.exit_code == (1 if verdict["flagged"] else 0)
    assert verdict["engine"] == "gen" and verdict["refusal"] is None


def test_check_stdin_and_response(model):
    result = run("check", "-", "--response", "Sure, here it is.", "--model", model, "--quant", "f16", "--json",
                 input="What is 2+2?")
    verdict = json.loads(result.stdout)
    assert verdict["refusal"] in ("Yes", "No")


def test_loose_policy_never_flags_controversial(model):
    result = run("check", "a", "--model", model, "--quant", "f16", "--json", "--policy", "loose")
    verdict = json.loads(result.stdout)
    assert verdict["policy"] == "loose"
    assert verdict["flagged"] == (verdict["label"] == "Unsafe")


@pytest.mark.parametrize("args,stdin,message", [
    (["check", ""], None, "empty"),
    (["check", "-"], b"\xff\xfe not utf8", "not valid UTF-8"),
    (["check", "-"], b"", "empty"),
    (["check", "x", "--policy", "nonexistent-policy"], None, "policy"),
])
def test_usage_errors_exit_2(model, args, stdin, message):
    result = run(*args, "--model", model, "--quant", "f16", input=stdin)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_model_errors_exit_3(tmp_path):
    result = run("check", "hello", "--model", str(tmp_path), "--json")
    assert result.exit_code == 2 and "neither" in result.output
    result = run("check", "hello", "--model", "no-such-model")
    assert result.exit_code == 2 and "unknown model" in result.output


def test_truncated_model_file_is_detected_at_load(gen_ckpt, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(converted(gen_ckpt), folder)
    gguf = next(folder.glob("*-f16.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:1000])
    result = run("check", "hello", "--model", str(folder), "--quant", "f16")
    assert result.exit_code == 3
    assert "corrupted or incomplete" in result.output and "Traceback" not in result.output
    assert "repair with: edgeguard convert" in result.output


def test_scan_writes_and_resumes(model, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"prompt": "first", "id": "a"}),
        "not json at all",
        json.dumps({"prompt": "third", "response": "a reply"}),
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "fifth", "id": 5}),
    ]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    result = run("scan", str(src), "--out", str(out), "--model", model, "--quant", "f16")
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert result.exit_code == (1 if any(r.get("flagged") for r in rows) else 2), result.output
    assert len(rows) == 5
    assert rows[0]["id"] == "a" and rows[2]["line"] == 3 and rows[2]["refusal"] in ("Yes", "No")
    assert rows[1] == {"line": 2, "error": rows[1]["error"]} and "not JSON" in rows[1]["error"]
    assert "error" in rows[3] and rows[4]["id"] == 5
    assert "2 malformed" in result.output

    # simulate an interruption: drop the last two lines and leave a torn one
    kept = out.read_text().splitlines(keepends=True)[:3]
    out.write_text("".join(kept) + '{"label": "Sa')
    result = run("scan", str(src), "--out", str(out), "--model", model, "--quant", "f16")
    again = [json.loads(l) for l in out.read_text().splitlines()]
    assert result.exit_code == (1 if any(r.get("flagged") for r in again) else 2), result.output
    assert len(again) == 5 and again[:3] == rows[:3]
    assert again[3]["error"] == rows[3]["error"] and again[4]["id"] == 5
    assert "3 kept from an earlier run" in result.output
