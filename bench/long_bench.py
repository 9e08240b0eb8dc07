"""Long responses and long inputs: per-token cost and peak memory against position (Stream) and
check time and peak memory against input length (Gen), next to bare llama.cpp.

    python bench/long_bench.py [--quick] [--out bench/results] [--threads 2]

Every configuration runs in a fresh worker process (peak RSS = that process's VmHWM):

- Stream: one session fed random response tokens in chunks; at each position the median of
  ``probe`` single-token feeds. edgeguard with its defaults (q8_0 keys on the CPU), under a 1 GB
  memory budget, and with ``kv_type`` "f16", "q8_0-keys" or "q8_0" asked for;
  bare llama.cpp on the plain full-vocabulary GGUF of the same weights with its context of
  8,192 allocated up front: flash attention on and off with an f16 KV cache, on with q8_0, and
  off with q8_0 keys and f16 values.
- Gen: ``check`` of one prompt of about N tokens (fresh, no prefix cache), and bare llama.cpp
  prefilling the same tokens and generating the 9-token verdict, in separate processes per
  length.

Writes long.json, long.md and long-stream.png / long-gen.png (matplotlib) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import Timer, machine_info, peak_rss_mb, run_worker, stats_ms, words, worker_main  # noqa: E402

POSITIONS = (100, 1000, 2000, 4000, 7000)
LENGTHS = (100, 1000, 2000, 4000, 6000)
BARE = {
    "bare-fa-on-f16": (True, "f16"),
    "bare-fa-off-f16": (False, "f16"),
    "bare-fa-on-q8_0": (True, "q8_0"),
    "bare-fa-off-q8_0-keys": (False, "q8_0-keys"),
}
N_NEW = 9  # the verdict's tokens, as in gen_bench


def _ids(n: int) -> list[int]:
    from bench.stream_bench import _response_ids

    return _response_ids(n, seed=11)


def _walk(positions, probe: int, feed_chunk, feed_one) -> dict:
    """Fill up to each position in chunks, then time ``probe`` single-token feeds there."""
    from edgeguard.errors import InputTooLong

    out, at = {}, 0
    ids = _ids(max(positions) + probe * len(positions) + 8)
    for pos in positions:
        try:
            while at < pos:
                n = min(256, pos - at)
                feed_chunk(ids[at : at + n])
                at += n
        except InputTooLong as e:  # a memory budget's clear refusal: the curve stops there
            out[str(pos)] = {"error": f"{type(e).__name__} at {at} tokens", "peak_rss_mb": peak_rss_mb()}
            break
        times = []
        for _ in range(probe):
            with Timer() as t:
                feed_one(ids[at : at + 1])
            times.append(t.s)
            at += 1
        out[str(pos)] = {"ms": stats_ms(times[1:])["median_ms"], "peak_rss_mb": peak_rss_mb()}
    return out


def stream_edgeguard(args: dict) -> dict:
    import edgeguard

    options = {k: args[k] for k in ("max_memory_mb", "kv_type") if args.get(k)}
    t0 = time.perf_counter()
    with (
        edgeguard.load(args["folder"], "q4_k_m", n_threads=args["threads"], device="cpu", **options) as guard,
        guard.session(words(30, 7)) as s,
    ):
        curve = _walk(args["positions"], args["probe"], s.feed, s.feed)
        return {
            "curve": curve,
            "kv_type": guard.kv_type,
            "flash_attn": guard.flash_attn,
            "context_size": guard.context_size,
            "context_growths": guard.timings.context_growths,
            "wall_s": time.perf_counter() - t0,
        }


def stream_bare(args: dict) -> dict:
    from bench.stream_bench import BareLlama

    fa, kv = args["flash_attn"], args["kv"]
    llm = BareLlama(Path(args["gguf"]), args["threads"], n_ctx=8192, flash_attn=fa, kv_type=kv)
    try:
        t0 = time.perf_counter()
        llm.decode(_ids(40))  # a prompt's worth of positions first, as a session has
        curve = _walk(args["positions"], args["probe"], llm.decode, llm.decode)
        return {"curve": curve, "wall_s": time.perf_counter() - t0}
    finally:
        llm.close()


def _prompt(n_tokens: int) -> str:
    return words(max(1, int(n_tokens / 1.35)), 3)  # ~1.35 tokens per word of words()


def gen_edgeguard(args: dict) -> dict:
    import edgeguard

    prompt = _prompt(args["length"])
    options = {k: args[k] for k in ("max_memory_mb", "kv_type") if args.get(k)}
    with edgeguard.load(
        args["folder"], "q4_k_m", n_threads=args["threads"], device="cpu", prefix_cache=None, **options
    ) as guard:
        n = len(guard.tokens(prompt))
        with Timer() as t:
            guard.check(prompt)
        return {
            "tokens": n,
            "ms": t.s * 1e3,
            "peak_rss_mb": peak_rss_mb(),
            "kv_type": guard.kv_type,
            "context_size": guard.context_size,
        }


def gen_bare(args: dict) -> dict:
    import edgeguard
    from bench.models import gguf_path
    from bench.stream_bench import BareLlama

    with edgeguard.load(args["folder"], "q4_k_m", n_threads=1, device="cpu", prefix_cache=None) as guard:
        tokens = guard.tokens(_prompt(args["length"]))
    llm = BareLlama(
        gguf_path(Path(args["folder"]), "q4_k_m"),
        args["threads"],
        n_ctx=len(tokens) + 32,
        flash_attn=args.get("flash_attn"),
    )
    try:
        with Timer() as t:
            llm.generate(tokens, N_NEW)
        return {"tokens": len(tokens), "ms": t.s * 1e3, "peak_rss_mb": peak_rss_mb()}
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------
def _plot(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pair(name: str, series: dict, xlabel: str, ylabel: str, what: str) -> str:
        """Time and peak RSS side by side; ``series``: run -> [(x, ms, peak MB), ...]."""
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for run, points in series.items():
            a.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run)
            b.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=run)
        a.set(xlabel=xlabel, ylabel=ylabel, title=f"{what}: time")
        b.set(xlabel=xlabel, ylabel="peak RSS (MB)", title=f"{what}: peak memory")
        a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        return name

    files = []
    stream = {
        run: [(int(p), c["ms"], c["peak_rss_mb"]) for p, c in r["curve"].items() if "ms" in c]
        for run, r in res.get("stream", {}).items()
        if "curve" in r
    }
    if stream:
        files.append(pair("long-stream.png", stream, "response position (tokens)", "ms per token", "Stream, one token"))
    gen = {
        run: [(r["tokens"], r["ms"], r["peak_rss_mb"]) for r in rows if "ms" in r]
        for run, rows in res.get("gen", {}).items()
    }
    if gen:
        files.append(pair("long-gen.png", gen, "input tokens", "ms", "Gen, one check (fresh)"))
    return files


def _markdown(res: dict) -> str:
    L = [
        "# Long responses and long inputs",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']['cpu']}, {res['threads']} threads, "
        f"load average at start {res['machine']['loadavg_start']}; Q4_K_M of random full-size 0.6B models.",
        "",
    ]
    s = res.get("stream", {})
    if s:
        positions = res["positions"]
        L += [
            "## Stream: ms per token (peak RSS MB) at response position",
            "",
            "| run | " + " | ".join(str(p) for p in positions) + " | notes |",
            "|---|" + "---|" * (len(positions) + 1),
        ]
        for name, r in s.items():
            if "curve" not in r:
                L.append(f"| {name} | {r.get('error', '?')} |")
                continue
            points = [r["curve"].get(str(p), {"error": "-", "peak_rss_mb": float("nan")}) for p in positions]
            cells = [
                f"{c['ms']:.1f} ({c['peak_rss_mb']:.0f})" if "ms" in c else f"{c['error']} ({c['peak_rss_mb']:.0f})"
                for c in points
            ]
            note = (
                f"KV {r['kv_type']}, flash attention {'on' if r['flash_attn'] else 'off'}, context "
                f"{r['context_size']}, {r['context_growths']} growths"
                if "kv_type" in r
                else "n_ctx 8192 up front"
            )
            L.append(f"| {name} | " + " | ".join(cells) + f" | {note} |")
        L.append("")
    g = res.get("gen", {})
    if g:
        L += [
            "## Gen: one check, ms (peak RSS MB), against input length",
            "",
            "| run | " + " | ".join(f"~{n}" for n in res["lengths"]) + " |",
            "|---|" + "---|" * len(res["lengths"]),
        ]
        for name, rows in g.items():
            cells = [
                f"{r['ms']:.0f} ({r['peak_rss_mb']:.0f}) [{r['tokens']} tok]" if "ms" in r else r.get("error", "?")
                for r in rows
            ]
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L.append("")
    return "\n".join(L) + "\n"


def main() -> int:
    from bench import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="positions and lengths up to 2,000 only")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="stream,gen")
    ap.add_argument("--runs", default=None, help="comma-separated run names to keep (default: all)")
    ap.add_argument(
        "--positions",
        default=None,
        help=f"Stream: comma-separated response positions (default: {','.join(map(str, POSITIONS))})",
    )
    ap.add_argument("--probe", type=int, default=6, help="Stream: single-token feeds timed at each position")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run (a budget's q8_0 cache is slow)")
    a = ap.parse_args()
    positions = [int(p) for p in a.positions.split(",")] if a.positions else POSITIONS
    positions = [p for p in positions if not a.quick or p <= 2000]
    lengths = [n for n in LENGTHS if not a.quick or n <= 2000]
    only = set(a.only.split(","))
    a.out.mkdir(parents=True, exist_ok=True)
    paths = models.all_models(log=print, only=("q4_k_m",))
    res = {
        "command": "python bench/long_bench.py"
        + (" --quick" if a.quick else "")
        + f" --threads {a.threads}"
        + (f" --only {a.only}" if a.only != "stream,gen" else "")
        + (f" --runs {a.runs}" if a.runs else "")
        + (f" --positions {a.positions}" if a.positions else "")
        + (f" --probe {a.probe}" if a.probe != 6 else "")
        + (f" --timeout {a.timeout:.0f}" if a.timeout != 1200 else ""),
        "machine": machine_info(),
        "threads": a.threads,
        "positions": positions,
        "lengths": lengths,
    }
    common = {"threads": a.threads, "positions": positions, "probe": a.probe}

    def log(msg):
        print(f"[long {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if "stream" in only:
        res["stream"] = {}
        runs = {
            "edgeguard": ("stream_edgeguard", {"folder": paths["stream"]}),
            "edgeguard-budget-1GB": ("stream_edgeguard", {"folder": paths["stream"], "max_memory_mb": 1000}),
            "edgeguard-f16-keys": ("stream_edgeguard", {"folder": paths["stream"], "kv_type": "f16"}),
            "edgeguard-q8_0-keys": ("stream_edgeguard", {"folder": paths["stream"], "kv_type": "q8_0-keys"}),
            "edgeguard-q8_0": ("stream_edgeguard", {"folder": paths["stream"], "kv_type": "q8_0"}),
        }
        plain = str(models.gguf_path(Path(paths["plain"]), "q4_k_m"))
        for name, (fa, kv) in BARE.items():
            runs[name] = ("stream_bare", {"gguf": plain, "flash_attn": fa, "kv": kv})
        for name, (task, extra) in runs.items():
            if a.runs and name not in a.runs.split(","):
                continue
            log(f"stream {name}")
            res["stream"][name] = run_worker("long_bench", task, {**common, **extra, "tag": name}, timeout=a.timeout)
            (a.out / "long.json").write_text(json.dumps(res, indent=1))  # what is done survives a kill
    if "gen" in only:
        res["gen"] = {"edgeguard": [], "edgeguard-budget-1GB": [], "bare-generation": []}
        for n in lengths:
            for name, task, extra in (
                ("edgeguard", "gen_edgeguard", {}),
                ("edgeguard-budget-1GB", "gen_edgeguard", {"max_memory_mb": 1000}),
                ("bare-generation", "gen_bare", {}),
            ):
                if a.runs and name not in a.runs.split(","):
                    continue
                log(f"gen {name} ~{n} tokens")
                res["gen"][name].append(
                    run_worker(
                        "long_bench",
                        task,
                        {"folder": paths["gen"], "threads": a.threads, "length": n, "tag": f"{name}-{n}", **extra},
                        timeout=a.timeout,
                    )
                )
                (a.out / "long.json").write_text(json.dumps(res, indent=1))
    res["gen"] = {k: v for k, v in res.get("gen", {}).items() if v}
    res["machine"]["loadavg_end"] = list(__import__("os").getloadavg())
    res["plots"] = _plot(res, a.out)
    (a.out / "long.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res)
    (a.out / "long.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("stream_edgeguard", "stream_bare", "gen_edgeguard", "gen_bare"):
        worker_main(
            {
                "stream_edgeguard": stream_edgeguard,
                "stream_bare": stream_bare,
                "gen_edgeguard": gen_edgeguard,
                "gen_bare": gen_bare,
            }
        )
    else:
        sys.exit(main())
