"""Checkpoint conversion: Hugging Face Qwen3Guard folders to GGUF (+ ONNX heads) and a manifest.

Installed as ``edgeguard_convert``; needs numpy, gguf, onnx and llama-cpp-python, never torch.
"""

from edgeguard_convert.pipeline import ConvertOptions, convert

__all__ = ["ConvertOptions", "convert"]
