"""Peak memory: each engine in its own fresh process; peak RSS = VmHWM from /proc/self/status
(the whole process: interpreter, libraries, memory-mapped model pages touched, KV cache)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import peak_rss_mb, rss_mb, words, worker_main


def _imports(args: dict) -> dict:
    import edgeguard.engines.gen
    import edgeguard.engines.stream  # noqa: F401  (+ onnxruntime)

    return {"what": "python + edgeguard imports only", "peak_rss_mb": peak_rss_mb()}


def _gen(args: dict) -> dict:
    import edgeguard

    with tempfile.TemporaryDirectory() as d:
        guard = edgeguard.load(Path(args["folder"]), args["quant"], prefix_cache=Path(d))
        after_load = rss_mb()
        guard.check(words(60, 1))
        return {
            "what": f"edgeguard Gen {args['quant']}: load + one check",
            "rss_after_load_mb": after_load,
            "rss_mb": rss_mb(),
            "peak_rss_mb": peak_rss_mb(),
        }


def _stream(args: dict) -> dict:
    import numpy as np

    import edgeguard

    guard = edgeguard.load(Path(args["folder"]), args["quant"])
    after_load = rss_mb()
    rng = np.random.default_rng(0)
    with guard.session(words(40, 2)) as s:
        for tok in rng.integers(1000, 150000, size=int(args.get("n_tokens", 64))):
            s.feed([int(tok)])
    return {
        "what": f"edgeguard Stream {args['quant']}: load + session of {args.get('n_tokens', 64)} tokens",
        "rss_after_load_mb": after_load,
        "rss_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }


def _llama_plain(args: dict) -> dict:
    import llama_cpp

    from bench.models import gguf_path

    llm = llama_cpp.Llama(
        model_path=str(gguf_path(Path(args["folder"]), args["quant"])),
        n_ctx=2048,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    toks = llm.tokenize(words(60, 1).encode(), add_bos=False)
    for i, _ in enumerate(llm.generate(toks, temp=0.0)):
        if i == 8:
            break
    return {
        "what": f"llama-cpp-python Llama {args['quant']} (n_ctx 2048, n_batch 512): 9-token generation",
        "peak_rss_mb": peak_rss_mb(),
    }


def _transformers(args: dict) -> dict:
    import torch
    from transformers import Qwen3ForCausalLM

    torch.set_num_threads(2)
    model = Qwen3ForCausalLM.from_pretrained(args["ckpt"], dtype=torch.bfloat16).eval()
    x = torch.tensor([list(range(1000, 1300))])
    with torch.inference_mode():
        model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=9,
            min_new_tokens=9,
            do_sample=False,
            pad_token_id=151643,
        )
    return {
        "what": "transformers bf16 Qwen3ForCausalLM: load + generate 9 tokens (300-token prompt)",
        "peak_rss_mb": peak_rss_mb(),
    }


def _breakdown(args: dict) -> dict:
    """Where a llama.cpp engine's resident memory goes: after the model load (mmap, CPU repack of
    quantized weights), after the context (KV cache, compute and output buffers), after a
    300-token decode. Variants: no CPU repack, smaller n_ctx, q8_0 KV cache."""
    import llama_cpp as L

    steps = {"start": rss_mb()}
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    # llama_model_params of 0.3.36 has no use_mmap (load_mode instead); use_extra_bufts=False skips
    # the CPU repack of quantized weights (which otherwise keeps a second copy beside the mmap).
    mp.use_extra_bufts = bool(args.get("repack", True))
    model = L.llama_model_load_from_file(args["gguf"].encode(), mp)
    steps["model_loaded"] = rss_mb()
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = int(args.get("n_ctx", 2048)), 512, 512, 1
    cp.n_threads = cp.n_threads_batch = 2
    cp.embeddings = bool(args.get("embeddings", False))
    cp.pooling_type = L.LLAMA_POOLING_TYPE_NONE
    if args.get("kv_q8"):
        cp.type_k = cp.type_v = 8  # GGML_TYPE_Q8_0
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    steps["context_created"] = rss_mb()
    batch = L.llama_batch_init(512, 0, 1)
    n = 300
    for i in range(n):
        batch.token[i] = 1000 + i
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if (i == n - 1 or cp.embeddings) else 0
    batch.n_tokens = n
    L.llama_decode(ctx, batch)
    steps["after_300_token_decode"] = rss_mb()
    return {"what": args["what"], "steps_rss_mb": steps, "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    worker_main(
        {
            "imports": _imports,
            "gen": _gen,
            "stream": _stream,
            "llama_plain": _llama_plain,
            "transformers": _transformers,
            "breakdown": _breakdown,
        }
    )
