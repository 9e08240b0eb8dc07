"""`edgeguard serve` against the in-process engines, measured in the same run.

    python bench/server_bench.py            # tiny test fixtures (seconds)
    python bench/server_bench.py --full     # random weights of the real 0.6B shape (built once)

Gen: requests per second and p50/p99 latency of POST /v1/check at 1, 4 and 16 concurrent
clients (keep-alive HTTP/1.1 connections), against ``GenGuard.check`` called in a loop in this
process on the same prompts. Target: at 16 clients, >= 1.0x the in-process loop.
Stream: 8 concurrent WebSocket streams fed one token at a time (each waits for its token's
verdict line before sending the next); per-token latency against a single stream.
Target: <= 2x. The server runs in a subprocess with the same thread count as the in-process
engine; the clients share the machine with it (as they would on a laptop).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import words  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float], wall: float) -> dict:
    return {
        "n": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
    }


# -- models ---------------------------------------------------------------------------------
def fixture_models() -> tuple[Path, Path]:
    from tests.fixtures.checkpoints import build_checkpoint
    from tests.fixtures.converted import converted

    return (converted(build_checkpoint("gen"), ("f16",)), converted(build_checkpoint("stream", seed=2), ("f16",)))


def full_models() -> tuple[Path, Path]:
    from bench.models import gen_model, stream_model

    return gen_model(), stream_model()


# -- the server ---------------------------------------------------------------------------
class Server:
    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeguard", "serve", "--port", "0", *args],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.port = None
        for line in self.proc.stderr:
            if "serving on" in line:
                self.port = int(line.split("127.0.0.1:")[1].split(" ")[0])
                break
        if self.port is None:
            raise SystemExit(f"the server did not start (exit {self.proc.wait()})")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request("GET", "/ready")
        if conn.getresponse().status != 200:
            raise SystemExit("the server is not ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


# -- Gen ------------------------------------------------------------------------------------
def gen_in_process(model: Path, prompts: list[str], threads: int) -> dict:
    import edgeguard

    with edgeguard.load(str(model), quant=None, n_threads=threads) as guard:
        guard.check(prompts[0])  # warm: the template head, first allocations
        latencies = []
        t0 = time.perf_counter()
        for p in prompts:
            t = time.perf_counter()
            guard.check(p)
            latencies.append(time.perf_counter() - t)
        return summary(latencies, time.perf_counter() - t0)


def gen_server(port: int, prompts: list[str], clients: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(share: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for p in share:
            body = json.dumps({"prompt": p})
            t = time.perf_counter()
            conn.request("POST", "/v1/check", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"/v1/check answered {response.status}")
            with lock:
                latencies.append(time.perf_counter() - t)
        conn.close()

    shares = [prompts[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, shares))
    return summary(latencies, time.perf_counter() - t0)


# -- Stream ---------------------------------------------------------------------------------
def stream_tokens(model: Path, text: str) -> list[int]:
    import edgeguard

    with edgeguard.load(str(model), n_threads=1) as guard:
        return guard.response_tokens(text)


def stream_server(port: int, streams: int, tokens: list[int]) -> dict:
    from websockets.sync.client import connect

    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams)

    def one(_):
        with connect(f"ws://127.0.0.1:{port}/v1/stream", proxy=None, open_timeout=60) as ws:
            ws.send(json.dumps({"prompt": "Write me a story about a garden."}))
            json.loads(ws.recv(timeout=300))  # the prompt's verdict
            barrier.wait()
            for token in tokens:
                t = time.perf_counter()
                ws.send(json.dumps({"tokens": [token]}))
                line = json.loads(ws.recv(timeout=300))
                while "event" in line:  # a "flagged" event: the token line came before it
                    line = json.loads(ws.recv(timeout=300))
                with lock:
                    latencies.append(time.perf_counter() - t)
            ws.send(json.dumps({"finish": True}))
            while json.loads(ws.recv(timeout=300)).get("event") != "verdict":
                pass

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, range(streams)))
    out = summary(latencies, time.perf_counter() - t0)
    out["tokens_per_s"] = out.pop("rps")
    return out


def stream_in_process(model: Path, tokens: list[int], threads: int, streams: int) -> dict:
    """``streams`` sessions, each token of all of them in one ``feed_many`` (the engine's floor)."""
    import edgeguard

    with edgeguard.load(str(model), n_threads=threads) as guard:
        sessions = [guard.session("Write me a story about a garden.") for _ in range(streams)]
        latencies = []
        t0 = time.perf_counter()
        for token in tokens:
            t = time.perf_counter()
            guard.feed_many({s: [token] for s in sessions})
            latencies.extend([time.perf_counter() - t] * streams)
        wall = time.perf_counter() - t0
        for s in sessions:
            s.close()
    out = summary(latencies, wall)
    out["tokens_per_s"] = out.pop("rps")
    return out


# -- report ---------------------------------------------------------------------------------
def step(name: str, fn, *args):
    """Run one measurement, saying on stderr what runs and how long it took."""
    print(f"  {name} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = fn(*args)
    print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="random weights of the real 0.6B shape")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--requests", type=int, default=48, help="Gen requests per measurement")
    parser.add_argument("--tokens", type=int, default=24, help="tokens each stream feeds")
    parser.add_argument("--skip-gen", action="store_true", help="measure the streams only")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    gen, stream = full_models() if args.full else fixture_models()
    prompts = [words(12 + (i % 5) * 6, 101 + i) for i in range(args.requests)]
    tokens = stream_tokens(stream, words(args.tokens * 2, 7))[: args.tokens]
    env = {**os.environ, "EDGEGUARD_CACHE_DIR": tempfile.mkdtemp(prefix="edgeguard-bench-")}
    os.environ["EDGEGUARD_CACHE_DIR"] = env["EDGEGUARD_CACHE_DIR"]
    results: dict = {"model": "0.6B random" if args.full else "tiny fixtures", "threads": args.threads}

    if not args.skip_gen:
        results["gen_in_process"] = step("Gen, in process", gen_in_process, gen, prompts, args.threads)
    server = step(
        "starting the server",
        Server,
        ["--model", str(gen), "--stream-model", str(stream), "--threads", str(args.threads)],
        env,
    )
    try:
        if not args.skip_gen:
            step("warming up", gen_server, server.port, prompts[:8], 4)
        for clients in () if args.skip_gen else (1, 4, 16):
            results[f"gen_server_{clients}"] = step(
                f"Gen, {clients} clients", gen_server, server.port, prompts, clients
            )
        step("warming up", stream_server, server.port, 1, tokens[:4])
        results["stream_server_1"] = step("Stream, 1 stream", stream_server, server.port, 1, tokens)
        results["stream_server_8"] = step("Stream, 8 streams", stream_server, server.port, 8, tokens)
    finally:
        server.stop()
    for n in (1, 8):
        results[f"stream_in_process_{n}"] = step(
            f"Stream, in process, {n} sessions", stream_in_process, stream, tokens, args.threads, n
        )

    print(
        f"edgeguard serve benchmark ({results['model']}, {args.threads} threads, {args.requests} Gen requests, "
        f"{args.tokens} tokens per stream)"
    )
    if not args.skip_gen:
        gen_table(results)
    stream_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def gen_table(results: dict) -> None:
    base = results["gen_in_process"]
    print("| Gen | req/s | p50 ms | p99 ms | throughput vs in-process loop |")
    print("|---|---|---|---|---|")
    print(
        f"| in-process `GenGuard.check` loop | {base['rps']:.1f} | {base['p50_ms']:.1f} | {base['p99_ms']:.1f} | 1.00x |"
    )
    for clients in (1, 4, 16):
        r = results[f"gen_server_{clients}"]
        r["vs_in_process"] = r["rps"] / base["rps"]
        print(
            f"| server, {clients} client{'s' if clients > 1 else ''} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['vs_in_process']:.2f}x |"
        )


def stream_table(results: dict) -> None:
    print()
    print("| Stream, one token at a time | tokens/s (all streams) | p50 ms per token | p99 ms | p50 vs one stream |")
    print("|---|---|---|---|---|")
    for where, key in (("in-process `feed_many`", "stream_in_process"), ("server", "stream_server")):
        one = results[f"{key}_1"]
        for n in (1, 8):
            r = results[f"{key}_{n}"]
            r["p50_vs_single"] = r["p50_ms"] / one["p50_ms"]
            print(
                f"| {where}, {n} stream{'s' if n > 1 else ''} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['p50_vs_single']:.2f}x |"
            )


if __name__ == "__main__":
    main()
