"""A long Stream session's step with and without glibc's transparent huge pages (Linux).

    python bench/huge_pages.py [--positions 2000,7000] [--pairs 2] [--threads 2]

Each measurement is its own process: a session whose prompt holds ``position`` tokens, then
single-token feeds, their median. The same process runs with ``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1`` (glibc 2.35+: malloc asks for transparent huge pages on every large
mapping, so llama.cpp's KV cache is backed by 2 MiB pages) and without, in turns; printed: ms per
step, peak RSS and memory in huge pages for each, and the ratio with/without per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TUNABLE = "glibc.malloc.hugetlb=1"


def _kib(field: str, path: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(position: int, threads: int, probe: int) -> dict:
    import edgeguard
    from bench.common import words
    from bench.models import stream_model

    folder = str(stream_model(only=("q4_k_m",)))
    with edgeguard.load(folder, "q4_k_m", n_threads=threads, device="cpu") as guard:
        ids = guard.response_tokens(words(position, 7))
        prompt = guard.vocab.detokenize(ids[:position]).decode("utf-8", "replace")
        with guard.session(prompt) as session:
            steps = []
            for token in guard.response_tokens(words(probe + 1, 9))[: probe + 1]:
                t0 = time.perf_counter()
                session.feed([token])
                steps.append(time.perf_counter() - t0)
        return {"position": position, "ms": statistics.median(steps[1:]) * 1e3,
                "peak_rss_mb": _kib("VmHWM:", "/proc/self/status") / 1024,
                "huge_mb": _kib("AnonHugePages:", "/proc/self/smaps_rollup") / 1024}


def child(position: int, threads: int, probe: int, huge: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if huge:
        env["GLIBC_TUNABLES"] = TUNABLE
    out = subprocess.run([sys.executable, __file__, "--child", str(position), "--threads", str(threads),
                          "--probe", str(probe)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", default="2000,7000")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", type=int, default=12, help="single-token feeds timed per measurement")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(measure(a.child, a.threads, a.probe)))
        return 0
    if not sys.platform.startswith("linux"):
        print("transparent huge pages through glibc exist on Linux only")
        return 1
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {a.threads} threads, load average {os.getloadavg()}")
    for position in (int(p) for p in a.positions.split(",")):
        for pair in range(a.pairs):
            off = child(position, a.threads, a.probe, huge=False)
            on = child(position, a.threads, a.probe, huge=True)
            print(f"position {position} pair {pair + 1}: without {off['ms']:.1f} ms (RSS {off['peak_rss_mb']:.0f} MB, "
                  f"huge {off['huge_mb']:.0f} MB), with {on['ms']:.1f} ms (RSS {on['peak_rss_mb']:.0f} MB, "
                  f"huge {on['huge_mb']:.0f} MB): {on['ms'] / off['ms']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
