"""Batched decoding: Gen ``check_many(batch_size=8)`` against one-by-one checks, and Stream with
8 live sessions fed one token per step against one session alone, in the same process (Gen
interleaved round by round so that load from elsewhere hits both alike).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import Timer, peak_rss_mb, rss_mb, stats_ms, words, worker_main


def gen(args: dict) -> dict:
    import edgeguard

    folder, quant, threads = Path(args["folder"]), args["quant"], int(args["threads"])
    n, k, rounds = int(args.get("n", 64)), int(args.get("batch", 8)), int(args.get("rounds", 2))
    prompts = [words(8 + i % 5, 1000 + i) + "?" for i in range(n)]
    with edgeguard.load(
        folder, quant, n_threads=threads, prefix_cache=None, max_batch=k, device=args.get("device", "cpu")
    ) as guard:
        list(guard.check_many(prompts[:k], batch_size=k))  # warm-up: heads, thread pools
        loop_t, batch_t, one_t = [], [], []
        for _ in range(rounds):
            with Timer() as t:
                for p in prompts:
                    guard.check(p)
            loop_t.append(t.s)
            with Timer() as t:
                list(guard.check_many(prompts, batch_size=k))
            batch_t.append(t.s)
            with Timer() as t:
                list(guard.check_many(prompts, batch_size=1))
            one_t.append(t.s)
    loop, batched, ones = (min(x) for x in (loop_t, batch_t, one_t))
    return {
        "n": n,
        "batch_size": k,
        "quant": quant,
        "threads": threads,
        "loop_s": loop,
        "check_many_s": batched,
        "check_many_batch1_s": ones,
        "throughput_ratio": loop / batched,
        "batch1_vs_loop": ones / loop,
    }


def stream(args: dict) -> dict:
    """One session alone (the guard holds nothing else), then the same session among ``sessions``
    live ones: a batched step of all of them, and that session's step in the crowd."""
    import edgeguard

    folder, quant, threads = Path(args["folder"]), args["quant"], int(args["threads"])
    n_sessions, steps, fill = int(args.get("sessions", 8)), int(args.get("steps", 24)), int(args.get("fill", 512))
    ids = [1000 + (7919 * i) % 140000 for i in range(fill + 3 * steps + 8)]
    options = {k: args[k] for k in ("flash_attn", "kv_type") if args.get(k) is not None}
    with edgeguard.load(
        folder, quant, n_threads=threads, max_sessions=n_sessions, device=args.get("device", "cpu"), **options
    ) as guard:
        prompts = [words(30, 50 + i) for i in range(n_sessions)]
        first = guard.session(prompts[0])
        first.feed(ids[:fill])
        alone_t = []
        for step in range(steps):
            with Timer() as t:
                first.feed([ids[fill + step]])
            alone_t.append(t.s)
        rss_alone = rss_mb()
        others = [guard.session(p) for p in prompts[1:]]
        for s in others:  # each session holds `fill` response tokens, as in a long answer
            s.feed(ids[: fill + steps])
        sessions = [first] + others
        rss_live = rss_mb()
        one_t, many_t = [], []
        for step in range(steps):
            with Timer() as t:
                guard.feed_many({s: [ids[fill + steps + step]] for s in sessions})
            many_t.append(t.s)
            with Timer() as t:  # then a step of session 0 alone, among the others
                first.feed([ids[fill + 2 * steps + step]])
            one_t.append(t.s)
            for s in others:  # keep every session at the same length
                s.feed([ids[fill + 2 * steps + step]])
        alone, crowded, many = stats_ms(alone_t[2:]), stats_ms(one_t[2:]), stats_ms(many_t[2:])
        cached = guard.cached_tokens
        context = guard.context_size
        kv_type = guard.kv_type
    return {
        "sessions": n_sessions,
        "fill": fill,
        "quant": quant,
        "threads": threads,
        "flash_attn": args.get("flash_attn"),
        "kv_type": kv_type,
        "one_session_alone_step": alone,
        "one_session_crowded_step": crowded,
        "batched_step": many,
        "step_ratio": many["median_ms"] / alone["median_ms"],
        "step_ratio_vs_crowded": many["median_ms"] / crowded["median_ms"],
        "tokens_per_s_gain": n_sessions * alone["median_ms"] / many["median_ms"],
        "rss_mb_one_session": rss_alone,
        "rss_mb_with_sessions": rss_live,
        "peak_rss_mb": peak_rss_mb(),
        "cached_tokens": cached,
        "context_size": context,
        "at": time.strftime("%H:%M:%S"),
    }


if __name__ == "__main__":
    worker_main({"gen": gen, "stream": stream})
