"""llama.cpp, the library: initialisation and log, what the build can do, model loading, Vocab.

With ``edgeguard.runtime.backend`` (contexts and decoding), the only modules that import ``llama_cpp``.
They use the low-level bindings, never the high-level ``Llama`` class, which reserves
n_batch x n_vocab floats of logits up front.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgeguard.errors import InputTooLong, ModelError, RuntimeFailure, UsageError
from edgeguard.platform.memory import trim_heap
from edgeguard.runtime import kernels, native_order
from edgeguard.runtime.gguf_meta import check_metadata
from edgeguard.runtime.kernels import KernelPlan, SystemInfo, TensorInfo, amx_allowed, plan_kernels

# onnxruntime before llama.cpp's libraries: the other order crashes on CUDA builds (native_order).
native_order.load_onnxruntime_first()
import llama_cpp  # noqa: E402  (must follow the line above)

_GGML_LOG_LEVEL_ERROR = 4  # ggml.h in 0.3.36 (llama_cpp/_logger.py still says 3)
_GGUF_MAGIC = b"GGUF"
MAX_TEXT_BYTES = 2**31 - 64  # llama_tokenize's text length and token capacity are C ints
native_error = [""]
_GGML_LOG_LEVEL_INFO = 2
_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")
_buffer_lines: list[str] = []  # llama.cpp's "<buffer type> model buffer size" lines of a load
_echo_log = [False]  # verbose: llama.cpp's log goes to stderr as well


@llama_cpp.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Kept at module level so ctypes never frees the callback that llama.cpp holds.
    # The first error line since the last reset is kept: it names the cause, later ones don't.
    if _echo_log[0] and text:
        os.write(2, text)
    if level == _GGML_LOG_LEVEL_ERROR and text and not native_error[0]:
        native_error[0] = text.decode("utf-8", "replace").strip()
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


def one_line(text: str) -> str:
    return " ".join(text.split())


def _cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """The most threads a backend takes: llama.cpp's own limit (512), and 4x the CPUs (more
    only slow its spinning threads down, and an OpenMP build exits the process when it cannot
    create them, for example past a container's thread limit)."""
    return min(512, 4 * _cpus())


def check_threads(n: int, what: str = "n_threads") -> int:
    if not 1 <= n <= max_threads():
        raise UsageError(f"{what} must be between 1 and {max_threads()} (4x this machine's CPUs, "
                         f"at most 512), got {n}")
    return n


def default_threads() -> int:
    """``EDGEGUARD_THREADS`` if set, else the CPUs this process may run on."""
    env = os.environ.get("EDGEGUARD_THREADS", "").strip()
    if env:
        if not env.isdigit():
            raise UsageError(f"EDGEGUARD_THREADS must be a positive integer, got {env!r}")
        return check_threads(int(env), "EDGEGUARD_THREADS")
    return _cpus()


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
    """How this build should place this GGUF's weights (see ``edgeguard.runtime.kernels``)."""
    info = system_info()
    needs_tensors = repack and info.amx and not amx_allowed() and n_gpu_layers == 0
    tensors = gguf_tensors(path) if needs_tensors else []
    plan = plan_kernels(info, tensors, repack=repack, on_gpu=n_gpu_layers != 0, allow_amx=amx_allowed())
    if plan.repack_tensors and "CPU_REPACK" not in _cpu_extra_bufts():
        return KernelPlan(False, (), plan.reason + "; this build has no CPU_REPACK buffer type")
    return plan


