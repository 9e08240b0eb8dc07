"""Reading a Hugging Face Qwen3Guard checkpoint folder: config, tensors, validation.

Every size comes from config.json; every tensor's shape is checked against it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from edgeguard.errors import ConversionError
from edgeguard.models.formats import CHECKPOINT_FILES
from edgeguard_convert.safetensors_reader import TensorRecord, read_checkpoint_tensors

ARCHITECTURES = {"Qwen3ForCausalLM": "gen", "Qwen3ForGuardModel": "stream"}
REQUIRED_FILES = CHECKPOINT_FILES
# Stream head tensors: (name, rows key, cols key); "hidden" and "inner" are resolved below.
HEAD_TENSORS = (
    ("risk_level_category_pre.weight", "inner", "hidden"),
    ("risk_level_category_layernorm.weight", "inner", None),
    ("risk_level_head.weight", "num_risk_level", "inner"),
    ("category_head.weight", "num_category", "inner"),
    ("query_risk_level_category_pre.weight", "inner", "hidden"),
    ("query_risk_level_category_layernorm.weight", "inner", None),
    ("query_risk_level_head.weight", "num_query_risk_level", "inner"),
    ("query_category_head.weight", "num_query_category", "inner"),
)
LABEL_MAPS = ("response_risk_level_map", "response_category_map", "query_risk_level_map", "query_category_map")


@dataclass(frozen=True)
class Hyper:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rms_eps: float
    rope_theta: float
    context: int
    tied: bool


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    kind: str  # "gen" | "stream"
    architecture: str
    config: dict
    hyper: Hyper
    tensors: dict[str, TensorRecord]
    labels: dict[str, list[str]] = field(default_factory=dict)  # stream label maps, index order

    @cached_property
    def has_lm_head(self) -> bool:
        """Whether the GGUF needs its own output projection: a Gen model with an lm_head that
        is not the embedding (untied, or stored with other values, which transformers then uses
        as it is). A stored exact copy of the embedding is not written twice; Stream never
        projects to the vocabulary."""
        if self.kind != "gen" or "lm_head.weight" not in self.tensors:
            return False
        if not self.hyper.tied:
            return True
        head, embd = self.tensors["lm_head.weight"], self.tensors["model.embed_tokens.weight"]
        if head.dtype != embd.dtype:
            return True
        step = max(1, (1 << 24) // max(1, head.nbytes // head.shape[0]))
        a, b = head.load_raw(), embd.load_raw()
        return any(not np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, head.shape[0], step))


def _int(config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"config.json: field {key!r} must be a positive integer, got {value!r}")
    return value


def _float(config: dict, key: str, default=None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConversionError(f"config.json: field {key!r} must be a positive finite number, got {value!r}")
    return float(value)


def _hyper(config: dict) -> Hyper:
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    return Hyper(
        hidden=hidden,
        layers=_int(config, "num_hidden_layers"),
        heads=heads,
        kv_heads=_int(config, "num_key_value_heads", heads),
        head_dim=_int({"head_dim": head_dim}, "head_dim"),
        ffn=_int(config, "intermediate_size"),
        vocab=_int(config, "vocab_size"),
        rms_eps=_float(config, "rms_norm_eps", 1e-6),
        rope_theta=_float(config, "rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 1e6)),
        context=_int(config, "max_position_embeddings"),
        tied=bool(config.get("tie_word_embeddings", True)),
    )


def expected_shapes(h: Hyper) -> dict[str, tuple[int, ...]]:
    """Backbone tensor name -> shape (rows, cols) implied by the config."""
    shapes = {"model.embed_tokens.weight": (h.vocab, h.hidden), "model.norm.weight": (h.hidden,)}
    q, kv = h.heads * h.head_dim, h.kv_heads * h.head_dim
    for i in range(h.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h.hidden,),
            p + "post_attention_layernorm.weight": (h.hidden,),
            p + "self_attn.q_proj.weight": (q, h.hidden),
            p + "self_attn.k_proj.weight": (kv, h.hidden),
            p + "self_attn.v_proj.weight": (kv, h.hidden),
            p + "self_attn.o_proj.weight": (h.hidden, q),
            p + "self_attn.q_norm.weight": (h.head_dim,),
            p + "self_attn.k_norm.weight": (h.head_dim,),
            p + "mlp.gate_proj.weight": (h.ffn, h.hidden),
            p + "mlp.up_proj.weight": (h.ffn, h.hidden),
            p + "mlp.down_proj.weight": (h.hidden, h.ffn),
        })
    return shapes


def _head_shapes(config: dict, h: Hyper) -> dict[str, tuple[int, ...]]:
    sizes = {"hidden": h.hidden, "inner": _int(config, "guard_inner_size")}
    for key in ("num_risk_level", "num_category", "num_query_risk_level", "num_query_category"):
        sizes[key] = _int(config, key)
    return {name: (sizes[r],) if c is None else (sizes[r], sizes[c]) for name, r, c in HEAD_TENSORS}


def _label_maps(config: dict) -> dict[str, list[str]]:
    sizes = {
        "response_risk_level_map": config.get("num_risk_level"),
        "response_category_map": config.get("num_category"),
        "query_risk_level_map": config.get("num_query_risk_level"),
        "query_category_map": config.get("num_query_category"),
    }
    labels = {}
    for key in LABEL_MAPS:
        raw = config.get(key)
        if not isinstance(raw, dict) or not raw:
            raise ConversionError(f"config.json: missing or malformed label map {key!r}")
        try:
            by_index = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError) as e:
            raise ConversionError(f"config.json: label map {key!r} must have integer-like keys") from e
        if sorted(by_index) != list(range(len(by_index))) or len(by_index) != sizes[key]:
            raise ConversionError(f"config.json: label map {key!r} does not cover 0..{sizes[key]}-1")
        labels[key.removesuffix("_map")] = [by_index[i] for i in range(len(by_index))]
    for key in ("response_risk_level", "query_risk_level"):
        if set(labels[key]) != {"Safe", "Unsafe", "Controversial"}:
            raise ConversionError(f"config.json: {key}_map must name Safe, Unsafe and Controversial")
    return labels


def load_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder (expected a Hugging Face checkpoint folder)")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise ConversionError(f"{folder}: missing {name}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"config.json: cannot parse ({e})") from e
    if not isinstance(config, dict):
        raise ConversionError("config.json: expected a JSON object")
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ConversionError(
            f"config.json: unsupported architecture {archs!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    if config.get("model_type", "qwen3") != "qwen3":
        raise ConversionError(f"config.json: unsupported model_type {config.get('model_type')!r} (need qwen3)")
    kind = ARCHITECTURES[arch]
    hyper = _hyper(config)
    tensors = read_checkpoint_tensors(folder)

    expected = expected_shapes(hyper)
    labels: dict[str, list[str]] = {}
    if kind == "stream":
        expected.update(_head_shapes(config, hyper))
        labels = _label_maps(config)
    elif "lm_head.weight" in tensors or not hyper.tied:
        expected["lm_head.weight"] = (hyper.vocab, hyper.hidden)

    if kind == "stream" and "lm_head.weight" in tensors:
        # The guard model does not use an output projection; an untied backbone may keep one.
        expected["lm_head.weight"] = (hyper.vocab, hyper.hidden)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{folder.name}: checkpoint lacks tensor {missing[0]}{more}")
    unknown = [n for n in tensors if n not in expected]
    if unknown:
        raise ConversionError(f"{folder.name}: unexpected tensor {unknown[0]} for {arch}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ConversionError(
                f"{folder.name}: tensor {name} has shape {list(tensors[name].shape)}, config implies {list(shape)}"
            )
    return Checkpoint(folder, kind, arch, config, hyper, tensors, labels)
