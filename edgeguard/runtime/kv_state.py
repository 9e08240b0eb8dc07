"""A sequence's KV state rewritten for a context that lays its cache out differently.

llama.cpp refuses a state saved by a context of another layout, and two things vary between
the contexts edgeguard builds: whether V is stored transposed (element-major, plain attention)
or cell-major (flash attention), and whether K is f16 or q8_0 (``kv_type="q8_0-keys"``). The
state format (llama-kv-cache.cpp, llama.cpp 0.3.36), after a header (8 bytes from
``llama_state_seq_get_data``; magic, version, token count and tokens in a file written by
``llama_state_seq_save_file``): n_stream; per stream cell_count, per cell (pos, n_seq_id, seq
ids), then v_trans, n_layer, per layer K (type, row size, rows), then per layer V: (type, row
size, rows) when not transposed, else (type, element size, n_embd_v, n_embd_v rows of
cell_count elements).

A quantized cache is also rotated: llama.cpp (0.3.36, llama-kv-cache.cpp) multiplies keys and
queries by an orthonormal Walsh-Hadamard matrix before a quantized K cache stores them (blocks
of the largest power of two dividing the head size), and values by one of 64 x 64 before a
quantized V cache stores them (rotating the output back), when the head size is a multiple of
64 and LLAMA_ATTN_ROT_DISABLE is not set; moving K or V between f16 and q8_0 applies that
rotation (its own inverse) too.

Everything is streamed one layer at a time, so a state of thousands of cells is never held
whole in memory (the point of moving it through a file when a context grows).
"""

from __future__ import annotations

import builtins
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edgeguard.errors import RuntimeFailure

GGML_F16, GGML_Q8_0, GGML_BF16 = 1, 8, 30  # ggml_type values
_BLOCK = 32  # q8_0: 32 values share one f16 scale (34 bytes)
_Q8_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", _BLOCK)])
BYTES_HEADER = 8  # what precedes n_stream in llama_state_seq_get_data's output


@dataclass(frozen=True)
class Layout:
    k_type: int  # GGML_F16, GGML_BF16 or GGML_Q8_0
    v_type: int  # GGML_F16, GGML_BF16 or GGML_Q8_0 (only f16 is ever transposed)
    v_trans: bool  # V transposed: plain attention


@dataclass(frozen=True)
class Rotations:
    """Hadamard block sizes llama.cpp applies to quantized keys and values (0: none)."""

    k: int
    v: int


class _Reader:
    """Reads a state, copying what it reads to ``dst`` unless told otherwise."""

    def __init__(self, src: BinaryIO, dst: BinaryIO | None) -> None:
        self.src, self.dst = src, dst

    def take(self, n: int, copy: bool = True) -> bytes:
        piece = self.src.read(n)
        if len(piece) != n:
            raise RuntimeFailure("a sequence state is shorter than its own header says")
        if copy and self.dst is not None:
            self.dst.write(piece)
        return piece

    def skip(self, n: int) -> None:
        """Move past ``n`` bytes without reading them (a peek: nothing is copied)."""
        here = self.src.tell()
        if here + n > self.src.seek(0, io.SEEK_END):
            raise RuntimeFailure("a sequence state is shorter than its own header says")
        self.src.seek(here + n)

    def int(self, size: builtins.int = 4, copy: bool = True) -> builtins.int:
        return int.from_bytes(self.take(size, copy), "little")

    def write(self, *pieces: bytes) -> None:
        if self.dst is not None:
            for p in pieces:
                self.dst.write(p)

    def cells(self) -> builtins.int:
        """One stream's cell count and cell metadata (copied); 0 for an empty stream."""
        n = self.int()
        for _ in range(n):
            self.take(4)  # pos
            self.take(4 * self.int())  # seq ids
        return n


