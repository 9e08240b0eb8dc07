"""Shared helpers: worker subprocesses, timing statistics, test texts, machine info."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# -- statistics ------------------------------------------------------------------------------


def stats_ms(seconds: list[float]) -> dict:
    """Median, p90, min, mean and count of timings given in seconds, reported in ms."""
    if not seconds:
        return {"n": 0}
    ms = sorted(s * 1e3 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p90_ms": p90,
        "min_ms": ms[0],
        "mean_ms": statistics.fmean(ms),
    }


def ratio(a, b):
    return None if not a or not b else a / b


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process, in MB (10^6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


# -- inputs ----------------------------------------------------------------------------------
_WORDS = [
    "the",
    "a",
    "my",
    "our",
    "how",
    "what",
    "when",
    "where",
    "why",
    "can",
    "could",
    "would",
    "should",
    "please",
    "tell",
    "me",
    "about",
    "explain",
    "write",
    "story",
    "recipe",
    "garden",
    "weather",
    "travel",
    "train",
    "station",
    "market",
    "bread",
    "water",
    "friend",
    "family",
    "school",
    "teacher",
    "doctor",
    "music",
    "guitar",
    "river",
    "mountain",
    "city",
    "village",
    "road",
    "computer",
    "phone",
    "message",
    "letter",
    "history",
    "science",
    "number",
    "price",
    "money",
    "bank",
    "shop",
    "coffee",
    "morning",
    "evening",
    "night",
    "summer",
    "winter",
    "holiday",
    "book",
    "chapter",
    "movie",
    "game",
    "team",
    "player",
    "question",
    "answer",
    "help",
    "idea",
    "plan",
    "project",
    "report",
    "meeting",
    "email",
    "address",
    "building",
    "kitchen",
    "quickly",
    "slowly",
    "carefully",
    "today",
    "tomorrow",
    "yesterday",
    "always",
    "never",
    "often",
    "sometimes",
    "really",
    "make",
    "build",
    "find",
    "keep",
    "learn",
    "teach",
    "open",
    "close",
    "start",
    "finish",
    "cook",
    "clean",
    "read",
    "send",
    "buy",
]


def words(n: int, seed: int) -> str:
    """A deterministic pseudo-English text of n words (sentences of 8-14 words)."""
    import random

    rng = random.Random(seed)
    out, sentence = [], []
    while len(out) + len(sentence) < n:
        sentence.append(rng.choice(_WORDS))
        if len(sentence) >= rng.randint(8, 14):
            out.extend([sentence[0].capitalize()] + sentence[1:-1] + [sentence[-1] + "."])
            sentence = []
    if sentence:
        out.extend([sentence[0].capitalize()] + sentence[1:-1] + [sentence[-1] + "?"])
    return " ".join(out[:n])


def gen_inputs(quick: bool) -> list[dict]:
    """Gen check inputs: short (~10 words), medium (~60), long (~250) prompts; responses."""
    plan = (
        [("short", 10, 2), ("medium", 60, 1), ("long", 250, 1), ("response", 40, 1)]
        if quick
        else [("short", 10, 5), ("medium", 60, 4), ("long", 250, 3), ("response", 40, 3)]
    )
    items = []
    for kind, n, count in plan:
        for i in range(count):
            seed = (len(items) + 1) * 7919
            if kind == "response":
                items.append(
                    {"id": f"{kind}{i}", "kind": kind, "prompt": words(12, seed), "response": words(n, seed + 1)}
                )
            else:
                items.append({"id": f"{kind}{i}", "kind": kind, "prompt": words(n, seed), "response": None})
    return items


# -- machine ---------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    info = {
        "cpu": cpu,
        "simd": simd,
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
        mem = {l.split(":")[0]: l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()}
        info["mem_total_mb"] = int(mem["MemTotal"]) * 1024 // 10**6
    except (OSError, KeyError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("llama_cpp_python", "onnxruntime", "torch", "transformers", "numpy", "edgeguard"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


# -- worker subprocesses ---------------------------------------------------------------------


def run_worker(
    module: str, task: str, args: dict, *, env: dict | None = None, timeout: float = 900, log_dir: Path | None = None
) -> dict:
    """Run ``python -m bench.<module> <task> ARGS.json OUT.json`` in a fresh process.

    Returns the worker's JSON result, or {"error": ...} on failure/timeout (the suite goes on).
    """
    with tempfile.TemporaryDirectory(prefix="edgeguard-bench-") as tmp:
        a, o = Path(tmp) / "args.json", Path(tmp) / "out.json"
        a.write_text(json.dumps(args))
        full_env = dict(os.environ)
        full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", f"bench.{module}", task, str(a), str(o)]
        log = (log_dir / f"{module}-{task}-{args.get('tag', '')}.log".replace("--", "-")) if log_dir else None
        t0 = time.perf_counter()
        try:
            with open(log or os.devnull, "w") as err:
                p = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=err, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not o.exists():
            tail = log.read_text()[-1500:] if log and log.exists() else ""
            return {"error": f"worker exited with {p.returncode}", "log_tail": tail, "wall_s": wall}
        result = json.loads(o.read_text())
        result["worker_wall_s"] = wall
        return result


def worker_main(tasks: dict) -> None:
    """Entry point of a worker module: ``python -m bench.X TASK ARGS.json OUT.json``."""
    task, a, o = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    args = json.loads(a.read_text())
    result = tasks[task](args)
    o.write_text(json.dumps(result, indent=1))
