"""Which llama.cpp CPU kernels and which device a model runs on, decided from plain facts.

Pure logic, no llama.cpp import: the backend feeds it llama.cpp's system-info text and the
GGUF's tensor list, so every branch is unit-tested on any machine.

Why this exists: llama-cpp-python 0.3.36 compiled by pip with GCC 11/12 on an Intel CPU with AMX
crashes (general protection fault at ``ldtilecfg`` in ``ggml_backend_amx_mul_mat``) on any decode
of more than one token once llama.cpp may place weights in its AMX buffer type (public:
llama.cpp issue 20824). AMX is reached only through llama.cpp's "extra buffer types"; its other
repacked CPU kernels (CPU_REPACK: AVX2/AVX-512 layouts) are fine. So on builds that report AMX,
edgeguard turns the automatic extra buffer types off and places the weights that CPU_REPACK can
take there itself, by name (llama.cpp's ``tensor_buft_overrides``). AMX is never selected.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgeguard.errors import RuntimeFailure, UsageError
from edgeguard.models.sizing import KV_BYTES as KV_BYTES  # re-exported: bytes per cached value
from edgeguard.platform.builds import CUDA_INSTALL as CUDA_INSTALL  # re-exported
from edgeguard.platform.builds import gpu_build_advice

DEVICES = ("auto", "cpu", "gpu")
ALLOW_AMX_ENV = "EDGEGUARD_ALLOW_AMX"
# Weights that llama.cpp only ever multiplies (MUL_MAT): safe to store in a repacked layout.
# token_embd is also read row by row (GET_ROWS), which a repacked layout would break.
_MATMUL_WEIGHT = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
# ggml types that llama.cpp 0.3.36's CPU_REPACK takes on x86 (ggml-cpu/repack.cpp,
# ggml_repack_get_optimal_repack_type): type -> (CPU feature it needs, rows must divide by).
_X86_REPACK = {
    "Q4_0": ("AVX2", 8),
    "Q4_K": ("AVX2", 8),
    "IQ4_NL": ("AVX2", 8),
    "MXFP4": ("AVX2", 8),
    "Q2_K": ("AVX512", 8),
}

# ggml types that llama.cpp 0.3.36's CPU_REPACK takes on an ARM core with dot product (same
# function; i8mm only picks wider layouts): a Raspberry Pi 5's Cortex-A76, not a Pi 4's A72.
_ARM_REPACK = "Q4_0, Q4_K, Q5_K, Q6_K, Q8_0, IQ4_NL"

GCC_NOTE = ("llama.cpp's AMX kernels crash when llama-cpp-python is compiled with GCC 11/12 "
            "(llama.cpp issue 20824)")


@dataclass(frozen=True)
class SystemInfo:
    """llama.cpp's ``llama_print_system_info()`` text, parsed: ``{backend: {key: value}}``."""

    backends: Mapping[str, Mapping[str, str]]

    @classmethod
    def parse(cls, text: str) -> SystemInfo:
        backends: dict[str, dict[str, str]] = {}
        current: dict[str, str] | None = None
        for field in text.split("|"):
            field = field.strip()
            if not field:
                continue
            if " : " in field:  # "CPU : SSE3 = 1" opens a backend's section
                name, field = field.split(" : ", 1)
                current = backends.setdefault(name.strip(), {})
            if current is None:
                current = backends.setdefault("", {})
            key, sep, value = field.partition("=")
            if sep:
                current[key.strip()] = value.strip()
        return cls(backends)

    def cpu_has(self, feature: str) -> bool:
        return self.backends.get("CPU", {}).get(feature, "0") not in ("0", "")

    @property
    def amx(self) -> bool:
        return self.cpu_has("AMX_INT8")

    @property
    def arch(self) -> str:
        cpu = self.backends.get("CPU", {})
        if any(k in cpu for k in ("NEON", "ARM_FMA", "DOTPROD", "MATMUL_INT8", "SVE")):
            return "arm"
        if any(k in cpu for k in ("SSE3", "AVX", "AVX2")):
            return "x86"
        return "other"

    def summary(self) -> str:
        return " | ".join(f"{b} : " + " | ".join(f"{k} = {v}" for k, v in kv.items())
                          for b, kv in self.backends.items())


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, for example "Q4_K"
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length, shape[1] the row count


