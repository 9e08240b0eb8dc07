"""A llama.cpp context with many sequences: decode them together, read logits or hidden states.

With ``edgeguard.runtime.llama_model`` (library, model loading, Vocab), the only modules that import
``llama_cpp``. The KV cache is unified: every sequence draws cells from one pool of ``n_ctx``,
and a prefix copied from one sequence to another shares its cells instead of duplicating them.
A Backend is not thread-safe; ``edgeguard.engines.core`` serialises access to it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from edgeguard.errors import ModelError, RuntimeFailure, UsageError
from edgeguard.runtime import decode_shapes, gguf_meta, kv_state
from edgeguard.runtime.kernels import kv_type_problem
from edgeguard.runtime.llama_model import (  # noqa: F401  (re-exported: the llama.cpp layer's API)
    Vocab,
    check_threads,
    choose_device,
    cpu_extra_buffer_types,
    default_threads,
    devices,
    gpu_offload_supported,
    init_llama,
    load_model,
    native_error,
    one_line,
    system_info,
)

_PREFIX_MAGIC = b"EGKVSEQ2"  # 2: a sha256 of the content follows the magic
# kv_type -> (K, V) ggml types. "q8_0-keys": q8_0 keys and f16 values, which plain attention
# can read (a q8_0 V needs flash attention): 0.77x of f16's memory, and faster than f16 at long
# contexts on a CPU (less to read per step).
_KV_TYPES = {"f16": (llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F16),
             "q8_0-keys": (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_F16),
             "q8_0": (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q8_0)}
GGML_TYPE_BF16 = 30  # ggml.h (llama_cpp does not export it)
MAX_SEQUENCES = 255  # LLAMA_MAX_SEQ in llama.cpp 0.3.36 (256), less the padding sequence

log = logging.getLogger("edgeguard.runtime.backend")


class _Batch:
    """A reusable llama_batch (token ids or input-embedding rows) with numpy views on it."""

    def __init__(self, n_batch: int, n_embd: int) -> None:
        self.raw = llama_cpp.llama_batch_init(n_batch, n_embd, 1)
        b = self.raw
        self.pos = np.ctypeslib.as_array(b.pos, shape=(n_batch,))
        self.output = np.ctypeslib.as_array(b.logits, shape=(n_batch,))
        self.data = (np.ctypeslib.as_array(b.embd, shape=(n_batch, n_embd)) if n_embd
                     else np.ctypeslib.as_array(b.token, shape=(n_batch,)))
        np.ctypeslib.as_array(b.n_seq_id, shape=(n_batch,))[:] = 1
        self._seq_ptrs = [b.seq_id[i] for i in range(n_batch)]

    def set_seqs(self, seqs: np.ndarray) -> None:
        for ptr, seq in zip(self._seq_ptrs, seqs.tolist()):
            ptr[0] = seq

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.raw)


def _check_context(n_ctx: int, n_batch: int, n_seq: int, kv_type: str) -> None:
    """A UsageError for a context llama.cpp would refuse, or abort the process on."""
    if kv_type not in _KV_TYPES:
        raise UsageError(f"kv_type must be one of {', '.join(_KV_TYPES)}, got {kv_type!r}")
    if n_ctx < 1 or n_batch < 1 or not 1 <= n_seq <= MAX_SEQUENCES:
        raise UsageError(f"n_ctx, n_batch and n_seq (<= {MAX_SEQUENCES}) must be positive "
                         f"(got {n_ctx}, {n_batch}, {n_seq})")
    # llama.cpp reserves an output row per sequence (the padding one included) in
    # min(n_ctx, n_batch), and aborts if short
    if n_batch <= n_seq or n_ctx <= n_seq:
        raise UsageError(f"n_ctx ({n_ctx}) and n_batch ({n_batch}) must be more than n_seq ({n_seq})")


class Backend:
    """One llama.cpp model and one context holding up to ``n_seq`` sequences.

    ``mode="logits"`` reads next-token logits; ``mode="embeddings"`` reads the final-norm hidden
    state of every requested position (pooling none). llama.cpp outputs every token of a batch
    in embeddings mode and still computes the vocabulary projection for each: a backbone GGUF
    with a tiny dummy vocabulary, fed input-embedding rows, avoids that cost.

    ``n_past[seq]`` is how many positions each sequence holds. The single-sequence methods
    (``eval``, ``truncate``, ``state``, ``restore``) act on sequence 0 unless told otherwise.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike[str],
        *,
        n_ctx: int,
        mode: str = "logits",
        n_threads: int | None = None,
        n_batch: int = 512,
        n_seq: int = 1,
        n_gpu_layers: int = 0,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        kv_fallback: str | None = None,
        repack: bool = True,
        verbose: bool = False,
    ) -> None:
        """``kv_type`` "q8_0" halves the KV cache's memory (llama.cpp then needs flash
        attention), "q8_0-keys" quantizes the keys only; ``kv_fallback``: the type to take
        instead when this model's head size rules ``kv_type`` out (None: a UsageError);
        ``repack=False`` leaves the quantized weights in the memory-mapped file (shared page
        cache) instead of the private copy that llama.cpp's faster CPU kernels need."""
        if mode not in ("logits", "embeddings"):
            raise UsageError(f"mode must be 'logits' or 'embeddings', got {mode!r}")
        _check_context(n_ctx, n_batch, n_seq, kv_type)
        threads = default_threads() if n_threads is None else check_threads(n_threads)
        self.mode = mode
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_seq = n_seq
        self.kv_type = kv_type
        self.kv_fallback = kv_fallback
        self.flash_attn = flash_attn
        self.n_threads = threads
        self.n_past = [0] * n_seq
        self._shared = [0] * n_seq  # leading positions whose cells belong to another sequence
        self._path = Path(gguf_path)
        self._ctx = None
        self._batches: dict[str, _Batch] = {}

        self.n_gpu_layers = n_gpu_layers
        self._model: ctypes.c_void_p | None
        self._model, self.kernel_plan, self.buffers = load_model(
            gguf_path, vocab_only=False, n_gpu_layers=n_gpu_layers, verbose=verbose, repack=repack)
        # the vocabulary's matrix is left out: its kernel follows the output rows, not the tokens
        tensors = gguf_meta.tensor_types(gguf_path)
        weights = (["F16"] if tensors is None  # unreadable here: assume the stricter rules
                   else [kind for name, kind, dims in tensors
                         if dims == 2 and name not in ("token_embd.weight", "output.weight")])
        self.shape_rules = decode_shapes.rules_for(
            weights, repacked=self.kernel_plan.extra_bufts or bool(self.kernel_plan.repack_tensors))
        try:
            self._vocab = Vocab._borrow(self._model, gguf_path)
            self.n_vocab = self._vocab.n_vocab
            self.n_embd = llama_cpp.llama_model_n_embd(self._model)
            self._ctx = self._new_context()
            self._memory = llama_cpp.llama_get_memory(self._ctx)
        except BaseException:
            self.close()
            raise

    def _new_context(self):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx + self.spare_cells  # padding tokens never take a token's room
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq + 1  # the last one holds padding tokens (decode_shapes)
        params.kv_unified = True  # one pool of cells for all sequences; shared prefixes share cells
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.embeddings = self.mode == "embeddings"
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.flash_attn_type = {
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[self.flash_attn]
        problem = self.kv_problem(self.kv_type)
        if problem and self.kv_fallback and not self.kv_problem(self.kv_fallback):
            log.info("KV cache %s instead of %s: %s", self.kv_fallback, self.kv_type, problem)
            self.kv_type, problem = self.kv_fallback, None
        if problem:
            raise UsageError(problem)
        params.type_k, params.type_v = self.cache_types
        if self.kv_type == "q8_0" and self.flash_attn is None:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        native_error[0] = ""
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            reason = one_line(native_error[0]) or "llama.cpp returned no context"
            raise ModelError(f"cannot create a context for {self._path}: {reason}")
        if llama_cpp.llama_n_ctx(ctx) < self.n_ctx + self.spare_cells:
            llama_cpp.llama_free(ctx)
            raise ModelError(f"llama.cpp gave a context smaller than n_ctx={self.n_ctx}")
        return ctx

    def reshape(self, *, n_ctx: int, n_batch: int, kv_type: str, flash_attn: bool | None) -> None:
        """Replace the context with an empty one of another size, batch, KV type or attention
        kind, keeping the loaded weights (a reload would read and repack them again: ~1 s for
        the 0.6B). Every sequence is empty afterwards; the caller moves their states over."""
        _check_context(n_ctx, n_batch, self.n_seq, kv_type)
        if self._model is None:
            raise RuntimeFailure("the backend is closed")
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if n_batch != self.n_batch:
            for batch in self._batches.values():
                batch.free()
            self._batches = {}
        self.n_ctx, self.n_batch, self.kv_type, self.flash_attn = n_ctx, n_batch, kv_type, flash_attn
        self.n_past = [0] * self.n_seq
        self._shared = [0] * self.n_seq
        self._ctx = self._new_context()
        self._memory = llama_cpp.llama_get_memory(self._ctx)

    def _batch(self, kind: str) -> _Batch:
        if kind not in self._batches:
            self._batches[kind] = _Batch(self.n_batch, self.n_embd if kind == "embd" else 0)
        return self._batches[kind]

    @property
    def vocab(self) -> Vocab:
        """The tokenizer of the loaded model (valid until ``close()``)."""
        return self._vocab

    @property
    def weights_mb(self) -> float:
        return llama_cpp.llama_model_size(self._model) / 2**20

    @property
    def head_dim(self) -> int:
        arch = self._vocab.meta("general.architecture") or ""
        head_dim = self._vocab.meta(f"{arch}.attention.key_length")
        return int(head_dim) if head_dim else self.n_embd // max(1, llama_cpp.llama_model_n_head(self._model))

    @property
    def head_dim_v(self) -> int:
        arch = self._vocab.meta("general.architecture") or ""
        head_dim = self._vocab.meta(f"{arch}.attention.value_length")
        return int(head_dim) if head_dim else self.head_dim

    def kv_problem(self, kv_type: str) -> str | None:
        """Why this model cannot use a ``kv_type`` cache (``kernels.kv_type_problem``); None if it can."""
        return kv_type_problem(kv_type, self.head_dim, self.head_dim_v)

    @property
    def kv_values_per_token(self) -> int:
        """Values one cached token holds: keys and values of every layer's KV heads."""
        layers = llama_cpp.llama_model_n_layer(self._model)
        return 2 * layers * llama_cpp.llama_model_n_head_kv(self._model) * (self.head_dim + self.head_dim_v) // 2

    @property
    def shaped(self) -> bool:
        """Whether decodes are cut into calls of fixed kinds (``decode_shapes``): on the CPU."""
        return self.n_gpu_layers == 0

    @property
    def cache_types(self) -> tuple[int, int]:
        """The ggml types of the K and V cache. With flash attention on the CPU an f16 cache
        keeps its keys in bf16: K and V of different types make llama.cpp's CPU flash attention
        take its per-query kernel at every decode shape (``decode_shapes``), so a token's
        numbers do not depend on what shares its call, for the bytes of an all-f16 cache. Keys
        in bf16 rather than values: that kernel adds f16 value rows directly but converts bf16
        ones row by row through a scalar loop (measured: a Gen check 0.84x and a Stream token
        0.93x of bf16 values; f32 keys cost 1.5x the memory)."""
        k, v = _KV_TYPES[self.kv_type]
        if self.kv_type == "f16" and self.flash_attn and self.shaped:
            k = GGML_TYPE_BF16
        return k, v

    @property
    def spare_cells(self) -> int:
        """Cells the context holds besides its ``n_ctx`` tokens: room for a call's padding
        tokens (``decode_shapes``)."""
        return self.shape_rules.spare_cells if self.shaped else 0

    @property
    def cached(self) -> int:
        """KV cells in use over all sequences (a shared prefix counts once)."""
        return sum(self.n_past) - sum(self._shared)

    def _live_ctx(self):
        if self._ctx is None:
            raise RuntimeFailure("the backend is closed")
        return self._ctx

    def _check_seq(self, seq: int) -> None:
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < self.n_seq:
            raise UsageError(f"sequence {seq!r} is not in [0, {self.n_seq})")

    # -- decoding ------------------------------------------------------------------------------
    def _inputs(self, values) -> tuple[str, np.ndarray]:
        if isinstance(values, np.ndarray) and values.ndim == 2:
            data = np.ascontiguousarray(values, dtype=np.float32)
            if data.shape[1] != self.n_embd:
                raise UsageError(f"embd must have shape [n, {self.n_embd}], got {list(data.shape)}")
            return "embd", data
        ids = np.asarray(values, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise UsageError(f"token ids must lie in [0, {self.n_vocab})")
        return "token", ids.astype(np.int32)

    def decode(self, inputs: Mapping[int, object], outputs: Mapping[int, Sequence[int]], *,
               wide: bool = True) -> dict[int, np.ndarray]:
        """Append inputs to several sequences in shared ``llama_decode`` calls; read outputs.

        ``inputs[seq]``: token ids, or input-embedding rows [n, n_embd] (all sequences the same
        kind). ``outputs[seq]``: indices into that sequence's new inputs (negative from the end).
        Returns ``{seq: float32 [len(outputs[seq]), n_vocab or n_embd]}``. On failure every
        sequence is rolled back to where it was. ``wide``: the inputs are known whole (calls of
        8+ tokens); False for tokens fed as they arrive (calls of up to 7): ``decode_shapes``.
        """
        ctx = self._live_ctx()
        kinds, parts = set(), []
        for seq, values in inputs.items():
            self._check_seq(seq)
            kind, data = self._inputs(values)
            if len(data):
                kinds.add(kind)
                parts.append((seq, data))
        if len(kinds) > 1:
            raise UsageError("decode needs token ids for every sequence or embeddings for every sequence")
        if not parts:
            raise UsageError("decode needs at least one input")
        kind = kinds.pop()
        total = sum(len(d) for _, d in parts)
        if self.cached + total > self.n_ctx:
            raise RuntimeFailure(
                f"context overflow: {self.cached} cached + {total} new tokens > n_ctx {self.n_ctx}")
        seqs = np.concatenate([np.full(len(d), s, np.int32) for s, d in parts])
        pos = np.concatenate([np.arange(self.n_past[s], self.n_past[s] + len(d), dtype=np.int32) for s, d in parts])
        data = np.concatenate([d for _, d in parts])
        wanted = np.zeros(total, np.int8)
        where: list[tuple[int, int, int]] = []  # (seq, output slot, flat row)
        offset = 0
        for seq, d in parts:
            for slot, o in enumerate(outputs.get(seq, ())):
                row = o + len(d) if o < 0 else o
                if not 0 <= row < len(d):
                    raise UsageError(f"output {o} out of range for {len(d)} inputs of sequence {seq}")
                wanted[offset + row] = 1
                where.append((seq, slot, offset + row))
            offset += len(d)
        width = self.n_vocab if self.mode == "logits" else self.n_embd
        read = llama_cpp.llama_get_logits_ith if self.mode == "logits" else llama_cpp.llama_get_embeddings_ith
        result = {seq: np.empty((len(outputs.get(seq, ())), width), np.float32) for seq, _ in parts}
        before = list(self.n_past)
        batch = self._batch(kind)
        logits = self.mode == "logits"
        if self.shaped:
            pieces = decode_shapes.plan(total, wanted.astype(bool).tolist() if logits else None,
                                        wide=wide, n_batch=self.n_batch, rules=self.shape_rules)
        else:
            pieces = [decode_shapes.Piece(a, min(a + self.n_batch, total)) for a in range(0, total, self.n_batch)]
        padding = max(p.pad for p in pieces)
        if self.cached + total + padding > llama_cpp.llama_n_ctx(ctx):  # cells: n_ctx up to a multiple of 256
            raise RuntimeFailure(f"context overflow: {self.cached} cached + {total} new tokens + {padding} "
                                 f"padding cells > {llama_cpp.llama_n_ctx(ctx)} cells")
        pad = self.n_seq  # the padding sequence: tokens from position 0, removed after each call
        try:
            for piece in pieces:
                start, m, n = piece.start, piece.stop - piece.start, piece.size
                batch.data[:m] = data[start:start + m]
                batch.pos[:m] = pos[start:start + m]
                # llama.cpp outputs every token in embeddings mode; saying so avoids its warning.
                batch.output[:m] = wanted[start:start + m] if logits else 1
                call_seqs = seqs[start:start + m]
                if piece.pad:
                    batch.data[m:n] = 0
                    batch.pos[m:n] = np.arange(piece.pad, dtype=np.int32)
                    batch.output[m:n] = 0 if logits else 1
                    call_seqs = np.concatenate([call_seqs, np.full(piece.pad, pad, np.int32)])
                if piece.extra_output >= 0:
                    batch.output[piece.extra_output] = 1
                batch.set_seqs(call_seqs)
                batch.raw.n_tokens = n
                native_error[0] = ""
                rc = llama_cpp.llama_decode(ctx, batch.raw)
                if piece.pad:
                    llama_cpp.llama_memory_seq_rm(self._memory, pad, -1, -1)
                if rc != 0:
                    reason = one_line(native_error[0])
                    raise RuntimeFailure(f"llama_decode failed (code {rc})" + (f": {reason}" if reason else ""))
                for s in np.unique(seqs[start:start + m]).tolist():
                    self.n_past[s] += int((seqs[start:start + m] == s).sum())
                for seq, slot, row in where:
                    if start <= row < start + m:
                        ptr = read(ctx, row - start)
                        if not ptr:
                            raise RuntimeFailure(f"llama.cpp returned no output for input {row}")
                        result[seq][slot] = np.ctypeslib.as_array(ptr, shape=(width,))
        except BaseException:
            for seq, _ in parts:
                self.truncate(before[seq], seq)
            raise
        return result

    def eval(self, tokens: Sequence[int] | None = None, *, embd: np.ndarray | None = None,
             outputs: Sequence[int] = (-1,), seq: int = 0) -> np.ndarray:
        """Append tokens (or input-embedding rows [n, n_embd]) to one sequence and read outputs
        (indices into the new inputs). Returns float32 [len(outputs), n_vocab or n_embd]."""
        if (tokens is None) == (embd is None):
            raise UsageError("eval needs exactly one of tokens or embd")
        values: Sequence[int] | np.ndarray
        if tokens is not None:
            values = tokens
        else:
            rows = np.asarray(embd, dtype=np.float32)
            if rows.ndim != 2:
                raise UsageError(f"embd must have shape [n, {self.n_embd}], got {list(rows.shape)}")
            values = rows
        if len(values) == 0:
            raise UsageError("eval needs at least one token")
        return self.decode({seq: values}, {seq: list(outputs)})[seq]

    # -- sequences -----------------------------------------------------------------------------
    def truncate(self, n_keep: int, seq: int = 0) -> None:
        """Forget every position >= ``n_keep`` of one sequence."""
        self._live_ctx()
        self._check_seq(seq)
        if not 0 <= n_keep <= self.n_past[seq]:
            raise UsageError(f"n_keep must lie in [0, {self.n_past[seq]}], got {n_keep}")
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, n_keep, -1):
            raise RuntimeFailure(f"llama.cpp could not drop positions >= {n_keep} of sequence {seq}")
        self.n_past[seq] = n_keep
        self._shared[seq] = min(self._shared[seq], n_keep)

    def share(self, src: int, dst: int, n: int) -> None:
        """Make the first ``n`` positions of ``src`` the whole content of ``dst`` (the cells are
        shared, not copied)."""
        self._live_ctx()
        self._check_seq(src)
        self._check_seq(dst)
        if not 0 <= n <= self.n_past[src]:
            raise UsageError(f"cannot share {n} of {self.n_past[src]} positions of sequence {src}")
        self.truncate(0, dst)
        if n:
            llama_cpp.llama_memory_seq_cp(self._memory, src, dst, 0, n)
        self.n_past[dst] = n
        self._shared[dst] = n

    def state(self, seq: int = 0) -> bytes:
        """The cached state of one sequence (its KV cells), for ``restore`` on a backend of the
        same model (a context of any size that holds it)."""
        ctx = self._live_ctx()
        self._check_seq(seq)
        if self.n_past[seq] == 0:
            return b""
        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq)
        if written == 0:
            raise RuntimeFailure("llama.cpp could not copy the sequence state")
        return bytes(memoryview(buf)[:written])

    @property
    def layout(self) -> kv_state.Layout | None:
        """How this context lays out its cache (None where llama.cpp picks the attention)."""
        if self.flash_attn is None:
            return None
        k, v = self.cache_types
        return kv_state.Layout(k, v, v_trans=not self.flash_attn)

    @property
    def rotations(self) -> kv_state.Rotations:
        """The Hadamard blocks llama.cpp rotates a quantized cache by (kv_state)."""
        return kv_state.rotations(self.head_dim)

    def _convert_failed(self, e: Exception) -> bool:
        log.warning("cannot convert a sequence state to this context's cache layout: %s", e)
        return False

    def restore(self, state: bytes, n_past: int, seq: int = 0) -> bool:
        """Replace one sequence with ``state`` of ``n_past`` positions, converted first when it
        was saved with another cache layout (attention kind, K type); False (sequence left
        empty) when llama.cpp refuses it."""
        if self.layout is not None:
            try:
                state = kv_state.convert_bytes(state, self.layout, self.rotations)
            except RuntimeFailure as e:
                return self._convert_failed(e)
        return self._replace(seq, n_past, lambda ctx: self._set_state(ctx, state, seq))

    def state_to_file(self, path: str | os.PathLike[str], seq: int = 0) -> bool:
        """Write one sequence's cached state to ``path`` (llama.cpp copies it layer by layer,
        never holding the whole state in memory); False when llama.cpp could not."""
        ctx = self._live_ctx()
        self._check_seq(seq)
        no_tokens = (llama_cpp.llama_token * 1)()
        native_error[0] = ""
        if llama_cpp.llama_state_seq_save_file(ctx, os.fsencode(path), seq, no_tokens, 0) <= 0:
            return False
        # llama.cpp ignores a failed last write (a full disk) and its loader aborts the process
        # on a short file: check the size (the file adds a 4-byte token count to the state).
        return os.path.getsize(path) == llama_cpp.llama_state_seq_get_size(ctx, seq) + 4

    def restore_from_file(self, path: str | os.PathLike[str], n_past: int, seq: int = 0) -> bool:
        """``restore`` from a ``state_to_file`` file, read layer by layer (converted in place
        first when saved with another cache layout); False (sequence left empty) when it does
        not fit or llama.cpp refuses it."""
        if self.layout is not None:
            try:
                kv_state.convert_file(path, self.layout, self.rotations)
            except (RuntimeFailure, OSError) as e:  # OSError: no room for the converted copy
                return self._convert_failed(e)
        def load(ctx) -> bool:
            tokens, count = (llama_cpp.llama_token * 1)(), ctypes.c_size_t(0)
            native_error[0] = ""
            return llama_cpp.llama_state_seq_load_file(ctx, os.fsencode(path), seq, tokens, 1,
                                                       ctypes.byref(count)) > 0
        return self._replace(seq, n_past, load)

    def _replace(self, seq: int, n_past: int, load) -> bool:
        """Empty one sequence, ``load(ctx)`` its new content and check it holds ``n_past``
        positions; False (sequence left empty) when it does not fit or the load fails."""
        ctx = self._live_ctx()
        self._check_seq(seq)
        if not 0 <= n_past <= self.n_ctx - self.cached + self.n_past[seq]:
            return False
        self.truncate(0, seq)
        if n_past == 0:
            return True
        if not (load(ctx) and llama_cpp.llama_memory_seq_pos_max(self._memory, seq) == n_past - 1):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            return False
        self.n_past[seq] = n_past
        return True

    def _set_state(self, ctx, state: bytes, seq: int) -> bool:
        src = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        native_error[0] = ""
        if llama_cpp.llama_state_seq_set_data(ctx, src, len(state), seq) != 0:
            return True
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        return False

    # -- persisted prefixes --------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, object]:
        """What a saved prefix must match: model shape, mode and a digest of the file's ends."""
        digest = hashlib.sha256()
        size = self._path.stat().st_size
        with self._path.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
        return {"file_size": size, "file_ends_sha256": digest.hexdigest(), "mode": self.mode,
                "kv_type": self.kv_type, "flash_attn": bool(self.flash_attn),  # the head computed alike
                "n_embd": self.n_embd, "n_vocab": self.n_vocab,
                "n_layer": llama_cpp.llama_model_n_layer(self._model),
                # how the numbers were computed: a state from another build, kernel switch or
                # decode shape would give other scores than computing the prefix now
                "llama_cpp": getattr(llama_cpp, "__version__", ""), "cache_types": list(self.cache_types),
                "decode_shapes": [decode_shapes.WIDE_MIN, *dataclasses.astuple(self.shape_rules)],
                "switches": {name: os.environ.get(name) for name in decode_shapes.SWITCHES}}

    def save_prefix(self, path: str | os.PathLike[str], seq: int = 0) -> None:
        """Write one sequence's cached state and its token count to ``path`` atomically.

        Layout: magic, sha256 of everything after it, header length, JSON header, KV state.
        The digest covers the whole content, so a damaged file is caught before llama.cpp
        sees it (a flipped byte inside the KV state would otherwise change verdicts silently).
        """
        state = self.state(seq)
        header = json.dumps({"n_past": self.n_past[seq], **self._fingerprint()}).encode()
        body = len(header).to_bytes(4, "little") + header + state
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_PREFIX_MAGIC + hashlib.sha256(body).digest() + body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_prefix(self, path: str | os.PathLike[str], seq: int = 0) -> bool:
        """Replace one sequence with a saved prefix; False (sequence left empty) when it does
        not fit.

        A file whose checksum does not match its content is a miss (with one warning): the
        caller recomputes the prefix and rewrites the file, so damage never reaches a verdict.
        """
        self._live_ctx()
        try:
            blob = Path(path).read_bytes()
        except OSError:
            return False
        start = len(_PREFIX_MAGIC) + hashlib.sha256().digest_size
        if len(blob) < start + 4 or blob[:len(_PREFIX_MAGIC)] != _PREFIX_MAGIC:
            return False
        if hashlib.sha256(blob[start:]).digest() != blob[len(_PREFIX_MAGIC):start]:
            log.warning("prefix cache %s is damaged (checksum mismatch); recomputing it", path)
            return False
        n_header = int.from_bytes(blob[start:start + 4], "little")
        try:
            header = json.loads(blob[start + 4:start + 4 + n_header])
            n_past = int(header.pop("n_past"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        if header != self._fingerprint():
            return False
        return self.restore(blob[start + 4 + n_header:], n_past, seq)

    def close(self) -> None:
        for batch in self._batches.values():
            batch.free()
        self._batches = {}
        if getattr(self, "_vocab", None) is not None:
            self._vocab.close()
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None) is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
