"""A GGUF's metadata values that llama.cpp 0.3.36 aborts the process on, refused before it loads;
and the ggml types of its tensors.

Found by fuzzing converted models (each case an abort, SIGABRT or std::terminate, in a child
process), for the architectures edgeguard runs (Qwen3): a layer count of 0 or past llama.cpp's
512; a non-finite or non-positive RMS-norm epsilon; attention heads whose count the KV heads'
does not divide, per-layer head counts that differ or are 0, keys and values of different head
sizes, an odd head size, a rotary dimension other than the head size (each a GGML_ASSERT in the
graph llama.cpp builds at load or at the first decode); a rope scaling type llama.cpp does not
know; a tokenizer other than the BPE ("gpt2") vocabulary edgeguard converts to (or "none", the
Stream backbone's placeholder); and two tokens with the same string (a one-byte flip in a token
can do that). llama.cpp reports other damage (shapes, types, offsets) as a load error, which
edgeguard turns into a ModelError. Not covered: token strings that are not UTF-8 (an abort in
some llama.cpp versions; not reproduced with 0.3.36).

Reads the key/value section (GGUF v2/v3 layout: magic, version, tensor count, key count, then
per key: string, value type, value) through a memory map, all of it (a checked key may follow
the vocabulary), reading the token list for duplicates (~0.09 s for 151,936 tokens and their
merges; once per file version in a process): no tensor data is touched. A file this reader
cannot follow is left to llama.cpp's own checks. (The ``gguf`` package's GGUFReader, used for
tensor placement, parses every token string into arrays: seconds per load.)
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

    def value(self, kind: int, *, duplicates: bool = False):
        """A scalar or string value; a short array of scalars as a list; other arrays are
        skipped (None), except that with ``duplicates`` an array of strings gives its first
        repeated string (b"" when none repeats)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise _Stop
        item, n = self.take("<I"), self.take("<Q")
        if item == _STRING:
            return self._strings(n, duplicates)
        if item not in _SCALARS:
            raise _Stop
        size = struct.calcsize(_SCALARS[item]) * n
        if self.at + size > len(self.buf):
            raise _Stop
        values = list(struct.unpack_from(f"<{n}{_SCALARS[item][1]}", self.buf, self.at)) if n <= _SHORT else None
        self.at += size
        return values

    def _strings(self, n: int, duplicates: bool) -> bytes | None:
        buf, at, end = self.buf, self.at, len(self.buf)
        seen: set[bytes] = set()
        repeated = b""
        for _ in range(n):
            if at + 8 > end:
                raise _Stop
            (size,) = struct.unpack_from("<Q", buf, at)
            at += 8 + size
            if at > end:
                raise _Stop
            if duplicates and not repeated:
                s = bytes(buf[at - size:at])
                if s in seen:
                    repeated = s or b"(empty)"
                seen.add(s)
        self.at = at
        return repeated if duplicates else None


_SHORT = 1024  # scalar arrays up to this long are read (per-layer values); longer ones skipped
_TOKENS = "tokenizer.ggml.tokens"
# Suffixes after "<architecture>." of the keys checked
_SUFFIXES = ("block_count", "attention.layer_norm_rms_epsilon", "embedding_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
             "rope.scaling.type")
ROPE_SCALING = ("none", "linear", "yarn", "longrope")  # llama.cpp's names
TOKENIZERS = ("gpt2", "none")  # Qwen3's BPE vocabulary; the Stream backbone's placeholder


def _metadata(buf) -> dict[str, object] | None:
    """The checked keys' values (``general.architecture`` first, as GGUF writers put it), or
    None when the file does not follow the layout."""
    c = _Cursor(buf)
    try:
        if bytes(buf[:4]) != b"GGUF":
            return None
        c.at = 4
        if c.take("<I") not in (2, 3):
            return None
        c.take("<Q")  # tensor count
        found: dict[str, object] = {}
        wanted = {"general.architecture", "tokenizer.ggml.model"}
        for _ in range(c.take("<Q")):
            key = bytes(c.string()).decode("utf-8", "replace")
            value = c.value(c.take("<I"), duplicates=key == _TOKENS)
            if key == "general.architecture" and isinstance(value, memoryview):
                wanted |= {f"{bytes(value).decode('utf-8', 'replace')}.{s}" for s in _SUFFIXES}
            if key in wanted or key == _TOKENS:
                found[key] = bytes(value) if isinstance(value, memoryview) else value
        return found
    except _Stop:
        return None