@dataclass(frozen=True)
class KernelPlan:
    """How llama.cpp places a model's weights on the CPU.

    ``extra_bufts``: let llama.cpp pick its extra buffer types itself (repacking, AMX where the
    build has it). ``repack_tensors``: weights edgeguard places in CPU_REPACK by name instead.
    """

    extra_bufts: bool
    repack_tensors: tuple[str, ...]
    reason: str

    @property
    def kernels(self) -> str:
        if self.extra_bufts:
            return "llama.cpp default (extra buffer types)"
        if self.repack_tensors:
            return f"CPU_REPACK for {len(self.repack_tensors)} weights, AMX off"
        return "plain CPU (no repacking)"

    def overrides(self) -> list[str]:
        """Regex patterns (one per weight kind) that name exactly ``repack_tensors``."""
        by_kind: dict[str, list[str]] = defaultdict(list)
        for name in self.repack_tensors:
            m = _MATMUL_WEIGHT.match(name)
            assert m is not None  # plan_kernels only picks names that repackable() matched
            by_kind[m.group(2)].append(m.group(1))
        return [rf"^blk\.({'|'.join(layers)})\.{kind}\.weight$" for kind, layers in sorted(by_kind.items())]


def amx_allowed(env: Mapping[str, str] = os.environ) -> bool:
    """``EDGEGUARD_ALLOW_AMX=1`` lets llama.cpp use AMX (for builds made with GCC >= 13)."""
    return env.get(ALLOW_AMX_ENV, "").strip().lower() in ("1", "true", "yes")


def repackable(tensor: TensorInfo, info: SystemInfo) -> bool:
    """Whether llama.cpp's CPU_REPACK buffer accepts this weight on this (x86) CPU.

    Placing a weight there that it cannot repack makes llama.cpp dereference a null pointer, so
    anything not known to work is left in the plain CPU buffer.
    """
    if info.arch != "x86" or not _MATMUL_WEIGHT.match(tensor.name) or len(tensor.shape) != 2:
        return False
    need = _X86_REPACK.get(tensor.type.upper())
    return need is not None and info.cpu_has(need[0]) and tensor.shape[1] % need[1] == 0


def plan_kernels(info: SystemInfo, tensors: Iterable[TensorInfo], *, repack: bool, on_gpu: bool,
                 allow_amx: bool = False) -> KernelPlan:
    """The CPU kernel plan for one model load."""
    if not repack:
        return KernelPlan(False, (), "repacking off by option (saves a second copy of the weights)")
    if not info.amx or allow_amx:
        why = "AMX allowed by " + ALLOW_AMX_ENV if info.amx else "this build has no AMX kernels"
        return KernelPlan(True, (), f"llama.cpp chooses its repacked kernels ({why})")
    if on_gpu:
        return KernelPlan(False, (), f"weights on the GPU; CPU extra buffer types off ({GCC_NOTE})")
    chosen = tuple(t.name for t in tensors if repackable(t, info))
    return KernelPlan(False, chosen, f"AMX avoided: {GCC_NOTE}; AVX2/AVX-512 repacked kernels kept")


def arm_note(info: SystemInfo) -> str | None:
    """On ARM: which weights llama.cpp repacks for this CPU, and the quant to use there."""
    if info.arch != "arm":
        return None
    if not (info.cpu_has("DOTPROD") or info.cpu_has("MATMUL_INT8")):
        return ("ARM without dot product (a Raspberry Pi 4, or a build without +dotprod): llama.cpp "
                "repacks no weights; q4_k_m (the default) runs on its plain NEON kernels")
    return (f"ARM with dot product: llama.cpp repacks {_ARM_REPACK} weights, so q4_k_m (the "
            "default) and q4_0 both run on its repacked kernels; q4_k_m is the closer to F16")


@dataclass(frozen=True)
class DeviceChoice:
    n_gpu_layers: int
    device: str  # "cpu" or "gpu"
    reason: str


def choose_device(requested: str, *, gpu_offload: bool, n_gpu_layers: int | None = None) -> DeviceChoice:
    """``auto``: the GPU when this llama.cpp build can offload, else the CPU. ``gpu`` on a build
    without GPU support is a RuntimeFailure (exit 3) that names the install command."""
    if requested not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return DeviceChoice(0, "cpu", "asked for the CPU")
    if not gpu_offload:
        if requested == "gpu":
            raise RuntimeFailure(f"this llama-cpp-python build has no GPU support; {gpu_build_advice()}")
        return DeviceChoice(0, "cpu", "this llama.cpp build cannot offload to a GPU")
    layers = 999 if n_gpu_layers is None else n_gpu_layers
    return DeviceChoice(layers, "gpu" if layers else "cpu", "llama.cpp reports GPU offload support")


