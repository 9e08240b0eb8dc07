"""edgeguard.models.sizing against llama.cpp's own quantizer, and what `edgeguard models` and
`edgeguard doctor` say with it.

The oracle for the per-tensor types is llama.cpp itself: a 36-layer random GGUF (the 4B/8B
layer count) quantized by ``llama_model_quantize``, read back with gguf's reader. The byte counts
of whole converted models are checked in test_family_convert.py.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from edgeguard.cli import main
from edgeguard.doctor import model_fit
from edgeguard.models.registry import load_registry
from edgeguard.models.sizing import (
    BITS,
    MB,
    RUNTIME_MB,
    Footprint,
    ModelShape,
    footprint,
    largest_fitting,
    tensor_type,
)
from edgeguard_convert.quantize import quantize
from tests.fixtures.tiny_gguf import write_random_qwen3_gguf

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(autouse=True)
def packaged_registry_only(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEGUARD_MODELS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0", "q4_0"])
def test_tensor_types_are_llama_cpps(tmp_path, quant):
    layers = 36
    src = tmp_path / "f16.gguf"
    write_random_qwen3_gguf(src, n_vocab=300, hidden=256, layers=layers, heads=4, kv_heads=1, head_dim=64,
                            ffn=768)
    dst = tmp_path / f"{quant}.gguf"
    quantize(src, dst, quant, threads=1)
    got = {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(dst)).tensors if len(t.shape) == 2}
    assert got["token_embd.weight"] == tensor_type(quant, "token_embd", 0, layers, False, 256)
    for layer in range(layers):
        for role in ROLES:
            cols = 768 if role == "ffn_down" else 256
            want = tensor_type(quant, role, layer, layers, False, cols)
            assert got[f"blk.{layer}.{role}.weight"] == want, (layer, role)


def test_qwen3_shapes_kv_cache_per_token():
    models = load_registry()
    assert models["gen-0.6b"].shape.kv_bytes_per_token() == 112 * 1024  # models.toml's comment
    assert models["gen-4b"].shape.kv_bytes_per_token() == 144 * 1024
    assert models["gen-8b"].shape.kv_bytes_per_token() == 144 * 1024


def test_runtime_allowances_are_the_engines():
    from edgeguard.engines import stream
    from edgeguard.runtime.kernels import RUNTIME_MB as GEN_RUNTIME_MB

    assert {"gen": GEN_RUNTIME_MB, "stream": stream.DEFAULTS.runtime_mb} == RUNTIME_MB


def test_footprint_adds_up():
    shape = load_registry()["gen-8b"].shape
    f = footprint(shape, "gen", "q8_0", name="x", ctx_tokens=1000)
    assert f.ram_bytes == f.weights_bytes + f.kv_bytes + RUNTIME_MB["gen"] * MB
    assert f.kv_bytes == 1000 * 144 * 1024 and f.gpu_bytes == f.weights_bytes + f.kv_bytes
    # an untied q8_0 model: every matrix at 8.5 bits, lm_head included
    matrices = shape.params("gen") - (2 * shape.hidden + 2 * shape.head_dim) * shape.layers - shape.hidden
    assert f.weights_bytes == pytest.approx(matrices * BITS["q8_0"] / 8, rel=1e-3)
    with pytest.raises(ValueError):
        footprint(shape, "stream", "q8_0")  # no heads' width
    with pytest.raises(ValueError):
        footprint(shape, "gen", "q3_k")


def test_stream_footprint_counts_its_cpu_cache():
    """Stream's KV cache on a CPU holds q8_0 keys (34 bytes a block of 32) and f16 values, on a
    GPU f16 both: RAM counts the first, GPU memory the second (the engines' defaults)."""
    from edgeguard.engines import stream

    assert stream.DEFAULTS.kv_type_on("cpu") == "q8_0-keys" and stream.DEFAULTS.kv_type_on("gpu") == "f16"
    shape = load_registry()["stream-0.6b"].shape
    f = footprint(shape, "stream", "q4_k_m", ctx_tokens=1000)
    values = 1000 * shape.layers * shape.kv_heads * shape.head_dim  # of keys, and as many of values
    assert f.kv_bytes == int(values * 34 / 32 + values * 2)
    assert f.gpu_bytes == f.weights_bytes + values * 2 * 2
    assert f.ram_bytes == f.weights_bytes + f.kv_bytes + RUNTIME_MB["stream"] * MB


def _feet(ram_mb: dict[str, float]) -> list[Footprint]:
    return [Footprint(name, name.split("-")[0], "q4_k_m", 0, int(mb * MB), 0, 0, 0) for name, mb in ram_mb.items()]


def test_largest_fitting_keeps_the_reserve():
    feet = _feet({"gen-s": 500, "gen-m": 3000, "gen-l": 6000, "stream-s": 400})
    assert largest_fitting(feet, "gen", available_mb=10000, reserve_mb=4000).model.name == "gen-l"
    assert largest_fitting(feet, "gen", available_mb=10000, reserve_mb=4500).model.name == "gen-m"
    assert largest_fitting(feet, "gen", available_mb=3000, reserve_mb=0).model.name == "gen-m"
    none = largest_fitting(feet, "gen", available_mb=3000, reserve_mb=2600)
    assert none.model is None and none.considered == ("gen-s", "gen-m", "gen-l")
    assert largest_fitting(feet, "stream", available_mb=1000, reserve_mb=0).model.name == "stream-s"


def test_shape_from_config_defaults_head_dim():
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
           "vocab_size": 100}
    shape = ModelShape.from_config(cfg)
    assert (shape.head_dim, shape.kv_heads, shape.tied, shape.guard_inner) == (16, 4, True, 0)
    with pytest.raises(ValueError, match="multiple"):
        ModelShape(hidden=64, layers=1, heads=4, kv_heads=3, head_dim=16, ffn=8, vocab=10)


