"""Ray Data against a local scan on this machine: rows per second of `edgeguard scan` with 1 and
2 llama.cpp threads, and of `scan --ray` with 1 and 2 actors of 1 thread, measured in one run;
plus Ray's fixed start-up cost (ray.init, and actors starting and loading the model).

    python bench/ray_bench.py                      # random full-size 0.6B Gen, Q4_K_M, 200 rows
    python bench/ray_bench.py --model DIR --quant f16 --rows 100

Ray rows/s are given end to end (used in the ratios) and "steady" (the time of a 2-row run,
nearly all start-up, taken away). The target: 2 actors of 1 thread >= 0.9x a local scan with 2 threads.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_rows(path: Path, n: int) -> Path:
    from bench.common import words

    path.write_text("".join(json.dumps({"prompt": words(8 + i % 5, 1000 + i) + "?", "id": i}) + "\n" for i in range(n)))
    return path


def local_scan(model: str, quant: str, src: Path, threads: int) -> tuple[float, float]:
    """(load seconds, scan seconds) of an in-process scan, as `edgeguard scan` runs it."""
    import edgeguard
    from edgeguard.scan.writer import Output, run_scan

    start = time.perf_counter()
    with edgeguard.load(model, quant, n_threads=threads, device="cpu") as guard:
        loaded = time.perf_counter()
        run_scan(guard, src, Output(io.BytesIO(), None), identity={}, show_progress=False)
        return loaded - start, time.perf_counter() - loaded


def ray_scan(model: str, quant: str, src: Path, actors: int) -> float:
    from edgeguard.scan.ray import scan_records

    start = time.perf_counter()
    for _ in scan_records(
        src,
        model=model,
        quant=quant,
        engine=None,
        policy="strict",
        device="cpu",
        offline=True,
        actors=actors,
        threads_per_actor=1,
    ):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="converted Gen folder (default: random full-size 0.6B)")
    parser.add_argument("--quant", default="q4_k_m")
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    if args.model is None:
        from bench.models import gen_model

        args.model = str(gen_model())
    import ray

    from edgeguard.scan.ray import quiet_ray_logs

    quiet_ray_logs()
    with tempfile.TemporaryDirectory() as tmp:
        src, tiny = write_rows(Path(tmp, "rows.jsonl"), args.rows), write_rows(Path(tmp, "two.jsonl"), 2)
        results = {}
        for threads in (1, 2):
            load_s, scan_s = local_scan(args.model, args.quant, src, threads)
            results[f"local {threads} thread(s)"] = args.rows / scan_s
            print(f"local scan, {threads} thread(s): {args.rows / scan_s:.2f} rows/s (load {load_s:.2f} s)")
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        init_s = time.perf_counter() - start
        print(f"ray.init (2 CPUs): {init_s:.2f} s")
        try:
            for actors in (1, 2):
                fixed = ray_scan(args.model, args.quant, tiny, actors)
                total = ray_scan(args.model, args.quant, src, actors)
                # The 2-row run is noisy on a loaded machine: no steady rate when it took as long as all rows.
                steady = f"{args.rows / (total - fixed):.2f}" if total > 1.2 * fixed else "n/a"
                results[f"ray {actors} actor(s)"] = args.rows / total
                print(
                    f"scan --ray, {actors} actor(s) x 1 thread: {args.rows / total:.2f} rows/s end to end, "
                    f"{steady} rows/s steady (start-up of actors + model load: {fixed:.2f} s)"
                )
        finally:
            ray.shutdown()
    local1, local2 = results["local 1 thread(s)"], results["local 2 thread(s)"]
    ray1, ray2 = results["ray 1 actor(s)"], results["ray 2 actor(s)"]
    print(
        f"ratios: ray 2 actors / local 2 threads = {ray2 / local2:.2f} (target >= 0.9); "
        f"ray 2 actors / 1 actor = {ray2 / ray1:.2f}; local 2 threads / 1 thread = {local2 / local1:.2f}; "
        f"ray 1 actor / local 1 thread = {ray1 / local1:.2f}"
    )


if __name__ == "__main__":
    main()