def check_metadata(path: str | os.PathLike[str]) -> None:
    """A ModelError for a metadata value that would abort llama.cpp (see the module docstring)."""
    try:
        st = os.stat(path)
    except OSError:
        return  # llama.cpp's own error says so
    problems = _file_problems(os.fspath(path), st.st_size, st.st_mtime_ns)
    if problems:
        raise ModelError(f"{os.fspath(path)}: {problems[0]} (a damaged or foreign model file)")


@functools.lru_cache(maxsize=32)
def _file_problems(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The problems of one version of a file (read once per process)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            view = memoryview(buf)
            try:
                meta = _metadata(view)
                return tuple(_problems(meta)) if meta else ()
            finally:
                meta = None
                view.release()
    except (OSError, ValueError):
        return ()  # unreadable or empty: llama.cpp's own error says so


def _name(value) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else None


def _count(value) -> int | None:
    """A whole-number value; a per-layer list whose entries are all the same counts as that."""
    if isinstance(value, list) and value and len(set(value)) == 1:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _problems(meta: dict) -> list[str]:
    out = []
    arch = meta.get("general.architecture")
    prefix = arch.decode("utf-8", "replace") if isinstance(arch, bytes) else ""

    def key(suffix: str) -> str:
        return f"{prefix}.{suffix}"

    layers = meta.get(key("block_count"))
    if isinstance(layers, int) and not isinstance(layers, bool) and not 1 <= layers <= MAX_LAYERS:
        out.append(f"{key('block_count')} is {layers}, outside 1..{MAX_LAYERS}")
    eps = meta.get(key("attention.layer_norm_rms_epsilon"))
    if isinstance(eps, float) and not (math.isfinite(eps) and eps > 0):
        out.append(f"{key('attention.layer_norm_rms_epsilon')} is {eps}, not a positive number")
    heads = {name: meta.get(key(f"attention.{name}")) for name in ("head_count", "head_count_kv")}
    for name, value in heads.items():
        count = _count(value)
        if value is not None and (count is None or count < 1):
            out.append(f"{key('attention.' + name)} is {value}: edgeguard runs one positive head count for "
                       "every layer")
    n_head, n_kv = _count(heads["head_count"]), _count(heads["head_count_kv"])
    if n_head and n_kv and n_head % n_kv:
        out.append(f"{n_head} attention heads do not split into groups of {n_kv} KV heads")
    embd = meta.get(key("embedding_length"))
    head_k = meta.get(key("attention.key_length"))
    if head_k is None and isinstance(embd, int) and n_head:
        head_k = embd // n_head
    head_v = meta.get(key("attention.value_length"), head_k)
    if isinstance(head_k, int) and isinstance(head_v, int):
        if head_k != head_v:
            out.append(f"keys of {head_k} values and values of {head_v} per head: this architecture needs "
                       "the two equal")
        elif head_k % 2:
            out.append(f"an attention head of {head_k} values: rotary embeddings need an even head size")
        rot = meta.get(key("rope.dimension_count"))
        if rot is not None and rot != head_k:
            out.append(f"{key('rope.dimension_count')} is {rot}, not the head size {head_k}")
    scaling = meta.get(key("rope.scaling.type"))
    if scaling is not None and _name(scaling) not in ROPE_SCALING:
        out.append(f"{key('rope.scaling.type')} is {_name(scaling) or scaling!r}, not one of {', '.join(ROPE_SCALING)}")
    model = meta.get("tokenizer.ggml.model")
    if model is not None and _name(model) not in TOKENIZERS:
        out.append(f"tokenizer.ggml.model is {_name(model) or model!r}; edgeguard's vocabularies are "
                   f"{' or '.join(TOKENIZERS)}")
    repeated = meta.get(_TOKENS)
    if repeated:
        out.append(f"the token {_name(repeated[:40])!r} appears twice in the vocabulary")
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
