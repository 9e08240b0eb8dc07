"""Stream: per-token ``session.feed([id])`` against one bare llama.cpp decode step on the plain
full-vocabulary GGUF of the same weights and quant; a backlog of k tokens in one feed against k
single feeds; prompt ``check`` latency; transformers KV-cache forward per token.

edgeguard and the bare llama.cpp steps run in one process, interleaved token by token, so
that load from other processes hits both alike. transformers runs in its own process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import Timer, stats_ms, words, worker_main


class BareLlama:
    """The plain llama.cpp C API, nothing else: one context, a reusable batch, no copies."""

    def __init__(
        self,
        path: Path,
        threads: int,
        *,
        embeddings: bool = False,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
    ):
        import llama_cpp

        from edgeguard.runtime.llama_model import load_model

        self.L = L = llama_cpp
        L.llama_backend_init()
        # llama.cpp's own weight placement, except that on AMX builds (whose AMX kernels crash
        # with GCC 11/12) the repacked AVX2/AVX-512 kernels are chosen by name, as edgeguard does.
        self.model, _, _ = load_model(path, vocab_only=False, n_gpu_layers=n_gpu_layers, verbose=False)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.embeddings = embeddings
        cp.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        cp.no_perf = True
        if flash_attn is not None:  # else llama.cpp's own choice ("auto")
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k, cp.type_v = {
            "f16": (L.GGML_TYPE_F16, L.GGML_TYPE_F16),
            "q8_0-keys": (L.GGML_TYPE_Q8_0, L.GGML_TYPE_F16),
            "q8_0": (L.GGML_TYPE_Q8_0, L.GGML_TYPE_Q8_0),
        }[kv_type]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx {n_ctx}, kv {kv_type})")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(512, 0, 1)
        self.embeddings = embeddings
        self.n_past = 0

    def clear(self):
        self.L.llama_memory_clear(self.mem, True)
        self.n_past = 0

    def decode(self, tokens):
        """Decode tokens at the next positions; output (logits or embedding) for the last only."""
        b, n = self.batch, len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (i == n - 1 or self.embeddings) else 0
        b.n_tokens = n
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        self.n_past += n
        get = self.L.llama_get_embeddings_ith if self.embeddings else self.L.llama_get_logits_ith
        ptr = get(self.ctx, n - 1)
        assert ptr
        return ptr

    def generate(self, tokens, n_new: int) -> list[int]:
        """Plain greedy generation: prefill (512-token chunks), then one decode per new token."""
        for start in range(0, len(tokens), 512):
            ptr = self.decode(tokens[start : start + 512])
        n_vocab = self.L.llama_vocab_n_tokens(self.L.llama_model_get_vocab(self.model))
        out = []
        for _ in range(n_new):
            out.append(int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax()))
            if len(out) < n_new:
                ptr = self.decode(out[-1:])
        return out

    def close(self):
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def _response_ids(n: int, seed: int = 5) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(1000, 150000, size=n)]


def per_token(args: dict) -> dict:
    import edgeguard
    from bench.models import gguf_path

    folder, plain, quant = Path(args["folder"]), Path(args["plain"]), args["quant"]
    threads, n_tok, k = int(args["threads"]), int(args["n_tokens"]), int(args.get("backlog", 16))
    device = args.get("device", "cpu")
    with Timer() as t:
        guard = edgeguard.load(folder, quant, n_threads=threads, device=device)
    load_s = t.s
    layers = guard.device.n_gpu_layers
    bare = BareLlama(gguf_path(plain, quant), threads, n_gpu_layers=layers)
    bare_emb = (
        BareLlama(gguf_path(plain, quant), threads, embeddings=True, n_gpu_layers=layers)
        if args.get("embd_mode", True)
        else None
    )
    prompt = words(40, 11)
    ids = _response_ids(n_tok + 8)
    prompt_tokens, _ = guard.prompt_tokens(prompt)
    n_prompt = len(prompt_tokens)
    fill = _response_ids(n_prompt, seed=9)  # same positions for the bare baselines

    # Per-token: feed([id]) interleaved with one bare decode step on the plain GGUF.
    session = guard.session(prompt)
    for b in (bare, bare_emb):
        if b:
            b.clear()
            b.decode(fill)
    feed_t, bare_t, emb_t, dec_t, head_t = [], [], [], [], []
    for i, tok in enumerate(ids):
        e0, h0 = guard.timings.decode_ms / 1e3, guard.timings.heads_ms / 1e3
        with Timer() as tm:
            session.feed([tok])
        with Timer() as tb:
            bare.decode([tok])
        if bare_emb:
            with Timer() as te:
                bare_emb.decode([tok])
        if i >= 4:  # first steps: warm-up
            feed_t.append(tm.s)
            bare_t.append(tb.s)
            dec_t.append(guard.timings.decode_ms / 1e3 - e0)
            head_t.append(guard.timings.heads_ms / 1e3 - h0)
            if bare_emb:
                emb_t.append(te.s)

    # Backlog: feed(k ids) once vs k single feeds (rolled back in between), interleaved.
    back_t, singles_t = [], []
    backlog = _response_ids(k, seed=7)
    for _ in range(int(args.get("backlog_reps", 3))):
        with Timer() as tm:
            session.feed(backlog)
        back_t.append(tm.s)
        session.rollback(k)
        with Timer() as tm:
            for tok in backlog:
                session.feed([tok])
        singles_t.append(tm.s)
        session.rollback(k)
    session.close()

    # Prompt check latency vs a bare prefill of the same number of tokens (fresh KV).
    check_t, prefill_t, by_kind = [], [], {}
    for kind, n in (("short", 10), ("medium", 60), ("long", 250)):
        for r in range(int(args.get("check_reps", 3)) + 1):
            p = words(n, 100 * r + n)  # a new text each time: no reuse beyond the template head
            toks, end = guard.prompt_tokens(p)
            with Timer() as tm:
                guard.check(p)
            bare.clear()
            with Timer() as tb:
                bare.decode(_response_ids(end + 1, seed=3))
            if r:
                check_t.append(tm.s)
                prefill_t.append(tb.s)
                by_kind.setdefault(kind, {"check": [], "bare_prefill": [], "n_tokens": end + 1})
                by_kind[kind]["check"].append(tm.s)
                by_kind[kind]["bare_prefill"].append(tb.s)
    guard.close()
    bare.close()
    if bare_emb:
        bare_emb.close()
    feed_med = stats_ms(feed_t)["median_ms"]
    return {
        "quant": quant,
        "threads": threads,
        "load_s": load_s,
        "n_prompt_tokens": n_prompt,
        "feed": stats_ms(feed_t),
        "bare_decode": stats_ms(bare_t),
        "bare_decode_embd_mode": stats_ms(emb_t),
        "breakdown_median_ms": {
            "feed_total": feed_med,
            "llama_decode": stats_ms(dec_t)["median_ms"],
            "onnx_heads": stats_ms(head_t)["median_ms"],
            "python_other": feed_med - stats_ms(dec_t)["median_ms"] - stats_ms(head_t)["median_ms"],
        },
        "backlog": {"k": k, "one_feed": stats_ms(back_t), "k_single_feeds": stats_ms(singles_t)},
        "check": stats_ms(check_t),
        "bare_prefill": stats_ms(prefill_t),
        "check_by_kind": {
            kd: {"n_tokens": v["n_tokens"], "check": stats_ms(v["check"]), "bare_prefill": stats_ms(v["bare_prefill"])}
            for kd, v in by_kind.items()
        },
    }


def transformers_per_token(args: dict) -> dict:
    """Qwen3Model backbone (bf16 or fp32) with a KV cache + the head math of tests/fixtures/oracle.py."""
    import torch
    from transformers import Qwen3Model

    from tests.fixtures.oracle import StreamHeads

    threads = int(args["threads"])
    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args["dtype"]]
    with Timer() as t:
        model = Qwen3Model.from_pretrained(args["ckpt"], dtype=dtype).eval()
        heads = StreamHeads.from_checkpoint(Path(args["ckpt"]))
    load_s = t.s
    prompt = _response_ids(int(args.get("n_prompt", 60)), seed=9)
    ids = _response_ids(int(args["n_tokens"]) + 2)
    times = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        past = out.past_key_values
        for i, tok in enumerate(ids):
            with Timer() as tm:
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                h = out.last_hidden_state[0, -1:].to(torch.float32)
                logits = heads(h)
                float(logits["response_risk"][0, 0])
            if i >= 2:
                times.append(tm.s)
    return {"dtype": args["dtype"], "threads": threads, "load_s": load_s, "per_token": stats_ms(times)}


if __name__ == "__main__":
    worker_main({"per_token": per_token, "transformers": transformers_per_token})
