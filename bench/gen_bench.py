"""Gen: warm ``GenGuard.check`` against plain llama.cpp greedy generation of the verdict
(same GGUF, same tokens, fresh KV per check, llama.cpp's C API with a greedy loop) and against
transformers ``generate``; and batched ``check_many`` against one-by-one checks.

edgeguard and the llama.cpp baseline run in the same process and are interleaved input by
input (A, B, A, B ...) so that load from other processes on the machine hits both alike.
transformers runs in its own process (its OpenMP pool would otherwise spin against llama.cpp's).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Timer, stats_ms, worker_main

N_NEW = 9  # "Safety: X\nCategories: Y" is about 9 tokens; forced exactly on random weights


def _by_kind(items, times):
    out = {}
    for it, t in zip(items, times):
        out.setdefault(it["kind"], []).append(t)
    return {k: stats_ms(v) for k, v in out.items()}


def edgeguard_vs_llama(args: dict) -> dict:
    """One quant, one thread count: interleaved edgeguard check / llama.cpp generation."""
    import edgeguard
    import edgeguard.engines.gen
    from bench.models import gguf_path
    from bench.stream_bench import BareLlama

    if args.get("guess"):  # the label a lone check speculates on (run.py --gen-guess)
        edgeguard.engines.gen.GUESS_LABEL = args["guess"]
    folder, quant, threads = Path(args["folder"]), args["quant"], int(args["threads"])
    items, reps = args["inputs"], int(args.get("reps", 1))
    baseline = bool(args.get("baseline", True))
    with tempfile.TemporaryDirectory() as prefix_dir:
        t = Timer()
        with t:
            guard = edgeguard.load(
                folder, quant, n_threads=threads, prefix_cache=Path(prefix_dir), device=args.get("device", "cpu")
            )
        load_s = t.s
        llm = None
        if baseline:
            with t:
                llm = BareLlama(gguf_path(folder, quant), threads, n_gpu_layers=guard.device.n_gpu_layers)
            llm_load_s = t.s

        def ours(it):
            with Timer() as tm:
                v = guard.check(it["prompt"], it["response"])
            return tm.s, v

        def plain(tokens):
            llm.clear()  # fresh KV cache per check, as a plain user would (no prefix reuse)
            with Timer() as tm:
                llm.generate(tokens, N_NEW)
            return tm.s

        tokens = [guard.tokens(it["prompt"], it["response"]) for it in items]
        # warm-up: both prefixes (prompt and response mode), caches, thread pools
        for it in (items[0], items[-1]):
            ours(it)
        if llm is not None:
            plain(tokens[0])
        ours_t, plain_t, breakdown, tok_t = [], [], [], []
        for _ in range(reps):
            for it, toks in zip(items, tokens):
                s, v = ours(it)
                ours_t.append(s)
                breakdown.append(dict(v.timings))
                with Timer() as tm:
                    guard.tokens(it["prompt"], it["response"])
                tok_t.append(tm.s)
                if llm is not None:
                    plain_t.append(plain(toks))
        guard.close()
        if llm is not None:
            llm.close()
    all_items = items * reps
    per_input = {}
    for it, a, b in zip(all_items, ours_t, plain_t or [None] * len(ours_t)):
        d = per_input.setdefault(it["id"], {"kind": it["kind"], "ours": [], "plain": []})
        d["ours"].append(a)
        if b is not None:
            d["plain"].append(b)
    n_tokens = {it["id"]: len(tk) for it, tk in zip(items, tokens)}
    mean_breakdown = {k: sum(b[k] for b in breakdown) / len(breakdown) for k in breakdown[0]}
    short = [i for i, it in enumerate(all_items) if it["kind"] == "short"]
    short_bd = {k: sorted(breakdown[i][k] for i in short)[len(short) // 2] for k in breakdown[0]} if short else {}
    return {
        "quant": quant,
        "threads": threads,
        "guess": edgeguard.engines.gen.GUESS_LABEL,
        "load_s": load_s,
        "llama_load_s": llm_load_s if baseline else None,
        "ours": stats_ms(ours_t),
        "ours_by_kind": _by_kind(all_items, ours_t),
        "plain": stats_ms(plain_t),
        "plain_by_kind": _by_kind(all_items, plain_t) if plain_t else {},
        "n_tokens": n_tokens,
        "per_input_median_ms": {
            k: {
                "kind": d["kind"],
                "ours": stats_ms(d["ours"]).get("median_ms"),
                "plain": stats_ms(d["plain"]).get("median_ms"),
            }
            for k, d in per_input.items()
        },
        "breakdown_mean_ms": mean_breakdown,
        "breakdown_short_median_ms": short_bd,
        "tokenize_ms": stats_ms(tok_t),
    }


def transformers_generate(args: dict) -> dict:
    """transformers + PyTorch ``generate`` (greedy, exactly N_NEW new tokens) on the same tokens."""
    import torch
    from transformers import Qwen3ForCausalLM

    threads = int(args["threads"])
    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args["dtype"]]
    with Timer() as t:
        model = Qwen3ForCausalLM.from_pretrained(args["ckpt"], dtype=dtype).eval()
    load_s = t.s
    times, per_input = [], {}
    items, tokens = args["inputs"], args["tokens"]

    def gen(ids):
        x = torch.tensor([ids])
        with torch.inference_mode(), Timer() as tm:
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=N_NEW,
                min_new_tokens=N_NEW,
                do_sample=False,
                pad_token_id=151643,
            )
        assert out.shape[1] == len(ids) + N_NEW
        return tm.s

    gen(tokens[0])  # warm-up
    for _ in range(int(args.get("reps", 1))):
        for it, ids in zip(items, tokens):
            s = gen(ids)
            times.append(s)
            per_input.setdefault(it["id"], []).append(s)
    return {
        "dtype": args["dtype"],
        "threads": threads,
        "load_s": load_s,
        "generate": stats_ms(times),
        "by_kind": _by_kind(items * int(args.get("reps", 1)), times),
        "per_input_median_ms": {k: stats_ms(v)["median_ms"] for k, v in per_input.items()},
    }


def tokens_for(args: dict) -> dict:
    """The rendered token ids of each input (from the converted model's own template)."""
    import edgeguard

    with edgeguard.load(Path(args["folder"]), args["quant"], prefix_cache=None) as guard:
        return {"tokens": [guard.tokens(it["prompt"], it["response"]) for it in args["inputs"]]}


if __name__ == "__main__":
    worker_main({"edgeguard_vs_llama": edgeguard_vs_llama, "transformers": transformers_generate, "tokens": tokens_for})
