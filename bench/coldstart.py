"""Cold start: a one-shot ``edgeguard check TEXT --model DIR --quant q4_k_m --json`` process.

Run 1 with an empty EDGEGUARD_CACHE_DIR (the prefix state is computed and persisted), then runs
with the persisted prefix state. The model files are on local disk and, after the first run,
in the OS page cache (pages are not dropped: the machine is shared). A second worker splits a
cold process into phases (imports, load, first check) for the profile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Timer, worker_main


def cli_runs(args: dict) -> dict:
    exe = shutil.which("edgeguard") or str(Path(sys.executable).with_name("edgeguard"))
    runs = []
    with tempfile.TemporaryDirectory(prefix="edgeguard-cold-") as cache:
        env = dict(os.environ, EDGEGUARD_CACHE_DIR=cache)
        if args.get("threads"):
            env["EDGEGUARD_THREADS"] = str(args["threads"])
        for i in range(1 + int(args.get("warm_runs", 3))):
            cmd = [exe, "check", args["text"], "--model", args["folder"], "--quant", args["quant"], "--json"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            wall = time.perf_counter() - t0
            ok = p.returncode in (0, 1)
            runs.append(
                {
                    "run": i + 1,
                    "prefix_cache": "empty" if i == 0 else "persisted",
                    "wall_s": wall,
                    "exit": p.returncode,
                    "ok": ok,
                    "label": json.loads(p.stdout).get("label") if ok and p.stdout.strip() else None,
                    "stderr": p.stderr[-300:] if not ok else "",
                }
            )
        prefix_files = [f.name for f in Path(cache).rglob("*.kv")]
    return {
        "command": f"edgeguard check TEXT --model {args['folder']} --quant {args['quant']} --json",
        "runs": runs,
        "prefix_files": prefix_files,
    }


def phases(args: dict) -> dict:
    """Inside one cold process: import, load (with the persisted prefix), first check."""
    t_start = time.perf_counter()
    import llama_cpp  # noqa: F401

    import edgeguard
    import edgeguard.engines.gen

    t_import = time.perf_counter() - t_start
    with Timer() as t_load:
        guard = edgeguard.load(Path(args["folder"]), args["quant"], prefix_cache=Path(args["prefix_dir"]))
    with Timer() as t_check:
        v = guard.check(args["text"])
    guard.close()
    return {
        "import_s": t_import,
        "load_s": t_load.s,
        "first_check_s": t_check.s,
        "first_check_timings_ms": dict(v.timings),
    }


if __name__ == "__main__":
    worker_main({"cli": cli_runs, "phases": phases})