def choose_flash_attn(asked: bool | None, default: bool | None, device: str, kv_type: str) -> bool:
    """Flash attention, one setting per guard (never switched by load): as asked; else the
    engine's default; else on. Scores must not depend on what else the guard is doing, and
    llama.cpp's CPU flash attention is the attention kind whose result for a token depends only
    on its own sequence's cells (it skips the cells masked out; plain attention sums every cell
    of the cache, so a sequence's numbers move with where its neighbours' cells lie). It is also
    the faster kind for one session at short contexts on an AMD EPYC (23.8 vs 28.0 ms a token)
    and for several sessions everywhere. A q8_0 cache (quantized values) needs it."""
    if asked is not None:
        return asked
    if default is not None:
        return default or kv_type == "q8_0"
    return True


# ggml block size of each KV type's (K, V) cache: llama.cpp views the cache one attention head at
# a time, so a quantized cache needs heads whose size the block size divides (a head of 24 values
# in a q8_0 cache makes llama.cpp abort the process once the cache is large enough).
KV_BLOCKS = {"f16": (1, 1), "q8_0-keys": (32, 1), "q8_0": (32, 32)}


def kv_type_problem(kv_type: str, head_k: int, head_v: int) -> str | None:
    """Why llama.cpp cannot hold this model's attention heads in a ``kv_type`` cache; None when it can."""
    bk, bv = KV_BLOCKS[kv_type]
    for what, size, block in (("key", head_k, bk), ("value", head_v, bv)):
        if size % block:
            return (f"kv_type {kv_type!r} stores {what}s in blocks of {block} values, and this model's "
                    f"attention heads hold {size}; use kv_type='f16'")
    return None


def kv_preference(default: str, device: str = "cpu") -> list[str]:
    """KV types in the order a guard takes them: its default, then smaller ones, then f16 (which
    every head size can use). On a GPU, keys and values of different types are left out unless
    they are the default: llama.cpp's CUDA build compiles flash attention for equal types only
    (``GGML_CUDA_FA_QUANTS``: q4_0, q8_0, f16, bf16 pairs) and converts any other pair to f16 at
    every step, so ``q8_0-keys`` would be slower than ``q8_0`` and save less."""
    smaller = ["q8_0-keys", "q8_0"] if device != "gpu" else ["q8_0"]
    return list(dict.fromkeys([default, *smaller, "f16"]))


def choose_kv_type(asked: str | None, default: str, *, usable=None, fits=None, device: str = "cpu") -> str:
    """The KV cache's type, one per guard (never changed by load or growth, so a conversation's
    scores do not depend on when its neighbours made the context grow): as asked; else
    ``default`` when it ``fits`` (a memory budget for the guard's largest context; None: all
    do); else the first that fits of q8_0 keys (0.77x of f16's bytes; not on a GPU:
    ``kv_preference``), q8_0 (0.53x) and f16; none fitting, the smallest. ``usable(kv)`` (None:
    all are) drops the types this model's head size rules out."""
    if asked:
        return asked
    order = [kv for kv in kv_preference(default, device) if usable is None or usable(kv)]
    for kv in order:
        if fits is None or fits(kv):
            return kv
    return min(order, key=KV_BYTES.__getitem__) if order else default


RUNTIME_MB = 200  # besides weights and KV: compute buffers, Python (Gen ~150-200 MB; Stream: its Defaults)


@dataclass(frozen=True)
class MemoryPlan:
    caps: dict  # KV type -> the tokens a cache of that type holds under the budget (<= max_ctx)
    max_tokens: int
    reason: str

    @property
    def kv_type(self) -> str:
        """The KV type the largest context under the budget needs."""
        return next(kv for kv, n in self.caps.items() if n == self.max_tokens)


def plan_memory(budget_mb: float, *, weights_mb: float, kv_values_per_token: int, candidates: list[str],
                max_ctx: int, runtime_mb: float = RUNTIME_MB) -> MemoryPlan:
    """Token caps under a process memory budget for each candidate KV type (the engine then
    runs the fastest type whose cap holds the context it needs: ``choose_kv_type``), and the
    cap of them all."""
    free_mb = budget_mb - weights_mb - runtime_mb
    if free_mb <= 0:
        raise UsageError(f"a memory budget of {budget_mb:.0f} MB cannot hold this model: its weights take "
                         f"{weights_mb:.0f} MB and the runtime ~{runtime_mb:.0f} MB; raise max_memory_mb")
    caps = {kv: min(max_ctx, int(free_mb * 2**20 / (kv_values_per_token * KV_BYTES[kv]))) for kv in candidates}
    top = max(caps.values())
    held = ", ".join(f"{kv} {n}" for kv, n in caps.items())
    return MemoryPlan(caps, top, (f"the whole context ({max_ctx} tokens) fits" if top == max_ctx else
                                  f"the context is capped at {top} tokens") +
                      f" by the {budget_mb:.0f} MB budget (tokens per KV type: {held})")
