"""A short decode of a tiny random Qwen3 backbone, meant to run in a child process.

``edgeguard doctor`` runs it with ``python -m edgeguard.selftest DIR`` so that a native crash of
the user's llama.cpp build (a bad kernel, a broken GPU driver) ends the child, not the caller,
and becomes a report. The model is written with the ``gguf`` package and quantized to Q4_0 by
llama.cpp itself: Q4_0 is a type that both the AMX and the AVX2/AVX-512 repacked kernels take,
so a multi-token decode reaches the same kernels a real model would.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 256, 2, 4, 2, 64, 512, 8
BATCH = 32  # more than one token: the AMX crash needs a batch


def write_backbone(path: Path, seed: int = 0) -> None:
    """A random Qwen3 backbone with a dummy 8-token vocabulary (no tokenizer), f32 weights."""
    import gguf

    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    writer = gguf.GGUFWriter(os.fspath(path), "qwen3")
    for add_int, number in ((writer.add_context_length, 512), (writer.add_embedding_length, HIDDEN),
                            (writer.add_block_count, LAYERS), (writer.add_feed_forward_length, FFN),
                            (writer.add_head_count, HEADS), (writer.add_head_count_kv, KV_HEADS),
                            (writer.add_key_length, HEAD_DIM), (writer.add_value_length, HEAD_DIM),
                            (writer.add_vocab_size, VOCAB)):
        add_int(number)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_tokenizer_model("none")
    writer.add_tensor("token_embd.weight", matrix(VOCAB, HIDDEN))
    ones = np.ones(HIDDEN, np.float32)
    for i in range(LAYERS):
        p = f"blk.{i}."
        for name, shape in (("attn_q", (HEADS * HEAD_DIM, HIDDEN)), ("attn_k", (KV_HEADS * HEAD_DIM, HIDDEN)),
                            ("attn_v", (KV_HEADS * HEAD_DIM, HIDDEN)), ("attn_output", (HIDDEN, HEADS * HEAD_DIM)),
                            ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            writer.add_tensor(p + name + ".weight", matrix(*shape))
        for name, size in (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("attn_q_norm", HEAD_DIM),
                           ("attn_k_norm", HEAD_DIM)):
            writer.add_tensor(p + name + ".weight", ones[:size].copy())
    writer.add_tensor("output_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run(folder: Path, device: str) -> dict:
    """Write, quantize, load with edgeguard's settings and decode; returns what was seen. The
    context is Stream's: flash attention and its KV type on this device (q8_0 keys on the CPU)."""
    from edgeguard.engines.stream import DEFAULTS
    from edgeguard.runtime.backend import Backend, choose_device
    from edgeguard_convert.quantize import quantize

    folder.mkdir(parents=True, exist_ok=True)
    f32, q4 = folder / "selftest-f32.gguf", folder / "selftest-q4_0.gguf"
    if not q4.exists():
        write_backbone(f32)
        quantize(f32, q4, "q4_0", threads=1)
        f32.unlink()
    choice = choose_device(device)
    rows = np.random.default_rng(1).standard_normal((BATCH, HIDDEN)).astype(np.float32)
    t0 = time.perf_counter()
    with Backend(q4, n_ctx=256, mode="embeddings", n_batch=64, n_threads=None, n_gpu_layers=choice.n_gpu_layers,
                 repack=True, flash_attn=True, kv_type=DEFAULTS.kv_type_on(choice.device),
                 kv_fallback="f16") as backend:
        hidden = backend.eval(embd=rows, outputs=range(BATCH))
        step = backend.eval(embd=rows[:1], outputs=(0,))
        return {
            "ok": bool(np.isfinite(hidden).all() and np.isfinite(step).all()),
            "device": choice.device,
            "kv_type": backend.kv_type,
            "kernels": backend.kernel_plan.kernels,
            "buffers": backend.buffers,
            "decode_ms": round((time.perf_counter() - t0) * 1e3, 1),
        }


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m edgeguard.selftest FOLDER [auto|cpu|gpu]", file=sys.stderr)
        return 2
    result = run(Path(argv[1]), argv[2] if len(argv) == 3 else "auto")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