def test_models_json_lists_the_family_with_sizes():
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) >= {f"{k}-{s}" for k in ("gen", "stream") for s in ("0.6b", "4b", "8b")}
    models = load_registry()
    for name in ("gen-0.6b", "gen-4b", "gen-8b", "stream-0.6b", "stream-4b", "stream-8b"):
        feet = models[name].footprint()
        assert rows[name]["disk_mb"] == round(feet.disk_mb) and rows[name]["ram_mb"] == round(feet.ram_mb)
    assert rows["gen-0.6b"]["ram_mb"] < rows["gen-4b"]["ram_mb"] < rows["gen-8b"]["ram_mb"]
    text = CliRunner().invoke(main, ["models"]).stdout
    assert f"{rows['gen-4b']['disk_mb']} MB disk" in text


def test_model_fit_per_place_and_kind(monkeypatch):
    import edgeguard.doctor as doctor

    models = load_registry()
    need = {name: spec.footprint() for name, spec in models.items()}
    ram = need["gen-4b"].ram_mb + 1000 + 1  # 4B fits with a 1000 MB reserve, 8B does not
    monkeypatch.setattr(doctor, "available_memory_mb", lambda: ram)
    gpu = {"name": "CUDA0", "type": "gpu", "memory_free_mb": need["gen-8b"].gpu_bytes / MB + 1000 + 1}
    fit = model_fit([gpu, {"name": "CPU", "type": "cpu"}], 1000)
    chosen = {(row["place"], row["kind"]): row["model"] and row["model"]["name"] for row in fit["fits"]}
    assert chosen[("RAM", "gen")] == "gen-4b"
    assert chosen[("CUDA0", "gen")] == "gen-8b"
    assert chosen[("CUDA0", "stream")] == "stream-8b"
    assert set(chosen) == {("RAM", "gen"), ("RAM", "stream"), ("CUDA0", "gen"), ("CUDA0", "stream")}


def test_doctor_prints_the_recommendation():
    result = CliRunner().invoke(main, ["doctor", "--no-self-test", "--json", "--reserve-mb", "1000000"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = [r for r in report["model_fit"]["fits"] if r["where"] == "ram"]
    assert {r["kind"] for r in rows} == {"gen", "stream"} and all(r["model"] is None for r in rows)
    result = CliRunner().invoke(main, ["doctor", "--no-self-test", "--reserve-mb", "0"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("fits RAM")]
    assert len(lines) == 2 and all("--reserve-mb" in line for line in lines)
    assert CliRunner().invoke(main, ["doctor", "--no-self-test", "--reserve-mb", "-1"]).exit_code == 2
