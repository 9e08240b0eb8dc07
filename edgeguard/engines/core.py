"""The engine core both guards stand on: one llama.cpp backend, its sequences and its context.

It owns what Gen and Stream have in common: typed options, the device and kernel choice, the
backend's life cycle, a context that starts small and grows on demand up to the model's limit
(copying every live sequence over), the sequences in use and which tokens each holds, a
shared cached prefix, the caps on live sequences and cached tokens, per-stage timings, and one
lock that serialises every call, so a guard shared between threads gives each thread correct
results one after the other instead of corrupting llama.cpp's state.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from edgeguard.errors import InputTooLong, UsageError
from edgeguard.runtime.backend import Backend, choose_device
from edgeguard.runtime.kernels import (
    RUNTIME_MB,
    MemoryPlan,
    choose_flash_attn,
    choose_kv_type,
    kv_preference,
    plan_memory,
)
from edgeguard.runtime.llama_model import release_free_heap

log = logging.getLogger("edgeguard")

LONG_CTX = 4096  # cells; past it the context grows in smaller steps and decodes in smaller batches


_Options = TypeVar("_Options", bound="EngineOptions")


@dataclass(frozen=True)
class EngineOptions:
    """Options every engine takes; ``None`` means the engine's own default."""

    n_ctx: int | None = None  # the largest context to allow; default: the manifest's
    n_threads: int | None = None
    device: str = "auto"  # "auto": the GPU when this llama.cpp build can offload; "cpu"; "gpu"
    n_gpu_layers: int | None = None  # on the GPU: how many layers (default all)
    kv_type: str | None = None  # "f16", "q8_0-keys" or "q8_0" (half the KV memory, slower on CPU)
    repack: bool | None = None  # llama.cpp's repacked CPU weights (faster, a second copy in RAM)
    flash_attn: bool | None = None
    max_cached_tokens: int | None = None  # cap on positions cached over all sequences
    max_memory_mb: int | None = None  # bounds the context; the KV type is the fastest that fits
    verbose: bool = False

    @classmethod
    def from_kwargs(cls: type[_Options], engine: str, **kwargs: Any) -> _Options:
        """Typed options from keyword arguments; one that does not apply is a UsageError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise UsageError(f"option {', '.join(unknown)} does not apply to the {engine} engine "
                             f"(options: {', '.join(names)})")
        return cls(**kwargs)


@dataclass
class Timings:
    """What the engine spent its time on (milliseconds, summed since the guard was loaded)."""

    decode_calls: int = 0
    tokens_decoded: int = 0
    decode_ms: float = 0.0
    heads_ms: float = 0.0  # Stream: the ONNX classification heads
    context_growths: int = 0  # context rebuilds: larger, or flash attention turned on

    def snapshot(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Defaults:
    """An engine's choices where its options say ``None``."""

    kv_type: str  # on the CPU; a model whose head size rules it out takes f16
    repack: bool
    flash_attn: bool | None
    initial_ctx: int
    gpu_kv_type: str = "f16"  # on a GPU: the type the GPU path is measured and tested with
    batch: int = 256  # tokens per llama.cpp decode: bounds the compute buffer
    long_batch: int = 64  # the same past LONG_CTX cells with plain attention (see _batch_for)
    runtime_mb: float = RUNTIME_MB  # what max_memory_mb reserves besides the weights and the KV cache

    def kv_type_on(self, device: str) -> str:
        """The default KV type on ``device`` ("cpu" or "gpu")."""
        return self.kv_type if device == "cpu" else self.gpu_kv_type


