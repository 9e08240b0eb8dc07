"""The cost of batch invariance: the same guard in its invariant default against the settings
that are faster alone but let a conversation's scores depend on what shares its decode.

    python bench/invariance_cost.py [--tokens 48] [--checks 6] [--rounds 3] [--out DIR]

Settings (Q4_K_M, the full-size random 0.6B models of bench/models.py, 2 threads):

- ``default``: flash attention, decodes of 2..63 tokens (a lone token gets a padding token),
  Stream's repacked weights off, K-quant weights through llama.cpp's per-row kernel at every
  batch size (``GGML_CPU_TILED_MM=0``).
- ``no-pad``: flash attention, no padding token, decodes of up to the batch size.
- ``plain-attn``: ``flash_attn=False`` (no padding either: it only serves flash attention).
- ``repack``: ``repack=True``; ``repack-no-pad`` (Gen): also without the padding token.
- ``q8_0-keys`` (Stream): ``kv_type="q8_0-keys"``, invariant without a padding token (llama.cpp
  never takes its split one-token attention kernel when keys and values differ in type).
- ``... tiled-auto``: the same in a process with llama.cpp's own choice (``GGML_CPU_TILED_MM=1``:
  K-quant weights times fewer than 8 tokens with the per-row kernel, more with the tiled one:
  not invariant); ``... tiled-forced``: the tiled kernel at every batch size
  (``GGML_CPU_TILED_MM_FORCE=1``: invariant too). llama.cpp reads these switches once per
  process, so each runs in its own worker processes, alternated with the default ones.

Inside a worker every setting has its own guard and they are interleaved token by token
(Stream: one lone session each, ``feed([id])``) or check by check (Gen: short prompts, warm);
workers alternate between the tiled modes, ``--rounds`` times. Prints each setting's median
over rounds and its ratio to ``default`` (across processes for the other tiled modes), and the ratio within one process (the more precise one: interleaved).
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
    "no-pad": {"pad": False},
    "plain-attn": {"flash_attn": False},
    "repack": {"repack": True},
    "q8_0-keys": {"kv_type": "q8_0-keys"},
}
# llama.cpp's tiled K-quant kernel: off (the per-row kernel at every batch size: edgeguard's default),
# forced at every batch size, or llama.cpp's own choice (tiled for 8+ tokens)
MODES = {
    "off": {"GGML_CPU_TILED_MM": "0"},
    "forced": {"GGML_CPU_TILED_MM": "1", "GGML_CPU_TILED_MM_FORCE": "1"},
    "auto": {"GGML_CPU_TILED_MM": "1", "GGML_CPU_TILED_MM_FORCE": "0"},
}
BASE = "off"
GEN_SETTINGS = {
    "default": {},
    "no-pad": {"pad": False},
    "plain-attn": {"flash_attn": False},
    "repack": {"repack": True},
    "repack-no-pad": {"repack": True, "pad": False},
}


def _load(folder: str, threads: int, setting: dict, **extra):
    """A guard with ``setting``; ``pad: False`` turns the padding token off on its backend."""
    import edgeguard
    from edgeguard.runtime.backend import Backend

    opts = {k: v for k, v in setting.items() if k != "pad"}
    guard = edgeguard.load(folder, "q4_k_m", n_threads=threads, device="cpu", **opts, **extra)
    if setting.get("pad") is False:
        backend = guard._engine.backend

        class NoPad(Backend):
            pads = property(lambda self: False)  # type: ignore[assignment]

        backend.__class__ = NoPad
    return guard


def stream_worker(args: dict) -> dict:
    from bench.stream_bench import _response_ids

    threads, n_tok = int(args["threads"]), int(args["tokens"])
    guards = {name: _load(args["folder"], threads, s) for name, s in STREAM_SETTINGS.items()}
    prompt = words(40, 11)
    sessions = {name: g.session(prompt) for name, g in guards.items()}
    ids = _response_ids(n_tok + 4)
    times: dict[str, list[float]] = {name: [] for name in guards}
    order = list(guards)
    for i, tok in enumerate(ids):
        for name in order if i % 2 else order[::-1]:  # alternate the order: no setting always first
            with Timer() as t:
                sessions[name].feed([tok])
            if i >= 4:  # warm-up
                times[name].append(t.s)
        print(f"token {i}: " + " ".join(f"{n} {ts[-1] * 1e3:.0f}" for n, ts in times.items() if ts), flush=True)
    for s in sessions.values():
        s.close()
    for g in guards.values():
        g.close()
    return {"per_token": {name: stats_ms(ts) for name, ts in times.items()}}


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
            print(f"check {i}: " + " ".join(f"{n} {ts[-1] * 1e3:.0f}" for n, ts in times.items() if ts), flush=True)
        for g in guards.values():
            g.close()
    return {"per_check": {name: stats_ms(ts) for name, ts in times.items()}}


def _summary(rounds: list[dict], key: str) -> dict:
    """Median over rounds of each setting's median, per tiled mode; ratios to default (tiled off)."""
    med: dict[str, float] = {}
    for tiled in MODES:
        per: dict[str, list[float]] = {}
        for r in rounds:
            w = r.get(tiled, {})
            for name, st in w.get(key, {}).items():
                per.setdefault(name, []).append(st["median_ms"])
        for name, v in per.items():
            med[name if tiled == BASE else f"{name} tiled-{tiled}"] = statistics.median(v)
    base = med.get("default")
    # per-round ratios within one worker (same process, interleaved): the precise ones
    within = {}
    for tiled in MODES:
        names = {n for r in rounds for n in r.get(tiled, {}).get(key, {})}
        for name in names:
            rs = [
                r[tiled][key][name]["median_ms"] / r[tiled][key]["default"]["median_ms"]
                for r in rounds
                if tiled in r and key in r[tiled]
            ]
            within[name if tiled == BASE else f"{name} tiled-{tiled}"] = statistics.median(rs) if rs else None
    return {
        "median_ms": med,
        "ratio_to_default": {k: (v / base if base else None) for k, v in med.items()},
        "ratio_within_process": within,
    }


