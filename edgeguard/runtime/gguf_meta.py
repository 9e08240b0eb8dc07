"""A GGUF's metadata values that llama.cpp 0.3.36 aborts the process on, refused before it loads;
and the ggml types of its tensors.

Found by fuzzing converted models (each case an abort, SIGABRT, in a child process): a layer
count of 0 or past llama.cpp's 512, and a non-finite or non-positive RMS-norm epsilon. llama.cpp
reports other damage (shapes, types, offsets) as a load error, which edgeguard turns into a
ModelError. Not covered yet: token strings that are not UTF-8 (also an abort); checking all
151,936 of them here costs ~0.7-1.5 s a load, so it is left for a check made once per file.

Reads the key/value section (GGUF v2/v3 layout: magic, version, tensor count, key count, then
per key: string, value type, value) through a memory map, stopping once both keys are found
(they precede the tokenizer's arrays in converted files): no tensor data is touched. A file this
reader cannot follow is left to llama.cpp's own checks. (The ``gguf`` package's GGUFReader,
used for tensor placement, parses every token string into arrays: seconds per load.)
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct

from edgeguard.errors import ModelError

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Stop(Exception):
    """The file does not follow the layout this reader knows."""


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buf):
            raise _Stop
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += size
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.at + n > len(self.buf):
            raise _Stop
        self.at += n
        return self.buf[self.at - n:self.at]

    def value(self, kind: int):
        """A scalar or string value; arrays are skipped (None)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise _Stop
        item, n = self.take("<I"), self.take("<Q")
        if item == _STRING:
            for _ in range(n):
                self.string()
            return None
        if item not in _SCALARS:
            raise _Stop
        size = struct.calcsize(_SCALARS[item]) * n
        if self.at + size > len(self.buf):
            raise _Stop
        self.at += size
        return None


_SUFFIXES = (".block_count", ".attention.layer_norm_rms_epsilon")


def _wanted(key: str) -> bool:
    return key == "general.architecture" or key.endswith(_SUFFIXES)


def _metadata(buf) -> dict[str, object] | None:
    """The wanted keys' values, or None when the file does not follow the layout."""
    c = _Cursor(buf)
    try:
        if bytes(buf[:4]) != b"GGUF":
            return None
        c.at = 4
        if c.take("<I") not in (2, 3):
            return None
        c.take("<Q")  # tensor count
        found = {}
        for _ in range(c.take("<Q")):
            key = bytes(c.string()).decode("utf-8", "replace")
            value = c.value(c.take("<I"))
            if _wanted(key):
                found[key] = bytes(value) if isinstance(value, memoryview) else value
                if len(found) == 3:
                    break
        return found
    except _Stop:
        return None


def check_metadata(path: str | os.PathLike[str]) -> None:
    """A ModelError for a metadata value that would abort llama.cpp (see the module docstring)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            view = memoryview(buf)
            try:
                meta = _metadata(view)
                problems = _problems(meta) if meta else []
            finally:
                meta = None
                view.release()
    except (OSError, ValueError):
        return  # unreadable or empty: llama.cpp's own error says so
    if problems:
        raise ModelError(f"{os.fspath(path)}: {problems[0]} (a damaged or foreign model file)")


def _problems(meta: dict) -> list[str]:
    out = []
    arch = meta.get("general.architecture")
    prefix = arch.decode("utf-8", "replace") if isinstance(arch, bytes) else ""
    layers = meta.get(f"{prefix}.block_count")
    if isinstance(layers, int) and not isinstance(layers, bool) and not 1 <= layers <= MAX_LAYERS:
        out.append(f"{prefix}.block_count is {layers}, outside 1..{MAX_LAYERS}")
    eps = meta.get(f"{prefix}.attention.layer_norm_rms_epsilon")
    if isinstance(eps, float) and not (math.isfinite(eps) and eps > 0):
        out.append(f"{prefix}.attention.layer_norm_rms_epsilon is {eps}, not a positive number")
    return out


# ggml_type ids (ggml.h) of the types ``edgeguard.runtime.decode_shapes`` needs by name
_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K",
               13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 30: "BF16"}


@functools.lru_cache(maxsize=32)
def _tensor_types(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str, int], ...] | None:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            view = memoryview(buf)
            try:
                return _read_tensor_types(view)
            finally:
                view.release()
    except (OSError, ValueError):
        return None


def _read_tensor_types(buf) -> tuple[tuple[str, str, int], ...] | None:
    c = _Cursor(buf)
    try:
        if bytes(buf[:4]) != b"GGUF":
            return None
        c.at = 4
        if c.take("<I") not in (2, 3):
            return None
        n_tensors, n_keys = c.take("<Q"), c.take("<Q")
        for _ in range(n_keys):
            c.string()
            c.value(c.take("<I"))
        out = []
        for _ in range(n_tensors):
            name = bytes(c.string()).decode("utf-8", "replace")
            dims = c.take("<I")
            for _ in range(dims):
                c.take("<Q")
            kind = c.take("<I")
            c.take("<Q")  # offset
            out.append((name, _TYPE_NAMES.get(kind, f"type {kind}"), dims))
        return tuple(out)
    except _Stop:
        return None


def tensor_types(path: str | os.PathLike[str]) -> list[tuple[str, str, int]] | None:
    """``(name, ggml type name, number of dimensions)`` of every tensor, read from the header
    (cached per file version); None when the file does not follow the layout."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    found = _tensor_types(os.fspath(path), st.st_size, st.st_mtime_ns)
    return None if found is None else list(found)
