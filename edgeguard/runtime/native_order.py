"""The order in which native libraries may enter a process that uses a CUDA build of llama.cpp.

Measured on an NVIDIA H200 (CUDA 13.0, driver 580, llama-cpp-python 0.3.36 built with
``-DGGML_CUDA=on``, onnxruntime 1.30 CPU, torch 2.11+cu130; ``python bench/gpu_probe.py``, each
case in a fresh process, bench/results/2026-11-28-nvidia-h200-gpu.md):

- once llama.cpp's CUDA library (``libggml-cuda.so``) is loaded, ``import onnxruntime`` crashes
  the process (SIGSEGV in its native import) and ``import torch`` aborts (SIGABRT); loading only
  that library's dependencies first (libcudart, libcublas, libcuda, libgomp, libggml-base,
  libggml-cpu) crashes nothing, so the clash comes from libggml-cuda itself;
- torch imported first, then a model loaded on the GPU, crashes inside
  ``llama_model_load_from_file``;
- with onnxruntime imported before llama.cpp, all 12 import orders of edgeguard, onnxruntime,
  torch and llama_cpp in which llama_cpp does not come before onnxruntime load Gen and Stream on
  the GPU with CPU-equal scores; the other 12 crash.

So edgeguard loads onnxruntime before llama.cpp whenever it can: on ``import edgeguard`` when
the installed llama.cpp is a CUDA build, and always before its own first ``import llama_cpp``.
Where the app imported a CUDA llama_cpp before any of that, importing onnxruntime would kill
the process: edgeguard then never imports it (Gen needs no onnxruntime) and a Stream model gets
a clear error that says which import to move, instead of a crash.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from edgeguard.errors import RuntimeFailure

log = logging.getLogger("edgeguard.runtime")

CUDA_LIBRARY = "libggml-cuda"
CUDA_LIBRARIES = (CUDA_LIBRARY, "ggml-cuda")  # Linux's .so, Windows' ggml-cuda.dll


def cuda_llama_mapped(maps: str | None = None) -> bool:
    """True when llama.cpp's CUDA library is loaded in this process (``maps``: the text of
    /proc/self/maps, read when not given; False where there is none: macOS, which has no CUDA,
    and Windows, where the clash was never seen)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text(errors="replace")
        except OSError:
            return False
    return any(CUDA_LIBRARY in line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/" in line)


def llama_is_cuda_build() -> bool:
    """True when the installed llama_cpp package carries a CUDA library (checked on disk,
    without importing llama_cpp)."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    lib = Path(spec.origin).parent / "lib"
    return lib.is_dir() and any(p.name.startswith(CUDA_LIBRARIES) for p in lib.iterdir())


def load_onnxruntime_first() -> None:
    """Import onnxruntime now if it is installed and still safe to import; otherwise nothing."""
    if "onnxruntime" in sys.modules or cuda_llama_mapped():
        return
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass


def onnxruntime():
    """The onnxruntime module for the Stream heads; a RuntimeFailure (not a crash) where a CUDA
    llama.cpp was loaded before it."""
    if "onnxruntime" not in sys.modules and cuda_llama_mapped():
        raise RuntimeFailure(
            "llama_cpp (a CUDA build) was imported before onnxruntime in this process, and importing "
            "onnxruntime now would crash it (a known clash of their native libraries); import edgeguard "
            "or onnxruntime before llama_cpp, or load the Stream model in another process")
    import onnxruntime as ort

    return ort
