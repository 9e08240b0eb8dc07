"""What a model costs before it is downloaded: disk and memory from its shape, and the largest
model of a kind that fits a machine. Pure arithmetic: no I/O, no llama.cpp.

Disk: each GGUF tensor at the type llama.cpp's quantizer gives it for the requested quant (the
rules below follow ``llama_tensor_get_type`` for the quants edgeguard offers; 1-D norms stay f32),
plus the tokenizer the file carries. Stream also ships the f16 input-embedding table (memory
mapped: only the rows of the tokens seen are read), the ONNX heads (f32) and a vocabulary file.

Memory of a running guard: the weights, the KV cache of a context of ``ctx_tokens`` cells, and
the runtime besides both (compute buffers, onnxruntime, Python), the allowances the engines
reserve under a memory budget. Figures are bytes unless a name says MB (2**20 bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

# bits per weight of each GGML block type (block bytes * 8 / block size)
BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q5_0": 5.5,
        "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
# Tokenizer metadata of a full-vocabulary GGUF (151,936 Qwen3 tokens and their merges), measured.
TOKENIZER_BYTES = 5_930_000
# What an engine uses besides weights and KV cache (edgeguard.runtime.kernels.RUNTIME_MB for Gen,
# the Stream engine's Defaults.runtime_mb for Stream: both measured, see docs/long-inputs.md).
RUNTIME_MB = {"gen": 200, "stream": 300}
KV_VALUE_BYTES = 2  # an f16 KV cache: Gen's, and Stream's on a GPU
# bytes per cached value of each KV type (q8_0: 34 bytes a block of 32; q8_0-keys: q8_0 keys, f16 values)
KV_BYTES = {"f16": 2.0, "q8_0-keys": (2.0 + 34 / 32) / 2, "q8_0": 34 / 32}
STREAM_CPU_KV = "q8_0-keys"  # Stream's default cache on a CPU (edgeguard.engines.stream.DEFAULTS)
DEFAULT_CTX = 2048  # a Gen check of ~300 template tokens plus a long input; a Stream session
STREAM_DUMMY_VOCAB = 8  # rows of the placeholder embedding in the Stream backbone GGUF
MB = 2**20


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3 checkpoint's sizes, as its config.json names them. ``guard_inner`` is the Stream
    heads' width (0: no heads, a Gen model); ``tied``: lm_head shares the input embedding."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = True
    guard_inner: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "tied":
                if not isinstance(value, bool):
                    raise ValueError(f"shape: tied must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0 or (
                    value == 0 and f.name != "guard_inner"):
                raise ValueError(f"shape: {f.name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"shape: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ModelShape:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"shape: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        missing = [f.name for f in fields(cls) if f.name not in data and f.name not in ("tied", "guard_inner")]
        if missing:
            raise ValueError(f"shape: missing field {missing[0]!r}")
        return cls(**data)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face config.json (head_dim defaults to hidden / heads, as in transformers)."""
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return cls(
            hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or hidden // heads),
            ffn=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", True)),
            guard_inner=int(config.get("guard_inner_size") or 0),
        )

    def params(self, kind: str) -> int:
        """Parameters of the checkpoint (Gen: with lm_head when untied; Stream: with its heads)."""
        n = sum(rows * cols for _, rows, cols in _matrices(self, kind, dummy_vocab=False))
        n += (2 * self.hidden + 2 * self.head_dim) * self.layers + self.hidden
        if kind == "stream":
            n += sum(rows * cols for rows, cols in _head_matrices(self)) + 2 * self.guard_inner
        return n

    def kv_bytes_per_token(self, value_bytes: float = KV_VALUE_BYTES) -> float:
        return self.layers * self.kv_heads * self.head_dim * 2 * value_bytes


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in *_K_M quants."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _matrices(s: ModelShape, kind: str, *, dummy_vocab: bool) -> list[tuple[str, int, int]]:
    """(gguf role, rows, cols) of every 2-D tensor of the model GGUF, in layer order."""
    vocab = STREAM_DUMMY_VOCAB if dummy_vocab else s.vocab
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out = [("token_embd", vocab, s.hidden)]
    for _ in range(s.layers):
        out += [("attn_q", q, s.hidden), ("attn_k", kv, s.hidden), ("attn_v", kv, s.hidden),
                ("attn_output", s.hidden, q), ("ffn_gate", s.ffn, s.hidden), ("ffn_up", s.ffn, s.hidden),
                ("ffn_down", s.hidden, s.ffn)]
    if kind == "gen" and not s.tied:
        out.append(("output", s.vocab, s.hidden))
    return out


def _head_matrices(s: ModelShape) -> list[tuple[int, int]]:
    g = s.guard_inner
    return [(g, s.hidden), (3, g), (8, g), (g, s.hidden), (3, g), (9, g)]


_BASE = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q4_k_s": "q4_k", "q4_0": "q4_0", "q5_0": "q5_0",
         "q6_k": "q6_k", "q8_0": "q8_0", "f16": "f16", "bf16": "bf16", "f32": "f32"}


