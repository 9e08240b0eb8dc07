"""The cost of batch invariance: the same guard with its invariant defaults against settings that
are faster in some case but let a conversation's scores depend on what shares its decode.

    python bench/invariance_cost.py [--tokens 48] [--checks 5] [--rounds 3] [--out DIR]

Settings (Q4_K_M, the full-size random 0.6B models of bench/models.py, 2 threads):

- ``default``: flash attention, an f16 cache with bf16 keys, each engine's own weights, every llama.cpp
  call shaped by ``edgeguard/runtime/decode_shapes.py`` (wide calls for inputs known whole,
  narrow calls of at most 3 tokens for streamed ones).
- ``unshaped``: the same guard with the calls as llama.cpp would take them (one call of up to
  the batch size, no padding) and an all-f16 cache: llama.cpp's own kernel choice per call, not
  invariant.
- ``no-repack`` (Stream): ``repack=False`` (invariant: narrow calls of up to 7 tokens);
  ``repack`` (Gen): ``repack=True`` (invariant; Gen's default keeps the weights memory-mapped).
- ``q8_0-keys``: ``kv_type="q8_0-keys"`` (invariant, 8-bit keys).
- ``plain-attn``: ``flash_attn=False`` (not invariant).

Inside a worker process every setting has its own guard and they are interleaved token by token
(Stream: one lone session each, ``feed([id])``, then a backlog of 16 tokens in one ``feed``) or
check by check (Gen: short prompts, warm); ``--rounds`` workers in turn. Prints each setting's
median over rounds and its ratio to ``default`` within the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import Timer, gen_inputs, machine_info, run_worker, stats_ms, words, worker_main  # noqa: E402

STREAM_SETTINGS = {
    "default": {},
    "unshaped": {"shaped": False},
    "no-repack": {"repack": False},
    "q8_0-keys": {"kv_type": "q8_0-keys"},
    "plain-attn": {"flash_attn": False},
}
GEN_SETTINGS = {
    "default": {},
    "unshaped": {"shaped": False},
    "repack": {"repack": True},
    "plain-attn": {"flash_attn": False},
}
BACKLOG = 16


def _load(folder: str, threads: int, setting: dict, **extra):
    """A guard with ``setting``; ``shaped: False`` gives its backend llama.cpp's own calls."""
    import edgeguard
    from edgeguard.runtime.backend import Backend

    opts = {k: v for k, v in setting.items() if k != "shaped"}
    if setting.get("shaped", True):
        return edgeguard.load(folder, "q4_k_m", n_threads=threads, device="cpu", **opts, **extra)

    class Unshaped(Backend):
        shaped = property(lambda self: False)  # type: ignore[assignment]

    shaped = Backend.shaped
    Backend.shaped = Unshaped.shaped  # type: ignore[method-assign]  # while the context is made
    try:
        guard = edgeguard.load(folder, "q4_k_m", n_threads=threads, device="cpu", **opts, **extra)
    finally:
        Backend.shaped = shaped  # type: ignore[method-assign]
    guard._engine.backend.__class__ = Unshaped
    return guard


def stream_worker(args: dict) -> dict:
    from bench.stream_bench import _response_ids

    threads, n_tok = int(args["threads"]), int(args["tokens"])
    guards = {name: _load(args["folder"], threads, s) for name, s in STREAM_SETTINGS.items()}
    prompt = words(40, 11)
    sessions = {name: g.session(prompt) for name, g in guards.items()}
    ids = _response_ids(n_tok + 4 + BACKLOG * 3)
    times: dict[str, list[float]] = {name: [] for name in guards}
    backlog: dict[str, list[float]] = {name: [] for name in guards}
    order = list(guards)
    for i, tok in enumerate(ids[: n_tok + 4]):
        for name in order if i % 2 else order[::-1]:  # alternate the order: no setting always first
            with Timer() as t:
                sessions[name].feed([tok])
            if i >= 4:  # warm-up
                times[name].append(t.s)
    for k in range(3):
        chunk = ids[n_tok + 4 + k * BACKLOG: n_tok + 4 + (k + 1) * BACKLOG]
        for name in order if k % 2 else order[::-1]:
            with Timer() as t:
                sessions[name].feed(chunk)
            backlog[name].append(t.s)
    for s in sessions.values():
        s.close()
    for g in guards.values():
        g.close()
    return {"per_token": {name: stats_ms(ts) for name, ts in times.items()},
            "backlog": {name: stats_ms(ts) for name, ts in backlog.items()}}