def main() -> int:
    from bench import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="Stream: tokens fed per setting and worker")
    ap.add_argument("--checks", type=int, default=5, help="Gen: short prompts per worker")
    ap.add_argument("--reps", type=int, default=2, help="Gen: times each prompt is checked per worker")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of one worker per tiled mode")
    ap.add_argument("--modes", default=",".join(MODES), help="tiled modes: off (the default), forced, auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="stream,gen")
    ap.add_argument("--out", type=Path, default=None, help="write invariance-cost.json here")
    a = ap.parse_args()
    paths = models.all_models(log=print, only=("q4_k_m",))
    if a.out:
        (a.out / "logs").mkdir(parents=True, exist_ok=True)
    res: dict = {
        "command": "python bench/invariance_cost.py"
        + f" --tokens {a.tokens} --checks {a.checks} --reps {a.reps} --rounds {a.rounds}"
        + (f" --only {a.only}" if a.only != "stream,gen" else "")
        + (f" --modes {a.modes}" if a.modes != ",".join(MODES) else ""),
        "machine": machine_info(),
    }
    modes = [m for m in a.modes.split(",") if m in MODES]
    for what in a.only.split(","):
        task, key, folder = {
            "stream": ("stream", "per_token", paths["stream"]),
            "gen": ("gen", "per_check", paths["gen"]),
        }[what]
        rounds = []
        for r in range(a.rounds):
            one: dict = {}
            for tiled in modes if r % 2 == 0 else modes[::-1]:
                la = os.getloadavg()[0]
                print(
                    f"[cost {time.strftime('%H:%M:%S')}] {what} round {r + 1} tiled {tiled} (load {la:.1f})", flush=True
                )
                out = run_worker(
                    "invariance_cost",
                    task,
                    {
                        "folder": folder,
                        "threads": a.threads,
                        "tokens": a.tokens,
                        "checks": a.checks,
                        "reps": a.reps,
                        "tag": f"{tiled}-{r}",
                    },
                    env=MODES[tiled],
                    timeout=900,
                    log_dir=a.out / "logs" if a.out else None,
                )
                if "error" in out:
                    print(out)
                    return 1
                out["loadavg_1min"] = [la, os.getloadavg()[0]]
                one[tiled] = out
            rounds.append(one)
        res[what] = {"rounds": rounds, "summary": _summary(rounds, key)}
        s = res[what]["summary"]
        unit = "per token" if what == "stream" else "per short check"
        print(f"\n{what}, {unit} (median of {a.rounds} rounds' medians; ratio to the invariant default):")
        print("| setting | ms | ratio | ratio, same process |\n|---|---|---|---|")
        for name, ms in s["median_ms"].items():
            within = s["ratio_within_process"].get(name)
            print(
                f"| {name} | {ms:.1f} | {s['ratio_to_default'][name]:.3f} | "
                + (f"{within:.3f}" if within is not None else "")
                + " |"
            )
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
