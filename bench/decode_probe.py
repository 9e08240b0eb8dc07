"""What one llama.cpp decode costs on this CPU, with the C API only (no edgeguard engine):

- prefill: ms per token of one decode of 32 / 108 / 201 / 309 tokens from an empty cache
  (logits for the last token only);
- backlog: one sequence decoding 1 / 2 / 4 / 8 / 16 tokens at position 512 (logits for each);
- layouts: 8 sequences of 512 tokens in one context, unified KV or per-sequence streams
  (``kv_unified=false``), flash attention on or off: one sequence's step among them, and one
  step of all 8.

    python bench/decode_probe.py            # plain full-vocabulary random 0.6B, Q4_K_M, 2 threads

Medians of 5 (prefill: minima of 3). Weights are placed as edgeguard places them (AMX kept off
on builds where it crashes).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    import llama_cpp as L

    from bench import models
    from edgeguard.llama_model import load_model

    path = models.gguf_path(models.plain_model(only=("q4_k_m",)), "q4_k_m")
    L.llama_backend_init()
    model, _, _ = load_model(path, vocab_only=False, n_gpu_layers=0, verbose=False)
    batch = L.llama_batch_init(512, 0, 1)
    rng = np.random.default_rng(0)

    def context(n_seq: int, n_ctx: int, *, unified: bool = True, flash: bool = False):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.kv_unified = unified
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp gave no context")
        return ctx

    def decode(ctx, items, last_only: bool = False) -> float:
        """items: (seq, pos, token); seconds for one llama_decode of them all, with logits for
        every token (a step of several sequences, a Stream backlog) or the last (a prefill)."""
        for i, (s, p, t) in enumerate(items):
            out = i == len(items) - 1 or not last_only
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, out
            batch.seq_id[i][0] = s
        batch.n_tokens = len(items)
        t0 = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t0

    def drop(ctx, seq: int, pos: int) -> None:
        L.llama_memory_seq_rm(L.llama_get_memory(ctx), seq, pos, -1)

    def tokens(n: int) -> list[int]:
        return [int(t) for t in rng.integers(1000, 100000, n)]

    ctx = context(1, 1024)
    print("prefill from an empty cache, ms per token:")
    toks = tokens(309)
    for n in (32, 108, 201, 309):
        best = []
        for _ in range(3):
            drop(ctx, 0, 0)
            best.append(decode(ctx, [(0, p, t) for p, t in enumerate(toks[:n])], last_only=True))
        print(f"  {n:4d} tokens: {min(best) * 1e3 / n:.2f}")
    drop(ctx, 0, 0)
    decode(ctx, [(0, p, t) for p, t in enumerate(tokens(512))])
    print("one sequence, a backlog of k tokens at position 512, ms:")
    for k in (1, 2, 4, 8, 16):
        times = []
        for _ in range(5):
            times.append(decode(ctx, [(0, 512 + i, 5000 + i) for i in range(k)]))
            drop(ctx, 0, 512)
        print(f"  k={k:2d}: {statistics.median(times) * 1e3:.1f}")
    L.llama_free(ctx)

    print("8 sequences of 512 tokens, ms: one sequence's step among them / one step of all 8")
    for unified in (True, False):
        for flash in (True, False):
            ctx = context(8, 8 * 768, unified=unified, flash=flash)
            for s in range(8):
                decode(ctx, [(s, p, t) for p, t in enumerate(tokens(512))])
            one, all8 = [], []
            for _ in range(5):
                one.append(decode(ctx, [(0, 512, 5000)]))
                drop(ctx, 0, 512)
                all8.append(decode(ctx, [(s, 512, 5000 + s) for s in range(8)]))
                for s in range(8):
                    drop(ctx, s, 512)
            print(f"  {'unified' if unified else 'per-sequence streams'}, flash attention "
                  f"{'on' if flash else 'off'}: {statistics.median(one) * 1e3:.1f} / "
                  f"{statistics.median(all8) * 1e3:.1f}")
            L.llama_free(ctx)
    L.llama_batch_free(batch)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
