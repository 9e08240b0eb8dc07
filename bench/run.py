"""edgeguard benchmark suite: one command, baselines in the same run, results as JSON + markdown.

    python bench/run.py [--quick] [--device cpu|gpu] [--out bench/results]
                        [--only gen,stream,batch,threads,coldstart,memory,faithful]

Every measurement runs in a fresh worker process (``bench/*.py``), so numbers are not polluted
by other engines' memory or thread pools. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import models, report  # noqa: E402
from bench.common import gen_inputs, machine_info, run_worker  # noqa: E402

SECTIONS = ("gen", "stream", "batch", "threads", "coldstart", "memory", "faithful")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer inputs and repetitions (smoke test, < 5 min)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument(
        "--train-fixtures",
        action="store_true",
        help="train the tiny fixtures for the faithfulness section if their cache is stale",
    )
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument(
        "--quants", default=None, help="comma-separated quants for the gen and stream sections (default: all built)"
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="where edgeguard and the llama.cpp baselines run (gpu needs a CUDA build)",
    )
    ap.add_argument("--threads", type=int, default=2, help="threads for the gen and stream sections")
    ap.add_argument(
        "--no-transformers", action="store_true", help="leave out the transformers baselines of gen and stream"
    )
    ap.add_argument(
        "--gen-guess",
        default=None,
        help="the label a lone Gen check speculates on (edgeguard's: Safe). The random-weight models answer "
        "Unsafe, so every check pays for a wrong guess; --gen-guess Unsafe times the checks whose guess is right",
    )
    a = ap.parse_args()
    only = set(a.only.split(","))
    quick = a.quick
    out = a.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict = {
        "quick": quick,
        "command": "python bench/run.py"
        + (" --quick" if quick else "")
        + (f" --only {a.only}" if a.only != ",".join(SECTIONS) else "")
        + (f" --quants {a.quants}" if a.quants else "")
        + (" --device gpu" if a.device == "gpu" else "")
        + (f" --threads {a.threads}" if a.threads != 2 else "")
        + (" --no-transformers" if a.no_transformers else ""),
        "machine": machine_info(),
        "errors": [],
        "sections_s": {},
        "loadavg": {},
        "device": a.device,
    }

    log("models (cached after the first run)")
    t0 = time.perf_counter()
    paths = models.all_models(log=log, only=tuple(a.quants.split(",")) if a.quants else None)
    res["models_s"] = time.perf_counter() - t0
    res["models"] = paths

    def worker(module, task, args, **kw):
        la0 = os.getloadavg()[0]
        r = run_worker(module, task, args, log_dir=logs, **kw)
        r["loadavg_1min"] = [la0, os.getloadavg()[0]]
        if "error" in r:
            res["errors"].append(f"{module}.{task} {args.get('tag', '')}: {r['error']}")
            log(f"  ERROR {module}.{task}: {r['error']}")
        return r

    def section(name, fn):
        if name not in only:
            return
        log(f"section {name}")
        t = time.perf_counter()
        fn()
        res["sections_s"][name] = time.perf_counter() - t
        log(f"  {name} done in {res['sections_s'][name]:.0f} s")

    items = gen_inputs(quick)

    def gen():
        g = res["gen"] = {
            "inputs": [{k: v for k, v in it.items() if k in ("id", "kind")} for it in items],
            "quants": {},
            "transformers": {},
        }
        for q in [q for q in models.GEN_QUANTS if not a.quants or q in a.quants.split(",")]:
            log(f"  gen {q}: edgeguard vs llama.cpp, {len(items)} inputs")
            g["quants"][q] = worker(
                "gen_bench",
                "edgeguard_vs_llama",
                {
                    "folder": paths["gen"],
                    "quant": q,
                    "threads": a.threads,
                    "inputs": items,
                    "reps": 1,
                    "tag": q,
                    "device": a.device,
                    "guess": a.gen_guess,
                },
                timeout=600,
            )
        toks = worker("gen_bench", "tokens", {"folder": paths["gen"], "quant": "q4_k_m", "inputs": items, "tag": "t"})
        subsets = {
            "bf16": ["short0", "short1", "medium0", "long0", "response0"] if not quick else ["short0", "medium0"],
            "fp32": ["short0", "medium0", "response0"] if not quick else ["short0"],
        }
        if a.device == "gpu" or a.no_transformers:  # transformers baselines are CPU-only here
            subsets = {}
        for dtype, ids in subsets.items():
            sub = [i for i, it in enumerate(items) if it["id"] in ids]
            log(f"  gen transformers {dtype}: {len(sub)} inputs")
            g["transformers"][dtype] = worker(
                "gen_bench",
                "transformers",
                {
                    "ckpt": paths["gen_ckpt"],
                    "dtype": dtype,
                    "threads": 2,
                    "inputs": [items[i] for i in sub],
                    "tokens": [toks["tokens"][i] for i in sub],
                    "tag": dtype,
                },
                timeout=600,
            )

    def stream():
        s = res["stream"] = {"runs": {}, "transformers": {}}
        n_tok = 16 if quick else 64
        for q in [q for q in models.STREAM_QUANTS if not a.quants or q in a.quants.split(",")]:
            log(f"  stream {q}: feed vs bare decode, {n_tok} tokens")
            s["runs"][f"{q}-t2"] = worker(
                "stream_bench",
                "per_token",
                {
                    "folder": paths["stream"],
                    "plain": paths["plain"],
                    "quant": q,
                    "threads": a.threads,
                    "n_tokens": n_tok,
                    "backlog": 16,
                    "backlog_reps": 2 if quick else 3,
                    "check_reps": 1 if quick else 3,
                    "tag": q,
                    "device": a.device,
                },
                timeout=600,
            )
        for dtype, n in (
            (("bf16", 8 if quick else 24), ("fp32", 6 if quick else 16))
            if a.device == "cpu" and not a.no_transformers
            else ()
        ):
            log(f"  stream transformers {dtype}: {n} tokens")
            s["transformers"][dtype] = worker(
                "stream_bench",
                "transformers",
                {"ckpt": paths["stream_ckpt"], "dtype": dtype, "threads": 2, "n_tokens": n, "tag": dtype},
                timeout=600,
            )

    def batch():
        b = res["batch"] = {}
        log("  batch: gen check_many(batch_size=8) vs one by one, 64 short prompts, q4_k_m")
        b["gen"] = worker(
            "batch_bench",
            "gen",
            {
                "folder": paths["gen"],
                "quant": "q4_k_m",
                "threads": 2,
                "n": 16 if quick else 64,
                "rounds": 1 if quick else 2,
                "device": a.device,
                "tag": "gen",
            },
            timeout=900,
        )
        log("  batch: stream, 8 sessions of 512 tokens, one token each per step vs one session")
        for key, fa in (("stream", None), ("stream_fa_on", True), ("stream_fa_off", False)):
            b[key] = worker(
                "batch_bench",
                "stream",
                {
                    "folder": paths["stream"],
                    "quant": "q4_k_m",
                    "threads": 2,
                    "steps": 8 if quick else 24,
                    "device": a.device,
                    "flash_attn": fa,
                    "tag": key,
                },
                timeout=900,
            )

    def threads():
        th = res["threads"] = {"runs": {}}
        short = [it for it in items if it["kind"] in ("short",)][: 2 if quick else 4]
        log(f"  threads: gen q4_k_m at 1 thread, {len(short)} short inputs")
        th["runs"]["gen-t1"] = worker(
            "gen_bench",
            "edgeguard_vs_llama",
            {"folder": paths["gen"], "quant": "q4_k_m", "threads": 1, "inputs": short, "reps": 1, "tag": "q4_k_m-t1"},
            timeout=600,
        )
        log("  threads: stream q4_k_m at 1 thread")
        th["runs"]["stream-t1"] = worker(
            "stream_bench",
            "per_token",
            {
                "folder": paths["stream"],
                "plain": paths["plain"],
                "quant": "q4_k_m",
                "threads": 1,
                "n_tokens": 12 if quick else 32,
                "backlog": 16,
                "backlog_reps": 1,
                "check_reps": 1,
                "embd_mode": False,
                "tag": "q4_k_m-t1",
            },
            timeout=600,
        )

    def coldstart():
        c = res["coldstart"] = {}
        text = "How do I bake a loaf of bread at home?"
        log("  coldstart: one-shot CLI processes")
        c["cli"] = worker(
            "coldstart",
            "cli",
            {"folder": paths["gen"], "quant": "q4_k_m", "text": text, "warm_runs": 1 if quick else 3, "tag": "cli"},
            timeout=600,
        )
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for name in ("phases_empty", "phases_persisted"):
                c[name] = worker(
                    "coldstart",
                    "phases",
                    {"folder": paths["gen"], "quant": "q4_k_m", "text": text, "prefix_dir": d, "tag": name},
                    timeout=300,
                )

    def memory():
        m = res["memory"] = {}
        jobs = [
            ("imports", "imports", {}),
            ("gen_q4_k_m", "gen", {"folder": paths["gen"], "quant": "q4_k_m"}),
            ("stream_q4_k_m", "stream", {"folder": paths["stream"], "quant": "q4_k_m", "n_tokens": 64}),
            ("llama_cpp_plain_q4_k_m", "llama_plain", {"folder": paths["gen"], "quant": "q4_k_m"}),
            ("transformers_bf16", "transformers", {"ckpt": paths["gen_ckpt"]}),
        ]
        if not quick:
            from bench.models import gguf_path

            g = str(gguf_path(Path(paths["gen"]), "q4_k_m"))
            st = str(gguf_path(Path(paths["stream"]), "q4_k_m"))
            jobs += [
                (
                    "bd_gen_default",
                    "breakdown",
                    {"gguf": g, "what": "Gen Q4_K_M GGUF, mmap, n_ctx 2048, f16 KV (as GenGuard)"},
                ),
                (
                    "bd_gen_norepack",
                    "breakdown",
                    {"gguf": g, "repack": False, "what": "... no CPU repack (use_extra_bufts off)"},
                ),
                (
                    "bd_gen_ctx1024_kvq8",
                    "breakdown",
                    {"gguf": g, "n_ctx": 1024, "kv_q8": True, "what": "... n_ctx 1024, q8_0 KV"},
                ),
                (
                    "bd_gen_small",
                    "breakdown",
                    {
                        "gguf": g,
                        "n_ctx": 1024,
                        "kv_q8": True,
                        "repack": False,
                        "what": "... no repack, n_ctx 1024, q8_0 KV",
                    },
                ),
                (
                    "bd_stream_default",
                    "breakdown",
                    {
                        "gguf": st,
                        "n_ctx": 4096,
                        "embeddings": True,
                        "what": "Stream backbone Q4_K_M, mmap, n_ctx 4096, f16 KV (as StreamGuard)",
                    },
                ),
                (
                    "bd_stream_small",
                    "breakdown",
                    {
                        "gguf": st,
                        "n_ctx": 1024,
                        "embeddings": True,
                        "repack": False,
                        "kv_q8": True,
                        "what": "... no repack, n_ctx 1024, q8_0 KV",
                    },
                ),
            ]
        for key, task, args in jobs:
            log(f"  memory: {key}")
            m[key] = worker("memory", task, dict(args, tag=key), timeout=600)

    def faithful():
        f = res["faithfulness"] = {}
        for kind in ("gen", "stream"):
            log(f"  faithfulness: {kind} (trained tiny fixture)")
            f[kind] = worker(
                "faithful", kind, {"tag": kind, "train": a.train_fixtures}, timeout=900 if a.train_fixtures else 300
            )
            if "skipped" in f[kind]:
                log(f"  {f[kind]['skipped']}")

    for name, fn in (
        ("gen", gen),
        ("stream", stream),
        ("batch", batch),
        ("threads", threads),
        ("coldstart", coldstart),
        ("memory", memory),
        ("faithful", faithful),
    ):
        try:
            section(name, fn)
        except Exception as e:  # keep going: a partial report beats none
            res["errors"].append(f"section {name}: {type(e).__name__}: {e}")
            log(f"  section {name} failed: {e}")

    # thread table + Pi estimate
    th = res.get("threads", {}).get("runs", {})
    if th:
        rows, t1 = {}, {}
        g1, g2 = th.get("gen-t1", {}), res.get("gen", {}).get("quants", {}).get("q4_k_m", {})
        if "ours_by_kind" in g1 and "ours_by_kind" in g2:
            a, b = g1["ours_by_kind"]["short"]["median_ms"], g2["ours_by_kind"]["short"]["median_ms"]
            rows["Gen check, short prompt"] = (a, b)
            t1["Gen short check"] = a
            pa, pb = g1["plain_by_kind"]["short"]["median_ms"], g2["plain_by_kind"]["short"]["median_ms"]
            rows["llama.cpp generation baseline, short prompt"] = (pa, pb)
        s1, s2 = th.get("stream-t1", {}), res.get("stream", {}).get("runs", {}).get("q4_k_m-t2", {})
        if "feed" in s1 and "feed" in s2:
            rows["Stream feed, per token"] = (s1["feed"]["median_ms"], s2["feed"]["median_ms"])
            rows["bare llama.cpp decode step (plain GGUF)"] = (
                s1["bare_decode"]["median_ms"],
                s2["bare_decode"]["median_ms"],
            )
            t1["Stream per token"] = s1["feed"]["median_ms"]
        res["threads"]["rows"] = rows
        if t1:
            res["threads"]["pi5_estimate"] = report.pi5_estimate(t1)

    res["loadavg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t_start
    res["targets"] = report.targets(res)
    md = report.markdown(res)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(md + "\n")
    print(md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
