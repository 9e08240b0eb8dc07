"""Never crash the host: kernel choice on this CPU, --device, doctor, and import orders.

On an Intel machine with AMX these tests crash (SIGSEGV in ggml_backend_amx_mul_mat) if
edgeguard ever lets llama.cpp select its AMX kernels for a multi-token decode.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from edgeguard.runtime.backend import Backend, cpu_extra_buffer_types, gpu_offload_supported, system_info
from edgeguard.runtime.kernels import CUDA_INSTALL
from edgeguard.selftest import HIDDEN, write_backbone
from edgeguard_convert.quantize import quantize
from tests.fixtures.converted import converted

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def q4_backbone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("q4")
    write_backbone(folder / "f32.gguf")
    quantize(folder / "f32.gguf", folder / "q4_0.gguf", "q4_0", threads=1)  # keeps f32.gguf
    return folder / "q4_0.gguf"


def test_repacked_weights_never_use_amx_and_match_plain_kernels(q4_backbone):
    rows = np.random.default_rng(0).standard_normal((32, HIDDEN)).astype(np.float32)
    with Backend(q4_backbone, n_ctx=64, mode="embeddings", repack=True) as fast:
        assert "AMX" not in fast.buffers
        if "CPU_REPACK" in cpu_extra_buffer_types():
            assert fast.buffers.get("CPU_REPACK", 0) > 0  # the repacked kernels are kept
        repacked = fast.eval(embd=rows, outputs=range(32))
    with Backend(q4_backbone, n_ctx=64, mode="embeddings", repack=False) as plain:
        assert set(plain.buffers) <= {"CPU", "CPU_Mapped"}
        reference = plain.eval(embd=rows, outputs=range(32))
    with Backend(q4_backbone.with_name("f32.gguf"), n_ctx=64, mode="embeddings") as exact:
        unquantized = exact.eval(embd=rows, outputs=range(32))
    # Both Q4_0 paths sit ~0.55 (max) from the f32 model; they differ from each other by
    # 0.025 max (0.5% of the largest value), measured on an Intel AMX Xeon: bound with 4x margin.
    scale = np.abs(reference).max()
    assert np.abs(repacked - reference).max() <= 0.02 * scale
    assert np.abs(repacked - unquantized).mean() <= 1.05 * np.abs(reference - unquantized).mean()


def test_repacked_weights_are_read_not_mapped(q4_backbone):
    """Repacking copies the weights into llama.cpp's own buffer, so the GGUF is read, not
    memory-mapped: a mapping kept ~160 MiB of its pages resident beside the copy (0.6B Stream).
    Without repacking the file stays mapped (the page cache is the only copy)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    path = str(q4_backbone.resolve())
    with Backend(q4_backbone, n_ctx=64, mode="embeddings", repack=True) as fast:
        if not fast.buffers.get("CPU_REPACK"):
            pytest.skip("this llama.cpp build repacks none of these weights")
        assert path not in maps.read_text()
        fast.eval(embd=np.zeros((4, HIDDEN), np.float32), outputs=range(4))
    with Backend(q4_backbone, n_ctx=64, mode="embeddings", repack=False):
        assert path in maps.read_text()


def test_plan_follows_this_build():
    info = system_info()
    with_amx = "AMX" in cpu_extra_buffer_types()
    assert with_amx <= info.amx  # an AMX buffer type only where the build reports AMX


