"""Quantization through llama.cpp's own quantizer (no extra binaries)."""

from __future__ import annotations

import ctypes
import os
import re
from contextlib import contextmanager
from pathlib import Path

from edgeguard.errors import ConversionError, UsageError
from edgeguard.models.formats import DEFAULT_QUANTS
from edgeguard.models.formats import QUANT_FTYPES as QUANTS
from edgeguard.platform import console
from edgeguard.platform.paths import native_output_path


def parse_quants(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_QUANTS
    quants = tuple(dict.fromkeys(q.strip().lower() for q in text.split(",") if q.strip()))
    unknown = [q for q in quants if q not in QUANTS]
    if unknown or not quants:
        raise UsageError(f"unknown quant {', '.join(unknown) or repr(text)} (known: {', '.join(QUANTS)})")
    return quants


# llama.cpp logs "[  12/ 311] blk.1.attn_q.weight - ..." as it quantizes each tensor: the only
# progress signal its quantizer gives.
_TENSOR_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


@contextmanager
def _tensor_progress(bar, verbose: bool):
    """Route llama.cpp's log into ``bar`` (tensors done) while quantizing, then back."""
    import llama_cpp

    from edgeguard.runtime.backend import init_llama

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        match = _TENSOR_LINE.match(text or b"")
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            if bar.total != total:
                bar.reset(total=total)
            bar.update(done - bar.n)
        stderr = console.stderr()
        if verbose and stderr is not None:
            stderr.write(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        yield
    finally:
        init_llama(verbose)  # the backend's routing again; on_log may be freed after this


def quantize(src: Path, dst: Path, quant: str, *, threads: int | None = None, verbose: bool = False,
             show_progress: bool = False) -> None:
    """``show_progress``: a bar of the tensors quantized so far on stderr."""
    import llama_cpp  # heavy: imported only when quantizing

    from edgeguard import progress
    from edgeguard.runtime.backend import init_llama

    init_llama(verbose)  # routes (silences) llama.cpp's log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads or os.cpu_count() or 1
    # llama.cpp reads ``src`` as UTF-8 everywhere; it creates ``dst`` with the Windows code page there.
    with progress.bar(total=None, desc=f"quantizing to {quant}", unit="tensor", enabled=show_progress) as bar, \
            native_output_path(dst) as native_dst:
        if show_progress:
            with _tensor_progress(bar, verbose):
                rc = llama_cpp.llama_model_quantize(str(src).encode(), native_dst, ctypes.byref(params))
        else:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), native_dst, ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise ConversionError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc})")