def load_model(path: str | os.PathLike[str], *, vocab_only: bool, n_gpu_layers: int,
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
    check_metadata(path)  # values llama.cpp aborts on
    init_llama(verbose)
    plan = (KernelPlan(False, (), "vocabulary only") if vocab_only
            else kernel_plan(path, repack=repack, n_gpu_layers=n_gpu_layers))
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.n_gpu_layers = n_gpu_layers
    # Repacked weights (faster CPU kernels) live in llama.cpp's own buffer, not in the file's
    # page cache, which other processes loading the same file could share.
    params.use_extra_bufts = plan.extra_bufts
    if plan.extra_bufts or plan.repack_tensors:
        # Read the file instead of mapping it: with a mapping, ~160 MiB of its pages were
        # resident beside the repacked copy after every decode, even right after madvise had
        # dropped them. Stream, 8 sessions of 512 tokens: 1,194 -> 1,079 MiB, peak 1,279 ->
        # 1,079 MiB; loading takes ~0.3 s longer.
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    overrides = None
    if plan.repack_tensors:
        patterns = [p.encode() for p in plan.overrides()]
        repack_buft = _cpu_extra_bufts()["CPU_REPACK"]
        overrides = (_BuftOverride * (len(patterns) + 1))(
            *[_BuftOverride(p, repack_buft) for p in patterns], _BuftOverride(None, None))
        params.tensor_buft_overrides = ctypes.addressof(overrides)
    native_error[0] = ""
    _buffer_lines.clear()
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    del overrides  # llama.cpp reads the patterns only while loading
    if not model:
        reason = one_line(native_error[0]) or "llama.cpp returned no model"
        raise ModelError(f"cannot load model {path}: {reason}")
    buffers: dict[str, float] = {}
    for line in _buffer_lines:
        m = _BUFFER_LINE.search(line)
        if m:
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
    return model, plan, buffers


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere a no-op).
    Python's and numpy's temporaries leave the heap fragmented: 8 Stream sessions of 512 tokens
    kept ~19 MiB of free heap resident."""
    trim_heap()


class Vocab:
    """The tokenizer of a GGUF, loaded with ``vocab_only`` (no weights are read)."""

    def __init__(self, gguf_path: str | os.PathLike[str], *, verbose: bool = False) -> None:
        self._model: ctypes.c_void_p | None
        self._model, _, _ = load_model(gguf_path, vocab_only=True, n_gpu_layers=0, verbose=verbose)
        self._owns_model = True
        self._bind(llama_cpp.llama_model_get_vocab(self._model), gguf_path)

    def _bind(self, vocab, path) -> None:
        self._vocab = vocab
        # Calls run outside any guard lock (tokenizing is parallel); close() waits for them
        # before the model can be freed under a running call.
        self._users = 0
        self._idle = threading.Condition()
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

    @contextmanager
    def _live_vocab(self, tokenizer: bool = True) -> Iterator:
        """The llama.cpp vocabulary, kept alive (``close`` waits) while the block runs."""
        with self._idle:
            if self._vocab is None:
                raise RuntimeFailure("the vocabulary is closed")
            if tokenizer and self._no_tokenizer:
                raise ModelError(self._no_tokenizer)
            self._users += 1
        try:
            yield self._vocab
        finally:
            with self._idle:
                self._users -= 1
                self._idle.notify_all()

    def _check_ids(self, tokens: Sequence[int]) -> None:
        # llama.cpp throws std::out_of_range (the process terminates) for an unknown id
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")

    def _tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        if not data:
            return []
        if len(data) > MAX_TEXT_BYTES:  # llama.cpp takes the length as a C int: it would wrap
            raise InputTooLong(f"a text of {len(data)} bytes is over the {MAX_TEXT_BYTES} bytes llama.cpp "
                               "can tokenize")
        capacity = len(data) + 8
        with self._live_vocab() as vocab:
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
        self._check_ids([token])
        size = 32
        with self._live_vocab() as vocab:
            for _ in range(2):
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
                if n >= 0:
                    return buf.raw[:n]
                size = -n
        raise RuntimeFailure(f"llama.cpp could not render token {token}")

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """The raw bytes of a token sequence, special tokens included as text."""
        self._check_ids(tokens)
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = max(64, 8 * len(tokens))
        with self._live_vocab() as vocab:
            for _ in range(2):
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_detokenize(vocab, ids, len(tokens), buf, size, False, True)
                if n >= 0:
                    return buf.raw[:n]
                size = -n
        raise RuntimeFailure(f"llama.cpp could not detokenize {len(tokens)} tokens")

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (for example ``tokenizer.chat_template``), None if absent."""
        size = 256
        with self._live_vocab(tokenizer=False):
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
        """Refuse new calls, wait for running ones (another thread's tokenize), then free."""
        with self._idle:
            self._vocab = None
            self._idle.wait_for(lambda: self._users == 0)
            model, self._model = self._model, None
        if self._owns_model and model is not None:
            llama_cpp.llama_model_free(model)

    def __enter__(self) -> Vocab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
