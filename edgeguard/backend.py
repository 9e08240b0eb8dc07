"""llama.cpp through its C API: tokenize, decode, read logits or hidden states, KV state.

The only module of edgeguard that imports ``llama_cpp``. It uses the low-level bindings, never
the high-level ``Llama`` class, which reserves n_batch x n_vocab floats of logits up front.
Objects here are not thread-safe: give each thread its own ``Backend``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

try:
    # On a CUDA build of llama.cpp, importing onnxruntime after llama.cpp's CUDA libraries were
    # loaded segfaulted inside onnxruntime's import (H200, CUDA 13); the other order works. So
    # onnxruntime, when installed, is always loaded first, whatever order the app imports in.
    import onnxruntime  # noqa: F401
except ImportError:
    pass
import llama_cpp
import numpy as np

from edgeguard import kernels
from edgeguard.errors import ModelError, RuntimeFailure, UsageError
from edgeguard.kernels import KernelPlan, SystemInfo, TensorInfo, amx_allowed, plan_kernels

_GGML_LOG_LEVEL_ERROR = 4  # ggml.h in 0.3.36 (llama_cpp/_logger.py still says 3)
_GGUF_MAGIC = b"GGUF"
_PREFIX_MAGIC = b"EGKVSEQ2"  # 2: a sha256 of the content follows the magic
_SEQ = 0

log = logging.getLogger("edgeguard.backend")

_native_error = [""]
_GGML_LOG_LEVEL_INFO = 2
_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")
_buffer_lines: list[str] = []  # llama.cpp's "<buffer type> model buffer size" lines of a load
_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
_echo_log = [False]  # verbose: llama.cpp's log goes to stderr as well


@llama_cpp.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Kept at module level so ctypes never frees the callback that llama.cpp holds.
    # The first error line since the last reset is kept: it names the cause, later ones don't.
    if _echo_log[0] and text:
        os.write(2, text)
    if level == _GGML_LOG_LEVEL_ERROR and text and not _native_error[0]:
        _native_error[0] = text.decode("utf-8", "replace").strip()
    elif level == _GGML_LOG_LEVEL_INFO and text and b"model buffer size" in text:
        _buffer_lines.append(text.decode("utf-8", "replace"))


_backend_ready = False


def init_llama(verbose: bool) -> None:
    """Initialise llama.cpp once per process; route its log (process-wide: the last call wins)."""
    global _backend_ready
    _echo_log[0] = verbose
    llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def default_threads() -> int:
    """``EDGEGUARD_THREADS`` if set, else the CPUs this process may run on."""
    env = os.environ.get("EDGEGUARD_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UsageError(f"EDGEGUARD_THREADS must be a positive integer, got {env!r}")
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def system_info() -> SystemInfo:
    """What this process's llama.cpp build can do (CPU features, GPU backends)."""
    return SystemInfo.parse(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


def gpu_offload_supported() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def choose_device(requested: str = "auto", *, n_gpu_layers: int | None = None) -> kernels.DeviceChoice:
    """Where to run: ``requested`` ("auto", "cpu", "gpu") against what this build supports."""
    return kernels.choose_device(requested, gpu_offload=gpu_offload_supported(), n_gpu_layers=n_gpu_layers)


def gguf_tensors(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """Name, ggml type and shape of every tensor in a GGUF (read from its header)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(os.fspath(path), "r")
    except Exception as exc:  # gguf raises whatever a damaged header happens to trigger
        raise ModelError(f"cannot load model {path}: its tensor list is unreadable "
                         f"(truncated or damaged GGUF: {type(exc).__name__})") from exc
    return [TensorInfo(t.name, t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in reader.tensors]


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def _ggml():
    """The ggml library llama-cpp-python loaded, with the device functions edgeguard reads."""
    from llama_cpp import _ggml as bound

    lib = bound.libggml
    P, S = ctypes.c_void_p, ctypes.c_size_t
    for name, restype, argtypes in (
        ("ggml_backend_dev_count", S, []),
        ("ggml_backend_dev_get", P, [S]),
        ("ggml_backend_dev_by_type", P, [ctypes.c_int]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [P]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [P]),
        ("ggml_backend_dev_type", ctypes.c_int, [P]),
        ("ggml_backend_dev_memory", None, [P, ctypes.POINTER(S), ctypes.POINTER(S)]),
        ("ggml_backend_dev_backend_reg", P, [P]),
        ("ggml_backend_reg_get_proc_address", P, [P, ctypes.c_char_p]),
        ("ggml_backend_buft_name", ctypes.c_char_p, [P]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}  # enum ggml_backend_dev_type


def devices() -> list[dict[str, object]]:
    """The compute devices llama.cpp sees (CPU, GPUs), with their memory where known."""
    lib = _ggml()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append({
            "name": (lib.ggml_backend_dev_name(dev) or b"").decode(),
            "description": (lib.ggml_backend_dev_description(dev) or b"").decode(),
            "type": _DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
            "memory_total_mb": total.value / 2**20,
            "memory_free_mb": free.value / 2**20,
        })
    return found


@functools.lru_cache(maxsize=1)
def _cpu_extra_bufts() -> dict[str, int]:
    """llama.cpp's extra CPU buffer types by name ("CPU_REPACK", "AMX", ...): their addresses."""
    lib = _ggml()
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return {}
    address = lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_dev_backend_reg(dev),
                                                    b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return {}
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    found, array = {}, get_extra(dev)
    i = 0
    while array and array[i]:
        found[lib.ggml_backend_buft_name(array[i]).decode()] = array[i]
        i += 1
    return found


def cpu_extra_buffer_types() -> list[str]:
    """Names of llama.cpp's extra CPU buffer types in this build and on this CPU."""
    return list(_cpu_extra_bufts())


def kernel_plan(path: str | os.PathLike[str], *, repack: bool, n_gpu_layers: int) -> KernelPlan:
    """How this build should place this GGUF's weights (see ``edgeguard.kernels``)."""
    info = system_info()
    needs_tensors = repack and info.amx and not amx_allowed() and n_gpu_layers == 0
    tensors = gguf_tensors(path) if needs_tensors else []
    plan = plan_kernels(info, tensors, repack=repack, on_gpu=n_gpu_layers != 0, allow_amx=amx_allowed())
    if plan.repack_tensors and "CPU_REPACK" not in _cpu_extra_bufts():
        return KernelPlan(False, (), plan.reason + "; this build has no CPU_REPACK buffer type")
    return plan


def _load_model(path: str | os.PathLike[str], *, vocab_only: bool, n_gpu_layers: int,
                verbose: bool, repack: bool = True) -> tuple[ctypes.c_void_p, KernelPlan, dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelError(f"not a GGUF file: {path}")
    init_llama(verbose)
    plan = (KernelPlan(False, (), "vocabulary only") if vocab_only
            else kernel_plan(path, repack=repack, n_gpu_layers=n_gpu_layers))
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.n_gpu_layers = n_gpu_layers
    # Repacking quantized weights for faster CPU kernels keeps a second copy of them in RAM.
    params.use_extra_bufts = plan.extra_bufts
    overrides = None
    if plan.repack_tensors:
        patterns = [p.encode() for p in plan.overrides()]
        repack_buft = _cpu_extra_bufts()["CPU_REPACK"]
        overrides = (_BuftOverride * (len(patterns) + 1))(
            *[_BuftOverride(p, repack_buft) for p in patterns], _BuftOverride(None, None))
        params.tensor_buft_overrides = ctypes.addressof(overrides)
    _native_error[0] = ""
    _buffer_lines.clear()
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    del overrides  # llama.cpp reads the patterns only while loading
    if not model:
        reason = _one_line(_native_error[0]) or "llama.cpp returned no model"
        raise ModelError(f"cannot load model {path}: {reason}")
    buffers = {}
    for line in _buffer_lines:
        m = _BUFFER_LINE.search(line)
        if m:
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
    return model, plan, buffers


def _drop_mapped_pages(path: Path) -> None:
    """Let the kernel drop this process's resident pages of the memory-mapped GGUF.

    Repacking reads the quantized weights once from the mapping and keeps them in a buffer of
    its own; their mapped pages would otherwise stay counted in the process's memory for
    nothing. Pages still in use fault back in from the page cache (the mapping is read-only).
    Linux only; elsewhere a no-op.
    """
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return
    target = str(path.resolve())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madv_dontneed = 4
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, madv_dontneed)


class Vocab:
    """The tokenizer of a GGUF, loaded with ``vocab_only`` (no weights are read)."""

    def __init__(self, gguf_path: str | os.PathLike[str], *, verbose: bool = False) -> None:
        self._model, _, _ = _load_model(gguf_path, vocab_only=True, n_gpu_layers=0, verbose=verbose)
        self._owns_model = True
        self._bind(llama_cpp.llama_model_get_vocab(self._model), gguf_path)

    def _bind(self, vocab, path) -> None:
        self._vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        # llama.cpp aborts the process when asked to tokenize with a dummy ("none") vocabulary.
        self._no_tokenizer: str | None = None
        if llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_NONE:
            self._no_tokenizer = f"{path} has no tokenizer (a dummy-vocabulary backbone)"

    @classmethod
    def _borrow(cls, model: ctypes.c_void_p, path: str | os.PathLike[str]) -> Vocab:
        """A view on the vocabulary of a model that someone else loaded and frees."""
        self = cls.__new__(cls)
        self._model = model
        self._owns_model = False
        self._bind(llama_cpp.llama_model_get_vocab(model), path)
        return self

    def _live_vocab(self):
        if self._vocab is None:
            raise RuntimeFailure("the vocabulary is closed")
        if self._no_tokenizer:
            raise ModelError(self._no_tokenizer)
        return self._vocab

    def _tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        vocab = self._live_vocab()
        data = text.encode("utf-8")
        if not data:
            return []
        capacity = len(data) + 8
        for _ in range(2):
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity, False, parse_special)
            if n >= 0:
                return buf[:n]
            capacity = -n
        raise RuntimeFailure(f"llama.cpp could not tokenize a text of {len(data)} bytes")

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``; special-looking text such as ``<|im_end|>`` stays plain text."""
        return self._tokenize(text, parse_special=False)

    def token_id(self, piece: str) -> int:
        """The id of one special or added token, for example ``"<|im_end|>"``."""
        ids = self._tokenize(piece, parse_special=True)
        if len(ids) != 1:
            raise ModelError(f"the vocabulary has no single token for {piece!r} (got {len(ids)})")
        return ids[0]

    def piece(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens rendered as their text)."""
        vocab = self._live_vocab()
        size = 32
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
            if n >= 0:
                return buf.raw[:n]
            size = -n
        raise RuntimeFailure(f"llama.cpp could not render token {token}")

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """The raw bytes of a token sequence, special tokens included as text."""
        vocab = self._live_vocab()
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = max(64, 8 * len(tokens))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(vocab, ids, len(tokens), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n]
            size = -n
        raise RuntimeFailure(f"llama.cpp could not detokenize {len(tokens)} tokens")

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (for example ``tokenizer.chat_template``), None if absent."""
        if self._model is None:
            raise RuntimeFailure("the vocabulary is closed")
        size = 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n + 1
        raise RuntimeFailure(f"llama.cpp could not read metadata {key!r}")

    def close(self) -> None:
        if self._owns_model and self._model is not None:
            llama_cpp.llama_model_free(self._model)
        self._model = None
        self._vocab = None

    def __enter__(self) -> Vocab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _batch_views(batch, n_batch: int, n_embd: int) -> dict[str, np.ndarray]:
    """numpy arrays over the C arrays of a llama_batch, so chunks are filled without Python loops."""
    views = {
        "pos": np.ctypeslib.as_array(batch.pos, shape=(n_batch,)),
        "output": np.ctypeslib.as_array(batch.logits, shape=(n_batch,)),
    }
    if n_embd:
        views["embd"] = np.ctypeslib.as_array(batch.embd, shape=(n_batch, n_embd))
    else:
        views["token"] = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
    np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))[:] = 1
    for i in range(n_batch):
        batch.seq_id[i][0] = _SEQ
    return views


class Backend:
    """One llama.cpp model and one context; every token goes to sequence 0.

    ``mode="logits"`` reads next-token logits; ``mode="embeddings"`` reads the final-norm hidden
    state of every requested position (pooling none). Note that llama.cpp outputs every token of
    a batch in embeddings mode, and still computes the vocabulary projection for each of them:
    a backbone GGUF with a tiny dummy vocabulary, fed input-embedding rows, avoids that cost.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike[str],
        *,
        n_ctx: int,
        mode: str = "logits",
        n_threads: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        repack: bool = True,
        verbose: bool = False,
    ) -> None:
        """``kv_type`` "q8_0" halves the KV cache's memory (llama.cpp then needs flash
        attention); ``repack=False`` saves a second in-RAM copy of the quantized weights that
        llama.cpp otherwise makes for its faster CPU kernels."""
        if mode not in ("logits", "embeddings"):
            raise UsageError(f"mode must be 'logits' or 'embeddings', got {mode!r}")
        if kv_type not in _KV_TYPES:
            raise UsageError(f"kv_type must be one of {', '.join(_KV_TYPES)}, got {kv_type!r}")
        if n_ctx < 1 or n_batch < 1:
            raise UsageError(f"n_ctx and n_batch must be positive (got {n_ctx}, {n_batch})")
        threads = default_threads() if n_threads is None else n_threads
        if threads < 1:
            raise UsageError(f"n_threads must be positive, got {threads}")
        self.mode = mode
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_past = 0
        self.kv_type = kv_type
        self._path = Path(gguf_path)
        self._ctx = None
        self._batches: dict[str, tuple[object, dict[str, np.ndarray]]] = {}

        self.n_gpu_layers = n_gpu_layers
        self._model, self.kernel_plan, self.buffers = _load_model(
            gguf_path, vocab_only=False, n_gpu_layers=n_gpu_layers, verbose=verbose, repack=repack)
        try:
            self._vocab = Vocab._borrow(self._model, gguf_path)
            self.n_vocab = self._vocab.n_vocab
            self.n_embd = llama_cpp.llama_model_n_embd(self._model)
            self._ctx = self._new_context(threads, flash_attn)
            if self.buffers.get("CPU_REPACK") or self.buffers.get("AMX"):
                _drop_mapped_pages(self._path)
            self._memory = llama_cpp.llama_get_memory(self._ctx)
            self._batch("token")
        except BaseException:
            self.close()
            raise

    def _new_context(self, threads: int, flash_attn: bool | None):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.embeddings = self.mode == "embeddings"
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.flash_attn_type = {
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        params.type_k = params.type_v = _KV_TYPES[self.kv_type]
        if self.kv_type != "f16" and flash_attn is None:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        _native_error[0] = ""
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            reason = _one_line(_native_error[0]) or "llama.cpp returned no context"
            raise ModelError(f"cannot create a context for {self._path}: {reason}")
        if llama_cpp.llama_n_ctx(ctx) < self.n_ctx:
            llama_cpp.llama_free(ctx)
            raise ModelError(f"llama.cpp gave a context smaller than n_ctx={self.n_ctx}")
        return ctx

    def _batch(self, kind: str) -> tuple[object, dict[str, np.ndarray]]:
        """The reusable batch for token ids or for input-embedding rows, made on first use."""
        if kind not in self._batches:
            width = self.n_embd if kind == "embd" else 0
            batch = llama_cpp.llama_batch_init(self.n_batch, width, 1)
            self._batches[kind] = (batch, _batch_views(batch, self.n_batch, width))
        return self._batches[kind]

    @property
    def vocab(self) -> Vocab:
        """The tokenizer of the loaded model (valid until ``close()``)."""
        return self._vocab

    def _live_ctx(self):
        if self._ctx is None:
            raise RuntimeFailure("the backend is closed")
        return self._ctx

    def eval(
        self,
        tokens: Sequence[int] | None = None,
        *,
        embd: np.ndarray | None = None,
        outputs: Sequence[int] = (-1,),
    ) -> np.ndarray:
        """Append tokens (or input-embedding rows [n, n_embd]) to the cache and read outputs.

        ``outputs`` are indices into the given input (negative counts from the end). Returns a
        float32 array [len(outputs), n_vocab] (logits mode) or [len(outputs), n_embd]
        (embeddings mode). One ``llama_decode`` per ``n_batch`` chunk.
        """
        ctx = self._live_ctx()
        if (tokens is None) == (embd is None):
            raise UsageError("eval needs exactly one of tokens or embd")
        if tokens is not None:
            data = np.asarray(tokens, dtype=np.int64).reshape(-1)
            if data.size and (data.min() < 0 or data.max() >= self.n_vocab):
                raise UsageError(f"token ids must lie in [0, {self.n_vocab})")
            data = data.astype(np.int32)
            kind = "token"
        else:
            data = np.ascontiguousarray(embd, dtype=np.float32)
            if data.ndim != 2 or data.shape[1] != self.n_embd:
                raise UsageError(f"embd must have shape [n, {self.n_embd}], got {list(data.shape)}")
            kind = "embd"
        n = len(data)
        if n == 0:
            raise UsageError("eval needs at least one token")
        rows = [o + n if o < 0 else o for o in outputs]
        if any(not 0 <= r < n for r in rows):
            raise UsageError(f"outputs {list(outputs)} out of range for {n} inputs")
        if self.n_past + n > self.n_ctx:
            raise RuntimeFailure(
                f"context overflow: {self.n_past} cached + {n} new tokens > n_ctx {self.n_ctx}")

        width = self.n_vocab if self.mode == "logits" else self.n_embd
        read = (llama_cpp.llama_get_logits_ith if self.mode == "logits"
                else llama_cpp.llama_get_embeddings_ith)
        result = np.empty((len(rows), width), dtype=np.float32)
        batch, views = self._batch(kind)
        wanted = np.zeros(n, dtype=np.int8)
        wanted[rows] = 1
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            views[kind][:m] = data[start:start + m]
            views["pos"][:m] = np.arange(self.n_past, self.n_past + m, dtype=np.int32)
            # llama.cpp outputs every token in embeddings mode; saying so avoids its warning.
            views["output"][:m] = 1 if self.mode == "embeddings" else wanted[start:start + m]
            batch.n_tokens = m
            _native_error[0] = ""
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                llama_cpp.llama_memory_seq_rm(self._memory, _SEQ, self.n_past, -1)
                reason = _one_line(_native_error[0])
                raise RuntimeFailure(f"llama_decode failed (code {rc})" + (f": {reason}" if reason else ""))
            for j, r in enumerate(rows):
                if start <= r < start + m:
                    ptr = read(ctx, r - start)
                    if not ptr:
                        raise RuntimeFailure(f"llama.cpp returned no output for input {r}")
                    result[j] = np.ctypeslib.as_array(ptr, shape=(width,))
            self.n_past += m
        return result

    def truncate(self, n_keep: int) -> None:
        """Forget every cached position >= ``n_keep``."""
        self._live_ctx()
        if not 0 <= n_keep <= self.n_past:
            raise UsageError(f"n_keep must lie in [0, {self.n_past}], got {n_keep}")
        if not llama_cpp.llama_memory_seq_rm(self._memory, _SEQ, n_keep, -1):
            raise RuntimeFailure(f"llama.cpp could not drop positions >= {n_keep}")
        self.n_past = n_keep

    def _fingerprint(self) -> dict[str, object]:
        """What a saved prefix must match: model shape, mode and a digest of the file's ends."""
        digest = hashlib.sha256()
        size = self._path.stat().st_size
        with self._path.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
        return {"file_size": size, "file_ends_sha256": digest.hexdigest(), "mode": self.mode,
                "kv_type": self.kv_type,
                "n_embd": self.n_embd, "n_vocab": self.n_vocab,
                "n_layer": llama_cpp.llama_model_n_layer(self._model)}

    def state(self) -> bytes:
        """The cached state of sequence 0 (its KV cells), for ``restore`` on a backend of the
        same model (a context of any size that holds it)."""
        ctx = self._live_ctx()
        if self.n_past == 0:
            return b""
        size = llama_cpp.llama_state_seq_get_size(ctx, _SEQ)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, _SEQ)
        if written == 0:
            raise RuntimeFailure("llama.cpp could not copy the sequence state")
        return bytes(memoryview(buf)[:written])

    def restore(self, state: bytes, n_past: int) -> bool:
        """Replace the cache with ``state`` of ``n_past`` tokens; False (cache left empty) when
        llama.cpp refuses it."""
        ctx = self._live_ctx()
        if not 0 <= n_past <= self.n_ctx:
            return False
        self.truncate(0)
        if n_past == 0:
            return True
        src = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        ok = llama_cpp.llama_state_seq_set_data(ctx, src, len(state), _SEQ) != 0
        ok = ok and llama_cpp.llama_memory_seq_pos_max(self._memory, _SEQ) == n_past - 1
        if not ok:
            llama_cpp.llama_memory_seq_rm(self._memory, _SEQ, -1, -1)
            return False
        self.n_past = n_past
        return True

    def save_prefix(self, path: str | os.PathLike[str]) -> None:
        """Write the cached state of sequence 0 and its token count to ``path`` atomically.

        Layout: magic, sha256 of everything after it, header length, JSON header, KV state.
        The digest covers the whole content, so a damaged file is caught before llama.cpp
        sees it (a flipped byte inside the KV state would otherwise change verdicts silently).
        """
        state = self.state()
        header = json.dumps({"n_past": self.n_past, **self._fingerprint()}).encode()
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

    def load_prefix(self, path: str | os.PathLike[str]) -> bool:
        """Replace the cache with a saved prefix; False (cache left empty) when it does not fit.

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
        return self.restore(blob[start + 4 + n_header:], n_past)

    def close(self) -> None:
        for batch, _ in self._batches.values():
            llama_cpp.llama_batch_free(batch)
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
