"""How to get a llama-cpp-python build with GPU offload, per operating system.

llama-cpp-python is built from source on install. Linux and Windows builds are CPU-only unless
``CMAKE_ARGS`` asks for a GPU backend: CUDA for NVIDIA, Vulkan for AMD and Intel GPUs
(integrated ones included). On macOS Metal is on by default, so a plain install on Apple
Silicon already offloads to the GPU (``--device gpu`` means Metal there). Windows builds need
Visual Studio Build Tools (C++) and CMake, and ``CMAKE_ARGS`` is set the PowerShell way."""

from __future__ import annotations

import platform

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
_PIP = f"pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python {LLAMA_CPP_PYTHON}"
CUDA_INSTALL = f'CMAKE_ARGS="-DGGML_CUDA=on" {_PIP}'
VULKAN_INSTALL = f'CMAKE_ARGS="-DGGML_VULKAN=on" {_PIP}'
WINDOWS_CUDA_INSTALL = f'$env:CMAKE_ARGS="-DGGML_CUDA=on"; {_PIP}'
WINDOWS_VULKAN_INSTALL = f'$env:CMAKE_ARGS="-DGGML_VULKAN=on"; {_PIP}'
METAL_INSTALL = f'CMAKE_ARGS="-DGGML_METAL=on" {_PIP}'


def gpu_build_advice(system: str | None = None, machine: str | None = None) -> str:
    """What to install for GPU offload on ``system`` (``platform.system()``: "Linux", "Windows",
    "Darwin"; default this machine's)."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system == "Darwin":
        where = "Apple Silicon" if machine in ("arm64", "aarch64") else "this Mac"
        return (f"on {where} llama.cpp offloads through Metal, on by default in a build from source: "
                f"install the Xcode command line tools (xcode-select --install), then: {METAL_INSTALL}")
    if system == "Windows":
        return ("in PowerShell, with Visual Studio Build Tools (C++) and CMake installed: for an NVIDIA GPU "
                f"(with the CUDA Toolkit) {WINDOWS_CUDA_INSTALL}; for an AMD or Intel GPU (with the Vulkan "
                f"SDK) {WINDOWS_VULKAN_INSTALL}")
    return (f"install a CUDA build for an NVIDIA GPU (with the CUDA Toolkit): {CUDA_INSTALL}; for an AMD or "
            f"Intel GPU, a Vulkan build (with the Vulkan headers and glslc): {VULKAN_INSTALL}")


def native_flags_advice(system: str | None = None) -> str:
    """How to rebuild llama-cpp-python without the build machine's own CPU flags."""
    if (system or platform.system()) == "Windows":
        return f'in PowerShell: $env:CMAKE_ARGS="-DGGML_NATIVE=OFF"; {_PIP}'
    return f'CMAKE_ARGS="-DGGML_NATIVE=OFF" {_PIP}'