def gen_worker(args: dict) -> dict:
    import tempfile

    threads, n = int(args["threads"]), int(args["checks"])
    items = [it for it in gen_inputs(False) if it["kind"] == "short"][:n]
    with tempfile.TemporaryDirectory() as tmp:
        guards = {
            name: _load(args["folder"], threads, s, prefix_cache=Path(tmp) / name) for name, s in GEN_SETTINGS.items()
        }
        times: dict[str, list[float]] = {name: [] for name in guards}
        order = list(guards)
        for g in guards.values():  # warm-up: the template head, thread pools
            g.check(items[0]["prompt"])
        for i, it in enumerate(items * int(args.get("reps", 2))):
            for name in order if i % 2 else order[::-1]:
                with Timer() as t:
                    guards[name].check(it["prompt"])
                times[name].append(t.s)
        for g in guards.values():
            g.close()
    return {"per_check": {name: stats_ms(ts) for name, ts in times.items()}}


def _summary(rounds: list[dict], key: str) -> dict:
    """Median over rounds of each setting's median, and of its ratio to ``default`` in the same process."""
    names = list(rounds[0][key])
    med = {n: statistics.median(r[key][n]["median_ms"] for r in rounds) for n in names}
    ratio = {n: statistics.median(r[key][n]["median_ms"] / r[key]["default"]["median_ms"] for r in rounds)
             for n in names}
    return {"median_ms": med, "ratio_to_default": ratio}


def main() -> int:
    from bench import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="Stream: tokens fed one by one per setting and worker")
    ap.add_argument("--checks", type=int, default=5, help="Gen: short prompts per worker")
    ap.add_argument("--reps", type=int, default=2, help="Gen: times each prompt is checked per worker")
    ap.add_argument("--rounds", type=int, default=3, help="worker processes in turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="stream,gen")
    ap.add_argument("--out", type=Path, default=None, help="write invariance-cost.json here")
    a = ap.parse_args()
    paths = models.all_models(log=print, only=("q4_k_m",))
    if a.out:
        (a.out / "logs").mkdir(parents=True, exist_ok=True)
    res: dict = {
        "command": "python bench/invariance_cost.py"
        + f" --tokens {a.tokens} --checks {a.checks} --reps {a.reps} --rounds {a.rounds} --threads {a.threads}"
        + (f" --only {a.only}" if a.only != "stream,gen" else ""),
        "machine": machine_info(),
    }
    for what in a.only.split(","):
        task, keys, folder = {
            "stream": ("stream", ("per_token", "backlog"), paths["stream"]),
            "gen": ("gen", ("per_check",), paths["gen"]),
        }[what]
        rounds = []
        for r in range(a.rounds):
            la = os.getloadavg()[0]
            print(f"[cost {time.strftime('%H:%M:%S')}] {what} round {r + 1} (load {la:.1f})", flush=True)
            out = run_worker(
                "invariance_cost", task,
                {"folder": folder, "threads": a.threads, "tokens": a.tokens, "checks": a.checks, "reps": a.reps,
                 "tag": str(r)},
                timeout=900, log_dir=a.out / "logs" if a.out else None,
            )
            if "error" in out:
                print(out)
                return 1
            out["loadavg_1min"] = [la, os.getloadavg()[0]]
            rounds.append(out)
        res[what] = {"rounds": rounds, "summary": {k: _summary(rounds, k) for k in keys}}
        for key, s in res[what]["summary"].items():
            unit = {"per_token": "per token", "backlog": f"a backlog of {BACKLOG} tokens in one feed",
                    "per_check": "per short check"}[key]
            print(f"\n{what}, {unit} (median of {a.rounds} rounds; ratio to the default in the same process):")
            print("| setting | ms | ratio |\n|---|---|---|")
            for name, ms in s["median_ms"].items():
                print(f"| {name} | {ms:.1f} | {s['ratio_to_default'][name]:.3f} |")
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "invariance-cost.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("stream", "gen"):
        worker_main({"stream": stream_worker, "gen": gen_worker})
    else:
        sys.exit(main())