def tensor_type(quant: str, role: str, layer: int, layers: int, has_output: bool, cols: int) -> str:
    """The block type of one 2-D tensor when a model is quantized to ``quant``."""
    base = _BASE[quant]
    if base in ("f16", "bf16", "f32"):
        return base
    output = role == "output" or (role == "token_embd" and not has_output)
    if cols % 256 and base.endswith("_k"):  # k-quants need rows of 256; llama.cpp falls back
        base = "q5_0" if base == "q4_k" else "q8_0"
    if output:
        return "q8_0" if base == "q8_0" or cols % 256 else "q6_k"
    if quant in ("q4_k_m", "q5_k_m") and role in ("attn_v", "ffn_down") and use_more_bits(layer, layers):
        return "q6_k"
    if quant == "q4_k_s" and role in ("attn_v", "ffn_down") and layer < max(4, layers // 8):
        return "q5_k"
    return base


def gguf_tensor_bytes(s: ModelShape, kind: str, quant: str) -> int:
    """Tensor data of the model GGUF: the backbone for Stream (placeholder vocabulary)."""
    stream = kind == "stream"
    mats = _matrices(s, kind, dummy_vocab=stream)
    has_output = any(role == "output" for role, _, _ in mats)
    total = 0.0
    for index, (role, rows, cols) in enumerate(mats):
        layer = (index - 1) // 7 if role not in ("token_embd", "output") else 0
        if stream and role == "token_embd":
            block = "f32"  # the placeholder rows
        else:
            block = tensor_type(quant, role, layer, s.layers, has_output, cols)
        total += rows * cols * BITS[block] / 8
    norms = (2 * s.hidden + 2 * s.head_dim) * s.layers + s.hidden
    return int(total) + norms * 4


@dataclass(frozen=True)
class Footprint:
    """One model at one quant: its files on disk and a running guard's memory."""

    name: str
    kind: str
    quant: str
    disk_bytes: int
    weights_bytes: int  # resident weights (the model GGUF's tensors; Stream: + the f32 heads)
    kv_bytes: int  # KV cache of ctx_tokens cells on the CPU (the engine's default type there)
    runtime_bytes: int
    ctx_tokens: int
    gpu_kv_bytes: int | None = None  # the same on a GPU (f16); None: as on the CPU

    @property
    def ram_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.runtime_bytes

    @property
    def ram_mb(self) -> float:
        return self.ram_bytes / MB

    @property
    def disk_mb(self) -> float:
        return self.disk_bytes / MB

    @property
    def gpu_bytes(self) -> int:
        """What a full offload puts in GPU memory: weights and KV cache (compute buffers aside)."""
        return self.weights_bytes + (self.kv_bytes if self.gpu_kv_bytes is None else self.gpu_kv_bytes)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "quant": self.quant, "ctx_tokens": self.ctx_tokens,
                "disk_mb": round(self.disk_mb), "ram_mb": round(self.ram_mb),
                "weights_mb": round(self.weights_bytes / MB), "kv_mb": round(self.kv_bytes / MB),
                "gpu_mb": round(self.gpu_bytes / MB)}


def footprint(s: ModelShape, kind: str, quant: str, *, name: str = "", ctx_tokens: int = DEFAULT_CTX) -> Footprint:
    if kind not in RUNTIME_MB:
        raise ValueError(f"kind must be gen or stream, got {kind!r}")
    if quant not in _BASE:
        raise ValueError(f"unknown quant {quant!r}")
    if kind == "stream" and not s.guard_inner:
        raise ValueError("a Stream shape needs guard_inner (the heads' width)")
    weights = gguf_tensor_bytes(s, kind, quant)
    disk = weights + (TOKENIZER_BYTES if kind == "gen" else 0)
    if kind == "stream":
        heads = (sum(r * c for r, c in _head_matrices(s)) + 2 * s.guard_inner) * 4
        embeddings = s.vocab * s.hidden * 2
        disk += heads + embeddings + TOKENIZER_BYTES
        weights += heads
    cpu_values = KV_BYTES[STREAM_CPU_KV] if kind == "stream" else KV_VALUE_BYTES
    return Footprint(name, kind, quant, disk, weights, int(s.kv_bytes_per_token(cpu_values) * ctx_tokens),
                     RUNTIME_MB[kind] * MB, ctx_tokens, int(s.kv_bytes_per_token() * ctx_tokens))


@dataclass(frozen=True)
class Fit:
    """The largest model of a kind that fits, for one place (RAM or a GPU)."""

    kind: str
    where: str  # "ram" | "gpu"
    available_mb: float
    reserve_mb: float
    model: Footprint | None  # None: not even the smallest fits
    considered: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "where": self.where, "available_mb": round(self.available_mb),
                "reserve_mb": round(self.reserve_mb), "model": self.model.to_dict() if self.model else None,
                "considered": list(self.considered)}


def largest_fitting(footprints: Iterable[Footprint], kind: str, *, available_mb: float, reserve_mb: float,
                    where: str = "ram") -> Fit:
    """The model of ``kind`` with the most parameters (by weights) whose memory fits in
    ``available_mb`` after ``reserve_mb`` are kept for the user's own LLM and programs. ``where``:
    "ram" compares ``ram_bytes``, "gpu" compares ``gpu_bytes`` (everything offloaded)."""
    if where not in ("ram", "gpu"):
        raise ValueError(f"where must be ram or gpu, got {where!r}")
    candidates = sorted((f for f in footprints if f.kind == kind), key=lambda f: f.weights_bytes)
    room = (available_mb - reserve_mb) * MB
    fitting = [f for f in candidates if (f.ram_bytes if where == "ram" else f.gpu_bytes) <= room]
    return Fit(kind, where, available_mb, reserve_mb, fitting[-1] if fitting else None,
               tuple(f.name for f in candidates))
