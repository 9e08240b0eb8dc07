"""Bad input to `edgeguard convert`: one clear line, the right exit code, nothing left behind."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeguard.cli import main


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def run_convert(src, out, *extra):
    result = CliRunner().invoke(main, ["convert", str(src), "--out", str(out), "--quant", "f16", *extra])
    return result


def assert_clean_failure(result, out, code, *words):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.startswith("edgeguard: error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


def test_missing_tokenizer(gen_ckpt, tmp_path):
    ckpt = copy_ckpt(gen_ckpt, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run_convert(ckpt, out), out, 3, "missing tokenizer.json")


def test_missing_weights(gen_ckpt, tmp_path):
    ckpt = copy_ckpt(gen_ckpt, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run_convert(ckpt, out), out, 3, "no *.safetensors")


def test_truncated_weights(gen_ckpt, tmp_path):
    ckpt = copy_ckpt(gen_ckpt, tmp_path / "ckpt")
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_clean_failure(run_convert(ckpt, out), out, 3, "truncated")


def test_unknown_architecture(gen_ckpt, tmp_path):
    ckpt = copy_ckpt(gen_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(ckpt, out), out, 3, "unsupported architecture", "LlamaForCausalLM")


def test_shape_contradicting_config(gen_ckpt, tmp_path):
    ckpt = copy_ckpt(gen_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(ckpt, out), out, 3, "mlp", "config implies")


def test_unwritable_output(gen_ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    result = run_convert(gen_ckpt, out)
    assert result.exit_code == 3, result.output
    assert "cannot write to" in result.output and "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"


def test_non_model_folder_is_not_overwritten(gen_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_convert(gen_ckpt, out)
    assert result.exit_code == 3 and "refusing to overwrite" in result.output
    assert (out / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_unknown_quant_is_usage_error(gen_ckpt, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(gen_ckpt), "--out", str(out), "--quant", "q3_xyz"])
    assert result.exit_code == 2 and "unknown quant q3_xyz" in result.output
    assert not out.exists()


def test_debug_shows_traceback(gen_ckpt, tmp_path):
    ckpt = copy_ckpt(gen_ckpt, tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    result = CliRunner().invoke(main, ["--debug", "convert", str(ckpt), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and result.exception is not None


def test_reconvert_replaces_previous_model(gen_ckpt, tmp_path):
    out = tmp_path / "out"
    assert run_convert(gen_ckpt, out).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())
    result = CliRunner().invoke(main, ["convert", str(gen_ckpt), "--out", str(out), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    second = json.loads((out / "manifest.json").read_text())
    assert first["quants"] == ["f16"] and second["quants"] == ["q8_0"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *second["files"]])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-6])
def test_non_finite_or_negative_norm_epsilon(gen_ckpt, tmp_path, value):
    """A NaN epsilon converted fine before and then aborted llama.cpp at the first check."""
    ckpt = copy_ckpt(gen_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["rms_norm_eps"] = value  # json.dumps writes NaN / Infinity, which json.loads reads back
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(ckpt, out), out, 3, "rms_norm_eps", "positive finite number")
