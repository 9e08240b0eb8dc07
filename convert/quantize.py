"""Quantization through llama.cpp's own quantizer (no extra binaries)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edgeguard.errors import ConversionError, UsageError

# quant name -> llama_ftype value (llama.h)
QUANTS = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q8_0": 7,
    "q5_0": 8,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "bf16": 32,
}
DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")


def parse_quants(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_QUANTS
    quants = tuple(dict.fromkeys(q.strip().lower() for q in text.split(",") if q.strip()))
    unknown = [q for q in quants if q not in QUANTS]
    if unknown or not quants:
        raise UsageError(f"unknown quant {', '.join(unknown) or repr(text)} (known: {', '.join(QUANTS)})")
    return quants


def quantize(src: Path, dst: Path, quant: str, *, threads: int | None = None, verbose: bool = False) -> None:
    import llama_cpp  # heavy: imported only when quantizing

    from edgeguard.backend import init_llama

    init_llama(verbose)  # routes (silences) llama.cpp's log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise ConversionError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc})")