def _u32(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


def _u64(v: int) -> bytes:
    return int(v).to_bytes(8, "little")


def _row_values(ggml_type: int, row_bytes: int) -> int:
    if ggml_type in (GGML_F16, GGML_BF16):
        return row_bytes // 2
    if ggml_type == GGML_Q8_0:
        return row_bytes // _Q8_BLOCK.itemsize * _BLOCK
    raise RuntimeFailure(f"cannot convert a KV cache of ggml type {ggml_type}")


def quantize_q8_0(x: np.ndarray) -> bytes:
    """Rows of floats as ggml q8_0 blocks: per 32 values an f16 scale max|x|/127 and int8
    values rounded to nearest (ties to even, as llama.cpp's AVX kernels do)."""
    blocks = np.asarray(x, np.float32).reshape(-1, _BLOCK)
    d = np.abs(blocks).max(axis=1) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    out = np.empty(len(blocks), _Q8_BLOCK)
    out["d"] = d.astype(np.float16)
    out["qs"] = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8)
    return out.tobytes()


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values as bf16 bit patterns, rounded to nearest even (ggml's conversion; NaN stays NaN)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


def dequantize_q8_0(data: bytes) -> np.ndarray:
    blocks = np.frombuffer(data, _Q8_BLOCK)
    return (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def rotations(head_dim: int) -> Rotations:
    """The Hadamard blocks llama.cpp rotates a quantized K and V by, for this head size."""
    if head_dim <= 0 or head_dim % 64 or os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0").strip() not in ("", "0"):
        return Rotations(0, 0)
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return Rotations(n, 64)


def hadamard(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` (a multiple of ``n`` values) times the orthonormal n x n Walsh-Hadamard matrix in
    Sylvester order, block by block: a fast transform, log2(n) butterfly passes."""
    y: np.ndarray = np.asarray(x, np.float32).reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(len(y), n // (2 * h), 2, h)
        y = np.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), axis=2)
        h *= 2
    return y.reshape(-1) * np.float32(1 / np.sqrt(n))


def _values(data: bytes, ggml_type: int, rot: int) -> np.ndarray:
    """Stored rows as plain float32 values (dequantized and rotated back)."""
    if ggml_type == GGML_BF16:
        return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    if ggml_type == GGML_F16:
        return np.frombuffer(data, np.float16).astype(np.float32)
    if ggml_type == GGML_Q8_0:
        x = dequantize_q8_0(data)
        return hadamard(x, rot) if rot else x
    raise RuntimeFailure(f"cannot convert a KV cache of ggml type {ggml_type}")


def _stored(x: np.ndarray, ggml_type: int, rot: int) -> bytes:
    """Plain values as rows of ``ggml_type`` (rotated and quantized for q8_0)."""
    if ggml_type == GGML_BF16:
        return to_bf16(x).tobytes()
    if ggml_type == GGML_F16:
        return x.astype(np.float16).tobytes()
    if ggml_type == GGML_Q8_0:  # (row lengths checked by _row_bytes first)
        return quantize_q8_0(hadamard(x, rot) if rot else x)
    raise RuntimeFailure(f"cannot convert a KV cache to ggml type {ggml_type}")


_CHUNK = 512  # cells converted at a time: a few MB of float32 temporaries, whatever the context


def _row_bytes(ggml_type: int, values: int) -> int:
    if ggml_type in (GGML_F16, GGML_BF16):
        return 2 * values
    if values % _BLOCK:
        raise RuntimeFailure(f"rows of {values} values cannot be stored as q8_0 (blocks of {_BLOCK})")
    return values // _BLOCK * _Q8_BLOCK.itemsize


def _rows(data: bytes, cells: int, trans: bool, ggml_type: int, to_type: int, rot: int):
    """A layer's rows (cell-major; ``trans``: given element-major, f16) re-stored as
    ``to_type``, a chunk of cells at a time."""
    if trans:
        whole = np.frombuffer(data, np.float16).reshape(-1, cells)
        for c in range(0, cells, _CHUNK):
            yield _stored(whole[:, c:c + _CHUNK].T.astype(np.float32).reshape(-1), to_type, rot)
        return
    row = len(data) // cells
    for c in range(0, cells, _CHUNK):
        yield _stored(_values(data[c * row:(c + _CHUNK) * row], ggml_type, rot), to_type, rot)


def convert(src: BinaryIO, dst: BinaryIO, header: int, to: Layout, rot: Rotations) -> None:
    """Copy the state in ``src`` (``header`` bytes first) to ``dst`` in layout ``to``; ``rot``:
    the model's ``rotations``."""
    if to.v_trans and to.v_type != GGML_F16:
        raise RuntimeFailure("llama.cpp keeps a quantized V cache untransposed")
    r = _Reader(src, dst)
    r.take(header)
    for _ in range(r.int()):  # streams
        cells = r.cells()
        if cells == 0:
            continue
        trans = bool(r.int(copy=False))
        n_layer = r.int(copy=False)
        r.write(_u32(to.v_trans), _u32(n_layer))
        for _ in range(n_layer):
            k_type = r.int(copy=False)
            row = r.int(8, copy=False)
            data = r.take(cells * row, copy=False)
            if k_type == to.k_type:
                r.write(_u32(k_type), _u64(row), data)
                continue
            r.write(_u32(to.k_type), _u64(_row_bytes(to.k_type, _row_values(k_type, row))))
            r.write(*_rows(data, cells, False, k_type, to.k_type, rot.k))
        for _ in range(n_layer):
            v_type = r.int(copy=False)
            if trans:
                el, n_embd = r.int(copy=False), r.int(copy=False)
                data = r.take(n_embd * el * cells, copy=False)
                head = _u32(v_type) + _u32(el) + _u32(n_embd)
            else:
                row = r.int(8, copy=False)
                data = r.take(cells * row, copy=False)
                head = _u32(v_type) + _u64(row)
                n_embd = _row_values(v_type, row)
            if (v_type, trans) == (to.v_type, to.v_trans):
                r.write(head, data)
                continue
            if trans and v_type != GGML_F16:
                raise RuntimeFailure(f"a transposed V cache of ggml type {v_type}")
            if to.v_trans:  # element-major f16: the whole layer at once (only ever from cell-major rows)
                v = _values(data, v_type, rot.v).reshape(cells, n_embd)
                r.write(_u32(GGML_F16), _u32(2), _u32(n_embd), np.ascontiguousarray(v.T).astype(np.float16).tobytes())
            else:
                r.write(_u32(to.v_type), _u64(_row_bytes(to.v_type, n_embd)))
                r.write(*_rows(data, cells, trans, v_type, to.v_type, rot.v))
    if src.read(1):
        raise RuntimeFailure("a sequence state has bytes after its last stream")


def layout_of(src: BinaryIO, header: int) -> Layout | None:
    """The layout of the state in ``src`` (None: it holds no cells)."""
    r = _Reader(src, None)
    r.take(header)
    for _ in range(r.int()):
        cells = r.cells()
        if cells:
            trans, n_layer = bool(r.int()), r.int()
            if not n_layer:
                return None
            k_type = r.int()
            r.skip(cells * r.int(8))
            for _ in range(n_layer - 1):  # the other layers' keys
                r.int()
                r.skip(cells * r.int(8))
            return Layout(k_type, r.int(), trans)
    return None


def convert_bytes(state: bytes, to: Layout, rot: Rotations) -> bytes:
    """A ``llama_state_seq_get_data`` state in layout ``to`` (unchanged if it is already)."""
    if layout_of(io.BytesIO(state), BYTES_HEADER) in (None, to):
        return state
    out = io.BytesIO()
    convert(io.BytesIO(state), out, BYTES_HEADER, to, rot)
    return out.getvalue()


_FILE_MAGIC = 0x67677371  # LLAMA_STATE_SEQ_MAGIC, "ggsq"


def _file_header(f: BinaryIO) -> int:
    """Bytes before n_stream in a state file: magic, version, token count, tokens."""
    head = f.read(12)
    if len(head) < 12 or int.from_bytes(head[:4], "little") != _FILE_MAGIC:
        raise RuntimeFailure("not a llama.cpp sequence state file")
    f.seek(0)
    return 12 + 4 * int.from_bytes(head[8:12], "little")


def convert_file(path: str | os.PathLike[str], to: Layout, rot: Rotations) -> bool:
    """Rewrite a ``llama_state_seq_save_file`` file in layout ``to``, in place (through a
    temporary file beside it); False when it already had that layout."""
    path = Path(path)
    with path.open("rb") as f:
        header = _file_header(f)
        if layout_of(f, header) in (None, to):
            return False
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with open(path, "rb", buffering=1 << 20) as src, os.fdopen(fd, "wb") as dst:
            convert(src, dst, header, to, rot)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
