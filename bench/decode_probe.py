"""What one llama.cpp decode costs on this CPU, with the C API only (no edgeguard engine):

- prefill: ms per token of one decode of 32 / 108 / 201 / 309 tokens from an empty cache
  (logits for the last token only);
- backlog: one sequence decoding 1 / 2 / 4 / 8 / 16 / 32 tokens at position 512 (logits for each);
- layouts: 8 sequences of 512 tokens in one context, unified KV or per-sequence streams
  (``kv_unified=false``), flash attention on or off: one sequence's step among them, and one
  step of all 8;
- keys: one sequence's single-token step at 100 / 2,000 / 4,000 / 7,000 cached tokens with
  plain attention, f16 keys against q8_0 keys (values f16 in both: what edgeguard's
  "q8_0-keys" cache is), the two contexts timed in turns;
- crowdkv: 8 sequences of 512 tokens in one unified context with flash attention (edgeguard's
  crowded Stream), K/V cache f16/f16, q8_0/f16 and q8_0/q8_0: ms per token of filling each
  sequence (512 tokens in one decode), one sequence's step among them, one step of all 8, and
  the KV cache's size.

    python bench/decode_probe.py [--only prefill,backlog,layouts,keys,crowdkv] [--model plain|stream]
    # random 0.6B, Q4_K_M, 2 threads: the plain full-vocabulary GGUF (default), or Stream's
    # backbone GGUF (dummy 8-token vocabulary: no vocabulary projection, what a Stream step runs)

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
    import argparse

    import llama_cpp as L

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="prefill,backlog,layouts,keys,crowdkv")
    ap.add_argument("--model", choices=("plain", "stream"), default="plain")
    a = ap.parse_args()
    only = set(a.only.split(","))

    from bench import models
    from edgeguard.runtime.llama_model import load_model

    folder = (models.stream_model if a.model == "stream" else models.plain_model)(only=("q4_k_m",))
    path = models.gguf_path(folder, "q4_k_m")
    low, high = (0, 8) if a.model == "stream" else (1000, 100000)  # token ids drawn from this range
    L.llama_backend_init()
    model, _, _ = load_model(path, vocab_only=False, n_gpu_layers=0, verbose=False)
    batch = L.llama_batch_init(512, 0, 1)
    rng = np.random.default_rng(0)

    def context(
        n_seq: int,
        n_ctx: int,
        *,
        unified: bool = True,
        flash: bool = False,
        keys=L.GGML_TYPE_F16,
        values=L.GGML_TYPE_F16,
    ):
        cp = L.llama_context_default_params()
        cp.type_k, cp.type_v = keys, values
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

    def crowd_steps(ctx) -> tuple[float, float]:
        """8 sequences of 512 tokens in ``ctx``: medians of 5 (ms) of sequence 0's step alone
        among them and of one step of all 8, each taken back afterwards."""
        one, all8 = [], []
        for _ in range(5):
            one.append(decode(ctx, [(0, 512, 1)]))
            drop(ctx, 0, 512)
            all8.append(decode(ctx, [(s, 512, 1 + s % 7) for s in range(8)]))
            for s in range(8):
                drop(ctx, s, 512)
        return statistics.median(one) * 1e3, statistics.median(all8) * 1e3

    def tokens(n: int) -> list[int]:
        return [int(t) for t in rng.integers(low, high, n)]

    ctx = context(1, 1024)
    if "prefill" in only:
        print("prefill from an empty cache, ms per token:")
        toks = tokens(309)
        for n in (32, 108, 201, 309):
            best = []
            for _ in range(3):
                drop(ctx, 0, 0)
                best.append(decode(ctx, [(0, p, t) for p, t in enumerate(toks[:n])], last_only=True))
            print(f"  {n:4d} tokens: {min(best) * 1e3 / n:.2f}")
    if "backlog" in only:
        drop(ctx, 0, 0)
        decode(ctx, [(0, p, t) for p, t in enumerate(tokens(512))])
        print("one sequence, a backlog of k tokens at position 512, ms:")
        for k in (1, 2, 4, 8, 16, 32):
            times = []
            for _ in range(5):
                times.append(decode(ctx, [(0, 512 + i, 1 + i % 7) for i in range(k)]))
                drop(ctx, 0, 512)
            ms = statistics.median(times) * 1e3
            print(f"  k={k:2d}: {ms:.1f} ({ms / k:.1f} a token)")
    L.llama_free(ctx)

    if "keys" in only:
        print(
            "one sequence, plain attention, single-token step at N cached tokens, ms (median of 9, "
            "the two contexts in turns): f16 keys / q8_0 keys"
        )
        kinds = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0}
        ctxs = {k: context(1, 7424, keys=t) for k, t in kinds.items()}
        filled, stream = 0, tokens(7100)
        for n in (100, 2000, 4000, 7000):
            while filled < n:
                step = min(512, n - filled)
                for c in ctxs.values():
                    decode(c, [(0, filled + i, stream[filled + i]) for i in range(step)], last_only=True)
                filled += step
            times = {k: [] for k in ctxs}
            for _ in range(9):
                for k, c in ctxs.items():
                    times[k].append(decode(c, [(0, n, 1)]))
                    drop(c, 0, n)
            f16, q8 = (statistics.median(times[k]) * 1e3 for k in kinds)
            print(f"  {n:5d}: {f16:.1f} / {q8:.1f}  ({q8 / f16:.2f}x)")
        for c in ctxs.values():
            L.llama_free(c)

    if "layouts" in only:
        print("8 sequences of 512 tokens, ms: one sequence's step among them / one step of all 8")
    for unified in (True, False):
        for flash in (True, False):
            if "layouts" not in only:
                break
            ctx = context(8, 8 * 768, unified=unified, flash=flash)
            for s in range(8):
                decode(ctx, [(s, p, t) for p, t in enumerate(tokens(512))])
            one, all8 = crowd_steps(ctx)
            print(
                f"  {'unified' if unified else 'per-sequence streams'}, flash attention "
                f"{'on' if flash else 'off'}: {one:.1f} / {all8:.1f}"
            )
            L.llama_free(ctx)
    if "crowdkv" in only:
        print(
            "8 sequences of 512 tokens, unified cache, flash attention; K/V types: fill ms per token / "
            "one sequence's step among them / one step of all 8 (ms) / state MiB"
        )
        f16, q8 = L.GGML_TYPE_F16, L.GGML_TYPE_Q8_0
        for name, k, v in (("f16/f16", f16, f16), ("q8_0/f16", q8, f16), ("q8_0/q8_0", q8, q8)):
            ctx = context(8, 8 * 576, flash=True, keys=k, values=v)
            fill = sum(decode(ctx, [(s, p, t) for p, t in enumerate(tokens(512))], last_only=True) for s in range(8))
            one, all8 = crowd_steps(ctx)
            mib = L.llama_state_get_size(ctx) / 2**20
            print(f"  {name}: {fill * 1e3 / (8 * 512):.2f} / {one:.1f} / {all8:.1f} / {mib:.0f}")
            L.llama_free(ctx)
    L.llama_batch_free(batch)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