def test_check_device_cpu_and_gpu(gen_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", str(tmp_path))
    model = str(converted(gen_ckpt))
    runner = CliRunner()
    cpu = runner.invoke(main, ["check", "hello", "--model", model, "--quant", "q4_k_m", "--device", "cpu", "--json"])
    assert cpu.exit_code in (0, 1), cpu.output
    auto = runner.invoke(main, ["check", "hello", "--model", model, "--quant", "q4_k_m", "--json"])
    if not gpu_offload_supported():
        assert json.loads(auto.stdout) == json.loads(cpu.stdout)
        gpu = runner.invoke(main, ["check", "hello", "--model", model, "--device", "gpu"])
        assert gpu.exit_code == 3
        assert CUDA_INSTALL in gpu.stderr and "Traceback" not in gpu.stderr
    bad = runner.invoke(main, ["check", "hello", "--model", model, "--device", "tpu"])
    assert bad.exit_code == 2


def test_doctor_reports_and_self_tests_in_a_child():
    proc = subprocess.run([sys.executable, "-m", "edgeguard", "doctor", "--json"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert report["healthy"] and report["self_test"]["ok"]
    assert "AMX" not in report["self_test"]["buffers"]
    assert report["llama_system_info"].startswith("CPU :") or "CUDA" in report["llama_system_info"]
    assert report["devices"] and report["devices"][0]["name"]
    if system_info().amx:
        assert "amx_probe" in report  # the build's own AMX path was tried, in a child
    # one attention kind per guard, whatever the load: flash attention for one session and for many
    assert report["attention"]["gen"] is True and report["attention"]["stream_several_sessions"] is True
    assert report["attention"]["stream_one_session"] is True
    # one KV type per guard, at every length: q8_0 keys for Stream on the CPU, f16 on a GPU
    stream_kv = "q8_0-keys" if report["device"]["use"] in ("cpu", None) else "f16"
    assert (report["attention"]["gen_kv"], report["attention"]["stream_kv"]) == ("f16", stream_kv)
    assert report["self_test"]["kv_type"] == stream_kv  # the self-test decodes with Stream's cache
    text = subprocess.run([sys.executable, "-m", "edgeguard", "doctor", "--no-self-test"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert text.returncode == 0 and "CPU kernels" in text.stdout and "healthy" in text.stdout
    assert f"attention      Gen flash, KV f16; Stream flash, KV {stream_kv}; " in text.stdout


IMPORTS = {
    "edgeguard": "import edgeguard.engines.gen, edgeguard.engines.stream",
    "onnxruntime": "import onnxruntime",
    "torch": "import torch",
    "llama_cpp": "import llama_cpp",
}


ORDERS = list(itertools.permutations(IMPORTS))
PROMPT = "How do I pick a lock?"


@pytest.fixture(scope="module")
def reference_scores(gen_ckpt, stream_ckpt, tmp_path_factory):
    import edgeguard

    out = {}
    for ckpt in (gen_ckpt, stream_ckpt):
        with edgeguard.load(str(converted(ckpt)), "q4_k_m", device="cpu") as guard:
            out[guard.engine] = guard.check(PROMPT).scores
    return out


def scores_after_imports(order, engines, device: str, cache: Path) -> dict:
    """In a fresh process: import in ``order``, then load each engine on ``device`` and check
    PROMPT; the scores by engine (asserting that the process neither crashed nor failed)."""
    script = "\n".join(IMPORTS[name] for name in order) + textwrap.dedent(f"""
        import json, edgeguard
        out = {{}}
        for model in {engines!r}:
            with edgeguard.load(model, "q4_k_m", device={device!r}) as guard:
                out[guard.engine] = dict(guard.check({PROMPT!r}).scores)
        print(json.dumps(out))
    """)
    env = {"EDGEGUARD_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    for name in ("LD_LIBRARY_PATH", "PYTHONPATH", "CUDA_VISIBLE_DEVICES"):  # where a CUDA build needs them
        if name in os.environ:
            env[name] = os.environ[name]
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(scores) == {"gen", "stream"}
    return scores


@pytest.mark.parametrize("index", range(len(ORDERS)), ids=["-".join(o) for o in ORDERS])
def test_any_import_order_then_both_engines(index, gen_ckpt, stream_ckpt, reference_scores, tmp_path):
    """Every import order of edgeguard, onnxruntime, torch and llama_cpp, then Gen and Stream
    loaded (alternately one or the other first) in one fresh process: no crash, and the same
    scores as in this process (within 1e-5)."""
    gen, stream = str(converted(gen_ckpt)), str(converted(stream_ckpt))
    engines = [gen, stream] if index % 2 else [stream, gen]
    scores = scores_after_imports(ORDERS[index], engines, "cpu", tmp_path)
    for engine, expected in reference_scores.items():
        assert scores[engine] == pytest.approx(expected, abs=1e-5)
