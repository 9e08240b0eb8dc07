"""Random-weight Qwen3Guard models of the exact 0.6B shapes, made once into a cache.

Checkpoints are written in the real Hugging Face layout (config.json, bf16 model.safetensors
with the real tensor names, the real-vocabulary tokenizer files of tests/fixtures) straight
from numpy (bf16 = the top 16 bits of a float32), then converted by the project's own
converter. Speed does not depend on the values: std 0.02 normals, norms at 1.

Cache: ``$EDGEGUARD_BENCH_CACHE`` or ``<repo>/.cache/bench``. Every folder is built into a
temporary sibling and renamed into place, so an interrupted build is redone, never reused.

    python -m bench.models          # build everything (prints the paths)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The exact Qwen3Guard-0.6B shape (qwen3guard-facts.md).
SHAPE = dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=3072, vocab=151936, guard_inner=512)
VERSION = "1"  # bump when the builders' output changes
GEN_QUANTS = ("q4_k_m", "q4_0", "q8_0", "bf16")
STREAM_QUANTS = ("q4_k_m", "q8_0")
STD = 0.02


def cache_root() -> Path:
    env = os.environ.get("EDGEGUARD_BENCH_CACHE")
    root = Path(env) if env else REPO / ".cache" / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cached(final: Path, build) -> Path:
    if final.is_dir():
        return final
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------
# safetensors written with numpy
# ------------------------------------------------------------------------------------------
def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), by truncation."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


class _Random:
    """Lazily generated bf16 tensors; rows are produced in chunks to bound memory."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape):
        def gen(out: np.ndarray) -> None:
            rows = shape[0]
            step = max(1, (1 << 24) // int(np.prod(shape[1:], dtype=np.int64) or 1))
            for s in range(0, rows, step):
                n = min(step, rows - s)
                block = self.rng.standard_normal((n,) + tuple(shape[1:]), dtype=np.float32)
                block *= STD
                out[s : s + n] = _bf16_bits(block)

        return shape, gen

    @staticmethod
    def ones(shape):
        def gen(out: np.ndarray) -> None:
            out[...] = 0x3F80  # bf16 1.0

        return shape, gen


def write_safetensors(path: Path, tensors: dict) -> None:
    """tensors: name -> (shape, fill(out_uint16_view)) or a uint16 array of bf16 bits."""
    specs, offset = {}, 0
    for name, t in tensors.items():
        shape = t.shape if isinstance(t, np.ndarray) else t[0]
        nbytes = int(np.prod(shape, dtype=np.int64)) * 2
        specs[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    specs["__metadata__"] = {"format": "pt"}
    header = json.dumps(specs, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        base = f.tell()
    total = base + offset
    mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(total,))
    try:
        for name, t in tensors.items():
            begin, end = specs[name]["data_offsets"]
            view = mm[base + begin : base + end].view(np.uint16)
            if isinstance(t, np.ndarray):
                view[:] = t.reshape(-1)
            else:
                shape, fill = t
                fill(view.reshape(shape))
        mm.flush()
    finally:
        del mm


def read_safetensors_bf16(path: Path) -> dict[str, np.ndarray]:
    """name -> memory-mapped uint16 bf16 bits (for copying tensors between checkpoints)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = np.memmap(path, dtype=np.uint16, mode="r", offset=8 + n + b, shape=tuple(info["shape"]))
    return out


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def _backbone_tensors(r: _Random) -> dict:
    h, d, f = SHAPE["hidden"], SHAPE["head_dim"], SHAPE["ffn"]
    q, kv = SHAPE["heads"] * d, SHAPE["kv_heads"] * d
    t = {"model.embed_tokens.weight": r.normal((SHAPE["vocab"], h))}
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = r.ones((h,))
        t[p + "self_attn.q_proj.weight"] = r.normal((q, h))
        t[p + "self_attn.k_proj.weight"] = r.normal((kv, h))
        t[p + "self_attn.v_proj.weight"] = r.normal((kv, h))
        t[p + "self_attn.o_proj.weight"] = r.normal((h, q))
        t[p + "self_attn.q_norm.weight"] = r.ones((d,))
        t[p + "self_attn.k_norm.weight"] = r.ones((d,))
        t[p + "post_attention_layernorm.weight"] = r.ones((h,))
        t[p + "mlp.gate_proj.weight"] = r.normal((f, h))
        t[p + "mlp.up_proj.weight"] = r.normal((f, h))
        t[p + "mlp.down_proj.weight"] = r.normal((h, f))
    t["model.norm.weight"] = r.ones((h,))
    return t


def _head_tensors(r: _Random, n_resp_cat: int, n_query_cat: int) -> dict:
    g, h = SHAPE["guard_inner"], SHAPE["hidden"]
    t = {}
    for prefix, n_cat in (("", n_resp_cat), ("query_", n_query_cat)):
        t[f"{prefix}risk_level_category_pre.weight"] = r.normal((g, h))
        t[f"{prefix}risk_level_category_layernorm.weight"] = r.ones((g,))
        t[f"{prefix}risk_level_head.weight"] = r.normal((3, g))
        t[f"{prefix}category_head.weight"] = r.normal((n_cat, g))
    return t


def _config(kind: str) -> dict:
    from tests.fixtures import checkpoints as fx

    cfg = {
        "architectures": ["Qwen3ForCausalLM"] if kind == "gen" else ["Qwen3ForGuardModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": fx.ENDOFTEXT_ID,
        "eos_token_id": fx.IM_END_ID,
        "head_dim": SHAPE["head_dim"],
        "hidden_act": "silu",
        "hidden_size": SHAPE["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": SHAPE["ffn"],
        "max_position_embeddings": 40960 if kind == "gen" else 8192,
        "max_window_layers": SHAPE["layers"],
        "model_type": "qwen3",
        "num_attention_heads": SHAPE["heads"],
        "num_hidden_layers": SHAPE["layers"],
        "num_key_value_heads": SHAPE["kv_heads"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": SHAPE["vocab"],
    }
    if kind == "stream":
        cfg.update(
            {
                "guard_inner_size": SHAPE["guard_inner"],
                "num_risk_level": len(fx.RISK_LEVEL_MAP),
                "num_category": len(fx.RESPONSE_CATEGORY_MAP),
                "num_query_risk_level": len(fx.RISK_LEVEL_MAP),
                "num_query_category": len(fx.QUERY_CATEGORY_MAP),
                "response_risk_level_map": dict(fx.RISK_LEVEL_MAP),
                "response_category_map": dict(fx.RESPONSE_CATEGORY_MAP),
                "query_risk_level_map": dict(fx.RISK_LEVEL_MAP),
                "query_category_map": dict(fx.QUERY_CATEGORY_MAP),
            }
        )
    return cfg


def _write_side_files(tmp: Path, kind: str) -> None:
    from tests.fixtures import checkpoints as fx

    (tmp / "config.json").write_text(json.dumps(_config(kind), indent=2) + "\n")
    shutil.copyfile(fx.tokenizer_json_path(), tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(fx.tokenizer_config(kind), indent=2, ensure_ascii=False) + "\n"
    )
    gen_cfg = {
        "bos_token_id": fx.ENDOFTEXT_ID,
        "do_sample": False,
        "eos_token_id": [fx.IM_END_ID, fx.ENDOFTEXT_ID],
        "pad_token_id": fx.ENDOFTEXT_ID,
        "transformers_version": "4.51.0",
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")


def gen_checkpoint(log=print) -> Path:
    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        _write_side_files(tmp, "gen")
        write_safetensors(tmp / "model.safetensors", _backbone_tensors(_Random(1)))
        log(f"  wrote random Gen 0.6B checkpoint in {time.perf_counter() - t0:.1f} s")

    return _cached(cache_root() / f"ckpt-gen-0.6b-v{VERSION}", build)


def stream_checkpoint(log=print) -> Path:
    from tests.fixtures import checkpoints as fx

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        _write_side_files(tmp, "stream")
        r = _Random(2)
        tensors = _backbone_tensors(r)
        tensors.update(_head_tensors(r, len(fx.RESPONSE_CATEGORY_MAP), len(fx.QUERY_CATEGORY_MAP)))
        write_safetensors(tmp / "model.safetensors", tensors)
        log(f"  wrote random Stream 0.6B checkpoint in {time.perf_counter() - t0:.1f} s")

    return _cached(cache_root() / f"ckpt-stream-0.6b-v{VERSION}", build)


def plain_checkpoint(log=print) -> Path:
    """The Stream checkpoint's backbone relabelled as Qwen3ForCausalLM (same weights, no heads):
    converted, it is the plain full-vocabulary GGUF that a bare llama.cpp user would run."""
    src = stream_checkpoint(log)

    def build(tmp: Path) -> None:
        _write_side_files(tmp, "gen")
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["max_position_embeddings"] = 8192
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = {k: v for k, v in read_safetensors_bf16(src / "model.safetensors").items() if k.startswith("model.")}
        write_safetensors(tmp / "model.safetensors", tensors)

    return _cached(cache_root() / f"ckpt-plain-0.6b-v{VERSION}", build)


def _converted(ckpt: Path, name: str, quants: tuple[str, ...], log, default: tuple[str, ...]) -> Path:
    from edgeguard_convert import ConvertOptions, convert

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        out = tmp / "model"
        convert(ckpt, out, ConvertOptions(quants=quants, name=name), progress=lambda m: None)
        for p in out.iterdir():
            os.rename(p, tmp / p.name)
        out.rmdir()
        log(f"  converted {name} to {', '.join(quants)} in {time.perf_counter() - t0:.1f} s")

    subset = "" if tuple(quants) == tuple(default) else "-" + "-".join(quants)
    return _cached(cache_root() / f"converted-{name}-v{VERSION}{subset}", build)


def _pick(default: tuple[str, ...], only: tuple[str, ...] | None) -> tuple[str, ...]:
    """The default quants, or those of them named in ``only`` (q4_k_m when none is)."""
    if not only:
        return default
    return tuple(q for q in default if q in only) or ("q4_k_m",)


def gen_model(log=print, only: tuple[str, ...] | None = None) -> Path:
    return _converted(gen_checkpoint(log), "qwen3guard-gen-0.6b-random", _pick(GEN_QUANTS, only), log, GEN_QUANTS)


def stream_model(log=print, only: tuple[str, ...] | None = None) -> Path:
    return _converted(
        stream_checkpoint(log), "qwen3guard-stream-0.6b-random", _pick(STREAM_QUANTS, only), log, STREAM_QUANTS
    )


def plain_model(log=print, only: tuple[str, ...] | None = None) -> Path:
    return _converted(plain_checkpoint(log), "qwen3-0.6b-plain-random", _pick(STREAM_QUANTS, only), log, STREAM_QUANTS)


def gguf_path(folder: Path, quant: str, role: str = "model") -> Path:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        if entry.get("role") == role and (role != "model" or entry.get("quant") == quant):
            return Path(folder) / name
    raise FileNotFoundError(f"no {role} {quant} file in {folder}")


def all_models(log=print, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """Every benchmark model; ``only`` limits the converted quants (a smaller, separate cache)."""
    return {
        "gen": str(gen_model(log, only)),
        "stream": str(stream_model(log, only)),
        "plain": str(plain_model(log, only)),
        "gen_ckpt": str(gen_checkpoint(log)),
        "stream_ckpt": str(stream_checkpoint(log)),
    }


if __name__ == "__main__":
    t0 = time.perf_counter()
    if sys.argv[1:] == ["--checkpoints"]:  # numpy only: no llama.cpp needed (e.g. while it builds)
        print(json.dumps({"gen_ckpt": str(gen_checkpoint()), "plain_ckpt": str(plain_checkpoint())}, indent=2))
    else:
        print(
            json.dumps(
                all_models(only=tuple(sys.argv[2].split(",")) if sys.argv[1:2] == ["--quants"] else None), indent=2
            )
        )
    print(f"models ready in {time.perf_counter() - t0:.1f} s")
