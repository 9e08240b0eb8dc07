"""Native library order on CUDA builds (edgeguard.runtime.native_order), checked on any machine.

The crash itself needs a CUDA build and a GPU (bench/gpu_probe.py; bench/results/2026-11-28-nvidia-h200-gpu.md);
here the decisions are checked with the process's library map simulated, each in a fresh
process so that onnxruntime really is not imported yet.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeguard.runtime import native_order
from tests.fixtures.converted import converted

ROOT = Path(__file__).resolve().parents[1]
MAPS_CUDA = ("7f1c00000000-7f1c00100000 r-xp 00000000 00:2a 123 /site/llama_cpp/lib/libggml-cuda.so.0\n"
             "7f1c00200000-7f1c00300000 r-xp 00000000 00:2a 124 /usr/lib/libstdc++.so.6.0.33\n")
MAPS_CPU = ("7f1c00000000-7f1c00100000 r-xp 00000000 00:2a 123 /site/llama_cpp/lib/libggml-cpu.so\n"
            "7f1c00400000-7f1c00500000 rw-p 00000000 00:00 0 \n"
            "7f1c00200000-7f1c00300000 r-xp 00000000 00:2a 125 /home/u/libggml-cuda-notes/libfoo.so\n")


def test_cuda_library_found_in_the_map_by_file_name():
    assert native_order.cuda_llama_mapped(MAPS_CUDA)
    assert not native_order.cuda_llama_mapped(MAPS_CPU)  # a folder name is not the library
    assert not native_order.cuda_llama_mapped("")


def test_cuda_build_recognised_on_disk_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "llama_cpp"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "lib" / "libggml-cpu.so").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    assert not native_order.llama_is_cuda_build()
    (pkg / "lib" / "libggml-cuda.so").write_bytes(b"")
    assert native_order.llama_is_cuda_build()


def _child(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh process where llama.cpp's CUDA library counts as loaded."""
    script = textwrap.dedent("""
        import sys
        from edgeguard.runtime import native_order
        native_order.cuda_llama_mapped = lambda maps=None: True
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_onnxruntime_never_imported_after_a_cuda_llama_and_stream_refuses(stream_ckpt, gen_ckpt):
    stream, gen = converted(stream_ckpt), converted(gen_ckpt)
    proc = _child(f"""
        import edgeguard
        from edgeguard.errors import RuntimeFailure
        native_order.load_onnxruntime_first()
        assert "onnxruntime" not in sys.modules
        with edgeguard.load({str(gen)!r}, "q4_k_m", device="cpu", prefix_cache=None) as g:
            print("gen", g.check("How do I bake bread?").label)   # Gen needs no onnxruntime
        assert "onnxruntime" not in sys.modules
        try:
            edgeguard.load({str(stream)!r}, "q4_k_m", device="cpu")
        except RuntimeFailure as e:
            print("refused:", e)
        assert "onnxruntime" not in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gen " in proc.stdout
    assert "refused: llama_cpp (a CUDA build) was imported before onnxruntime" in proc.stdout


def test_stream_cli_exits_3_with_the_reason(stream_ckpt, tmp_path):
    stream = converted(stream_ckpt)
    proc = _child(f"""
        from edgeguard.cli import main
        main(["check", "--model", {str(stream)!r}, "--quant", "q4_k_m", "--device", "cpu", "How do I bake bread?"])
    """)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "import edgeguard or onnxruntime before llama_cpp" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("already", [True, False])
def test_onnxruntime_loaded_first_when_safe(already):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from edgeguard.runtime import native_order
        if {already!r}:
            import onnxruntime
        native_order.load_onnxruntime_first()
        assert "onnxruntime" in sys.modules
        assert native_order.onnxruntime() is sys.modules["onnxruntime"]
    """)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