def grown_size(current: int, needed: int, limit: int) -> int:
    """The next context size: 1.5x steps, 1.1x past LONG_CTX, in multiples of 256 (llama.cpp
    pads the cache to 256), at least ``needed``, at most ``limit``. Memory stays within 1.5x
    (then ~1.1x) of what is cached; past LONG_CTX a growth moves every cached token (~0.18 ms
    each on a 2-core Intel Xeon: 0.75 s at 4,116 tokens), so growing by a tenth of the cache
    costs at most ~5% of the time spent decoding those tokens (>= ~35 ms a token even in a
    batched Stream step). 8 sessions of ~580 tokens end in 5,120 cells (5,888 with 1.25x steps,
    8,192 with doubling)."""
    step = 3 / 2 if current < LONG_CTX else 11 / 10
    return min(limit, -(-max(needed, int(current * step)) // 256) * 256)


class Engine:
    """One backend with up to ``n_seq`` sequences; ``lock`` serialises everything done on it."""

    def __init__(self, gguf: Path, *, mode: str, options: EngineOptions, defaults: Defaults,
                 max_ctx: int, n_seq: int, ordered_cells: bool = False) -> None:
        """``ordered_cells``: keep every live sequence's cells in position order (``release``)."""
        self.lock = threading.RLock()
        self.mode = mode
        self.options = options
        self.gguf = Path(gguf)
        self.device = choose_device(options.device, n_gpu_layers=options.n_gpu_layers)
        self.default_kv_type = defaults.kv_type_on(self.device.device)
        self.kv_type = choose_kv_type(options.kv_type, self.default_kv_type)
        self.repack = defaults.repack if options.repack is None else options.repack
        self.defaults = defaults
        self.flash_attn = choose_flash_attn(options.flash_attn, defaults.flash_attn, self.device.device,
                                            self.kv_type)
        self.max_ctx = options.n_ctx or max_ctx
        self.max_cached = options.max_cached_tokens or self.max_ctx
        self.n_seq = n_seq
        self._check_cap("n_ctx and max_cached_tokens allow")
        self.timings = Timings()
        self._held: list[list[int]] = [[] for _ in range(n_seq)]  # the tokens each sequence holds
        self._free = list(range(n_seq - 1, -1, -1))
        self.ordered_cells = ordered_cells
        self._dead: set[int] = set()  # released, cells kept until freeing them cannot reorder a live one
        self.memory_plan: MemoryPlan | None = None
        self.backend: Backend | None = self._new_backend(min(self.max_ctx, defaults.initial_ctx))
        if options.max_memory_mb is not None:
            self._fit_memory(options)
        elif self.backend.kv_type != self.kv_type:  # the default's blocks do not divide the heads
            self._fix_kv(self.backend.kv_type, self.backend.n_ctx)

    def _fit_memory(self, options: EngineOptions) -> None:
        b = self.backend
        defaults = self.defaults
        budget = options.max_memory_mb
        assert b is not None and budget is not None  # called from __init__, with a budget, on a new backend
        candidates = [options.kv_type] if options.kv_type else [
            kv for kv in kv_preference(self.default_kv_type, self.device.device)
            if not b.kv_problem(kv) and (kv != "q8_0" or options.flash_attn is not False)]
        try:
            plan = plan_memory(budget, weights_mb=b.weights_mb,
                               kv_values_per_token=b.kv_values_per_token, candidates=candidates,
                               max_ctx=self.max_ctx, runtime_mb=defaults.runtime_mb)
            self.memory_plan = plan
            self.max_cached = min(self.max_cached, plan.max_tokens)
            self._check_cap(f"a memory budget of {options.max_memory_mb} MB leaves room for")
        except BaseException:
            self.close()
            raise
        # One KV type for the guard's life: the one that holds its largest context under the budget.
        kv = choose_kv_type(options.kv_type, self.default_kv_type, usable=lambda k: k in plan.caps,
                            fits=lambda k: plan.caps[k] >= plan.max_tokens, device=self.device.device)
        self._fix_kv(kv, min(self.max_cached, defaults.initial_ctx))

    def _fix_kv(self, kv: str, size: int) -> None:
        """Set the guard's KV type (and the attention kind that goes with it) on an empty context."""
        b = self.backend
        assert b is not None  # called from __init__ on a new, empty backend
        self.kv_type = kv
        self.flash_attn = choose_flash_attn(self.options.flash_attn, self.defaults.flash_attn, self.device.device, kv)
        if (kv, self.flash_attn, size) != (b.kv_type, b.flash_attn, b.n_ctx):  # else the context is this already
            self._reshape(size)

    def _check_cap(self, what: str) -> None:
        """llama.cpp aborts on a context with fewer cells than sequences: a clear error instead."""
        cap = min(self.max_ctx, self.max_cached)
        if cap <= self.n_seq:
            raise UsageError(f"{what} {cap} cached tokens; this guard needs more than {self.n_seq} "
                             f"(one per sequence and a padding one)")

    def _batch_for(self, n_ctx: int) -> int:
        """Tokens per llama.cpp decode for a context of ``n_ctx`` cells. Plain attention holds a
        [batch x n_ctx] score matrix per head, so past LONG_CTX a smaller batch keeps the compute
        buffer small (8,192 cells: 145 MiB at 256 tokens, 36 MiB at 64); flash attention holds
        none (17 MiB at 256) and keeps the larger, faster batch. Never below ``n_seq``: llama.cpp
        reserves an output row per sequence in a batch."""
        if self.flash_attn or n_ctx <= LONG_CTX:
            return max(self.n_seq + 1, self.defaults.batch)
        return max(self.n_seq + 1, min(self.defaults.batch, self.defaults.long_batch))

    def _reshape(self, n_ctx: int) -> None:
        """The backend's context replaced by an empty one of ``n_ctx`` cells with this engine's
        current KV type and attention kind (the weights stay loaded)."""
        self.batch = self._batch_for(n_ctx)
        assert self.backend is not None  # the engine is open: its callers hold a live guard
        self.backend.reshape(n_ctx=n_ctx, n_batch=self.batch, kv_type=self.kv_type, flash_attn=self.flash_attn)

    def _new_backend(self, n_ctx: int) -> Backend:
        o = self.options
        self.batch = self._batch_for(n_ctx)
        return Backend(self.gguf, n_ctx=n_ctx, mode=self.mode, n_batch=self.batch, n_seq=self.n_seq,
                       n_threads=o.n_threads, n_gpu_layers=self.device.n_gpu_layers, kv_type=self.kv_type,
                       kv_fallback=None if o.kv_type else "f16", repack=self.repack,
                       flash_attn=self.flash_attn, verbose=o.verbose)

    # -- sequences -------------------------------------------------------------------------------
    def acquire(self, what: str = "sequence") -> int:
        """A free, empty sequence; a UsageError names the cap when none is left."""
        if not self._free and self._dead:
            self._compact()
        if not self._free:
            raise UsageError(f"too many live {what}s: this guard holds at most {self.n_seq} at once; "
                             f"close one first (or load the guard with a larger cap)")
        return self._free.pop()

    def release(self, seq: int) -> None:
        """Free a sequence and its KV cells.

        With ``ordered_cells``, a sequence released while another one holds cells keeps its
        cells until none does, or until its cells or its slot are needed (then the live
        sequences are moved to a fresh layout, ``_compact``): llama.cpp places new tokens in the
        first free cells, so freed cells between a live sequence's would take its next tokens
        before its earlier ones, and flash attention, which sums a sequence's cells in cell
        order, would give it other numbers than it gets alone."""
        if seq in self._free or seq in self._dead:
            return
        if self.ordered_cells and self._held[seq] and any(self._held[s] for s in self._live_seqs() if s != seq):
            self._dead.add(seq)
            return
        for s in [seq, *self._dead] if self.ordered_cells else [seq]:
            self._drop(s)
        self._dead = set()

    def _drop(self, seq: int) -> None:
        if self.backend is not None and self._held[seq]:
            self.backend.truncate(0, seq)
        self._held[seq] = []
        if seq not in self._free:
            self._free.append(seq)

    def _live_seqs(self) -> list[int]:
        return [s for s in range(self.n_seq) if s not in self._free and s not in self._dead]

    def _compact(self) -> None:
        """Free the released sequences' cells and move the live ones into a fresh layout of the
        same size (each in position order)."""
        for s in self._dead:
            self._drop(s)
        self._dead = set()
        assert self.backend is not None  # the engine is open: its callers hold a live guard
        self._grow(self.backend.n_ctx)

    @property
    def dead_cells(self) -> int:
        """Cells still held by released sequences (``release``)."""
        return sum(len(self._held[s]) for s in self._dead)

    def held(self, seq: int) -> list[int]:
        return self._held[seq]

    @property
    def live(self) -> int:
        return self.n_seq - len(self._free) - len(self._dead)

    def truncate(self, seq: int, n_keep: int) -> None:
        assert self.backend is not None  # the engine is open: its callers hold a live guard
        self.backend.truncate(n_keep, seq)
        del self._held[seq][n_keep:]

    def share(self, src: int, dst: int, n: int) -> None:
        """``dst`` starts with the first ``n`` tokens of ``src``, sharing their cells."""
        assert self.backend is not None  # the engine is open: its callers hold a live guard
        self.backend.share(src, dst, n)
        self._held[dst] = self._held[src][:n]

    # -- context ---------------------------------------------------------------------------------
    def ensure_room(self, new_tokens: int, what: str, seqs: Sequence[int] = ()) -> None:
        """Make room for ``new_tokens`` more cached positions, growing the context up to the
        model's limit; beyond it an InputTooLong with the counts (never a truncation).

        The attention kind and the KV type stay what the guard was loaded with: a growth moves
        the sequences into a larger cache of the same layout, so no conversation's numbers
        depend on when its neighbours made the context grow."""
        assert self.backend is not None  # the engine is open: its callers hold a live guard
        needed = self.backend.cached + new_tokens
        if needed <= self.backend.n_ctx:
            return
        limit = min(self.max_ctx, self.max_cached)
        cached = self.backend.cached - self.dead_cells
        if cached + new_tokens > limit:
            raise InputTooLong(
                f"{what} needs {new_tokens} more tokens with {cached} cached, more than "
                f"the {limit} this guard allows; shorten the text, roll back, close sessions or raise "
                "n_ctx / max_cached_tokens / max_memory_mb (edgeguard never truncates silently)")
        if self._dead:  # their cells first, then one move of the live sequences (_compact)
            for s in self._dead:
                self._drop(s)
            self._dead = set()
            needed = self.backend.cached + new_tokens
            if needed <= self.backend.n_ctx:
                self._grow(self.backend.n_ctx)
                return
        self._grow(grown_size(self.backend.n_ctx, needed, limit))

    def _grow(self, size: int) -> None:
        """Move every sequence into a new context (larger, or with another cache layout).

        The sequences' states go to temporary files, layer by layer, the old context is freed,
        then the new one is allocated and reads them back (converted on the way, one layer at a
        time, when the attention kind or K type changed): the two contexts never coexist and no
        whole state is held in memory, so the peak stays near the new context's size. The
        weights stay loaded. Where the files cannot be written, the states are held in memory."""
        assert self.backend is not None  # the engine is open: its callers hold a live guard
        log.info("moving the context from %d to %d tokens (flash attention %s, %s KV cache)",
                 self.backend.n_ctx, size, "on" if self.flash_attn else "off", self.kv_type)
        backend = self.backend
        live = [seq for seq in range(self.n_seq) if backend.n_past[seq]]
        with tempfile.TemporaryDirectory(prefix="edgeguard-kv-") as tmp:
            files = {}
            for seq in live:
                path = Path(tmp) / f"seq{seq}.kv"
                try:
                    if not backend.state_to_file(path, seq):
                        break
                except OSError:
                    break
                files[seq] = path
            moved: dict[int, tuple[Path | bytes, int]]
            if len(files) == len(live):
                moved = {seq: (files[seq], backend.n_past[seq]) for seq in live}
            else:
                moved = {seq: (backend.state(seq), backend.n_past[seq]) for seq in live}
            release_free_heap()  # before the new context takes its memory: a lower peak
            self._reshape(size)
            for seq, (state, n_past) in moved.items():
                if isinstance(state, Path):
                    restored = backend.restore_from_file(state, n_past, seq)
                else:
                    restored = backend.restore(state, n_past, seq)
                if not restored:
                    keys = self._held[seq]
                    self._held[seq] = []
                    log.warning("could not move sequence %d (%d tokens) to the new context; its owner "
                                "recomputes it or reports it lost", seq, len(keys))
        self.timings.context_growths += 1

    def decode(self, inputs: Mapping[int, tuple[Sequence[int], object]],
               outputs: Mapping[int, Sequence[int]], what: str = "the conversation", *, wide: bool = True):
        """Append ``inputs[seq] = (token ids, values fed)`` to each sequence in shared decodes.

        The values are what llama.cpp gets (the same ids, or embedding rows for them); the ids
        are what the sequence is recorded to hold. ``wide``: inputs known whole, False for
        tokens fed as they arrive (``edgeguard.runtime.decode_shapes``). Returns ``{seq: outputs}``.
        """
        total = sum(len(keys) for keys, _ in inputs.values())
        self.ensure_room(total, what, list(inputs))
        t0 = time.perf_counter()
        assert self.backend is not None  # the engine is open: its callers hold a live guard
        result = self.backend.decode({seq: values for seq, (_, values) in inputs.items()}, outputs, wide=wide)
        self.timings.decode_ms += (time.perf_counter() - t0) * 1e3
        self.timings.decode_calls += -(-total // self.batch)
        self.timings.tokens_decoded += total
        for seq, (keys, _) in inputs.items():
            self._held[seq].extend(int(k) for k in keys)
        return result

    def close(self) -> None:
        with self.lock:
            if self.backend is not None:
                self.backend.close()
                self.backend = None


class EngineStats:
    """What a guard tells about its engine (mixed into GenGuard and StreamGuard, which keep
    their ``Engine`` in ``_engine``)."""

    _engine: Engine

    @property
    def timings(self):
        """Per-stage time spent by this guard (a public ``edgeguard.engines.core.Timings``)."""
        return self._engine.timings

    @property
    def kernel_plan(self):
        """How llama.cpp placed the weights (``edgeguard.runtime.kernels.KernelPlan``)."""
        return self._engine.backend.kernel_plan

    @property
    def context_size(self) -> int:
        """Token positions the KV cache holds now (it grows on demand up to the model's limit)."""
        return cast(Backend, self._engine.backend).n_ctx  # None once closed: AttributeError, as ever

    @property
    def cached_tokens(self) -> int:
        """KV cells in use now, over all sequences (a shared template head counts once)."""
        return cast(Backend, self._engine.backend).cached - self._engine.dead_cells  # closed: AttributeError

    @property
    def flash_attn(self) -> bool:
        """Whether llama.cpp's flash attention is on: one setting for the guard's life (on unless
        ``flash_attn=False``: ``kernels.choose_flash_attn``)."""
        return bool(self._engine.flash_attn)

    @property
    def kv_type(self) -> str:
        """The KV cache's type: "f16", "q8_0-keys" (q8_0 keys, f16 values) or "q8_0"; one for the
        guard's life: as asked, else the engine's default (Gen f16; Stream q8_0-keys on the CPU,
        f16 on a GPU or where the model's head size rules q8_0 out), else (under
        ``max_memory_mb``) the type that holds the largest context the budget allows
        (``kernels.choose_kv_type``)."""
        return self._engine.kv_type

    @property
    def max_cached_tokens(self) -> int:
        """The most tokens this guard caches at once (context, option and memory budget)."""
        return min(self._engine.max_ctx, self._engine.max_cached)
