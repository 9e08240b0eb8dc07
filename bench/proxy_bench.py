"""`edgeguard serve --upstream` against its upstream, measured in the same run.

    python bench/proxy_bench.py            # tiny test fixtures (seconds)
    python bench/proxy_bench.py --full     # random weights of the real 0.6B shape (built once)

1. A scripted upstream (tests/fixtures/upstream.py) streams a safe answer of ``--tokens`` words
   at ``--rate`` words per second, read directly and through the proxy (Stream model as the
   guard). Ratios: total time (target <= 1.10x), time to first token (target: the upstream's
   plus one prompt check), largest gap between chunks (target: one Stream step plus the
   upstream's own gap; and each gap against the upstream's gap plus a step at that point of the
   answer, since a step grows with the tokens cached before it). One Stream step, a step at
   every position of the answer and one prompt check are timed in-process after the runs, with
   the same threads, and so are the guard's cost per token when tokens pile up and
   the floor on the total that it sets, and a full garbage collection's pause with the guard
   loaded, over the whole heap and with the startup objects frozen as `serve` does. ``--compare-spin`` also runs the proxy with OpenMP's spinning
   wait (``OMP_WAIT_POLICY=ACTIVE``, llama.cpp's default; ``serve --upstream`` sets PASSIVE).
2. llama-cpp-python's server runs an LLM (the random Gen GGUF) on the same cores as the guard:
   tokens per second read directly and through the proxy, with the threads each side gets.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SAFE = "Stir the soup slowly. Put the seeds into warm soil. Start by reading the manual. "


def timed_stream(url: str, body: dict) -> dict:
    """Read one streamed chat completion: total, first content chunk, largest and median gap
    between content chunks (seconds), the chunks, where the three largest gaps fell (chunk
    index, gap), and each content chunk's arrival (seconds) and end in the text (characters)."""
    import httpx

    t0 = time.perf_counter()
    stamps, text, ends = [], [], []
    with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                stamps.append(time.perf_counter() - t0)
                text.append(piece)
                ends.append(len(piece) + (ends[-1] if ends else 0))
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    largest = sorted(range(len(gaps)), key=lambda i: -gaps[i])[:3]
    return {"total_s": total, "ttft_s": stamps[0] if stamps else None, "max_gap_s": max(gaps, default=0.0),
            "median_gap_s": statistics.median(gaps) if gaps else 0.0, "chunks": len(stamps),
            "largest_gaps": [(i + 1, round(gaps[i], 4)) for i in largest], "chars": len("".join(text)),
            "stamps": stamps, "ends": ends}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{url} did not come up") from None
            time.sleep(0.2)


def allow_all() -> str:
    """A policy that flags nothing: random weights flag at random, and a flag would end the
    answer early. Every token is still judged and released by the same rule."""
    from edgeguard.policy import KNOWN_CATEGORIES

    path = REPO / ".cache" / "bench" / "proxy-allow-all.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[policy]\nname = \"allow-all\"\n[categories]\n"
                    + "".join(f'"{c}" = "allow"\n' for c in KNOWN_CATEGORIES))
    return str(path)


def start_proxy(stream_model: str, upstream: str, threads: int, env: dict | None = None
                ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeguard", "serve", "--stream-model", stream_model,
                             "--upstream", upstream, "--port", str(port), "--threads", str(threads),
                             "--policy", allow_all()],
                            cwd=REPO, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", proc)
    return proc, f"{url}/v1"


PROMPT = "How do I bake a lemon cake?"
KEYS = ("total_s", "ttft_s", "max_gap_s")


def guard_costs(stream_model: str, threads: int, answer: str, reps: int = 7) -> dict:
    """One Stream step (a one-token feed), one prompt check, and the guard's throughput when
    tokens pile up (a step of 2 and of 32 tokens: its fixed part and its cost per token),
    medians, in-process; and a step at every position of ``answer`` (fed one token at a time
    after the bench's prompt, as the proxy's session is) with the character where each of its
    tokens ends: a step grows with the tokens cached before it."""
    from statistics import median

    from edgeguard.loader import load
    from edgeguard.server.proxy.cpu import share_cpu

    share_cpu()  # as `serve --upstream` runs the guard
    with load(stream_model, engine="stream", policy=allow_all(), n_threads=threads) as guard:
        pauses = full_collections(reps)
        checks, steps = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            guard.check(PROMPT)
            checks.append(time.perf_counter() - t0)
        with guard.session(PROMPT) as session:
            ids = guard.response_tokens(SAFE * 4)
            for token in ids[: reps * 3]:
                t0 = time.perf_counter()
                session.feed([token])
                steps.append(time.perf_counter() - t0)
        along, token_ends = [], []
        with guard.session(PROMPT) as session:
            for token in guard.response_tokens(answer):
                t0 = time.perf_counter()
                session.feed([token])
                along.append(time.perf_counter() - t0)
                token_ends.append(len(guard.vocab.piece(token).decode("utf-8", "replace"))
                                  + (token_ends[-1] if token_ends else 0))
        ids = guard.response_tokens(SAFE * 12)
        pieces: dict[int, list[float]] = {2: [], 32: []}
        for _ in range(3):
            for n in pieces:
                with guard.session(PROMPT) as session:
                    t0 = time.perf_counter()
                    session.feed(ids[:n])
                    pieces[n].append(time.perf_counter() - t0)
    per_token = (median(pieces[32]) - median(pieces[2])) / 30
    return {"prompt_check_s": median(checks), "step_s": median(steps), "step_max_s": max(steps),
            "step_2_s": median(pieces[2]), "step_32_s": median(pieces[32]), "per_token_s": per_token,
            "tokens_per_s": 32 / median(pieces[32]), "gc_full_ms": pauses,
            "step_first_s": median(along[:21]), "step_last_s": median(along[-21:]),
            "steps_along": along, "token_ends": token_ends}


def local_gaps(run: dict, along: dict, upstream_gap: float, window: int = 5) -> dict:
    """Each gap between a run's chunks against its own limit: the upstream's largest gap plus one
    Stream step at that point of the answer (the median of the in-process steps within ``window``
    tokens of the chunk's last token). The worst excess over the limit (ms; negative: every gap
    within it), where, and how many gaps exceeded it."""
    steps, ends = along["steps_along"], along["token_ends"]
    worst: tuple[float, int, float, float] | None = None
    over = 0
    for i in range(1, len(run["stamps"])):
        gap = run["stamps"][i] - run["stamps"][i - 1]
        j = min(bisect.bisect_left(ends, run["ends"][i]), len(steps) - 1)
        step = statistics.median(steps[max(0, j - window): j + window + 1])
        excess = gap - (upstream_gap + step)
        over += excess > 0
        if worst is None or excess > worst[0]:
            worst = (excess, i, gap, step)
    if worst is None:
        return {"gaps": 0}
    return {"worst_excess_ms": round(worst[0] * 1e3, 1), "at_chunk": worst[1], "gap_ms": round(worst[2] * 1e3, 1),
            "step_there_ms": round(worst[3] * 1e3, 1), "gaps_over": over, "gaps": len(run["stamps"]) - 1}


def full_collections(reps: int) -> dict:
    """A full garbage collection's pause with the guard loaded (median ms), over the whole heap
    and after ``freeze_startup_objects`` (as `serve` runs), which this undoes afterwards."""
    import gc
    from statistics import median

    from edgeguard.platform.memory import freeze_startup_objects

    def pause() -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - t0) * 1e3)
        return median(times)

    whole = pause()
    frozen = freeze_startup_objects()
    try:
        return {"whole_heap": whole, "startup_frozen": pause(), "objects_frozen": frozen}
    finally:
        gc.unfreeze()


def scripted(stream_model: str, tokens: int, rate: float, threads: int, runs: int, spin: bool) -> dict:
    from tests.fixtures.upstream import Reply, ScriptedUpstream, words

    answer = words(SAFE * (tokens // 12 + 1))[:tokens]
    body = {"model": "llm", "messages": [{"role": "user", "content": PROMPT}]}
    variants = {"proxy": {}, **({"proxy_spinning": {"OMP_WAIT_POLICY": "ACTIVE"}} if spin else {})}
    out: dict = {"tokens": tokens, "rate": rate, "threads": threads}
    runs_of: dict[str, list[dict]] = {}
    with ScriptedUpstream(lambda b: Reply(answer, delay=1.0 / rate)) as up:
        direct = [timed_stream(up.url, body) for _ in range(runs)]
        out["direct"] = best = {k: min(r[k] for r in direct) for k in KEYS}
        for name, env in variants.items():
            proc, proxy = start_proxy(stream_model, up.url, threads, env)
            try:
                timed_stream(proxy, body)  # warm
                guarded = [timed_stream(proxy, body) for _ in range(runs)]
            finally:
                proc.terminate()
                proc.wait(60)
            runs_of[name] = guarded
            ours = {k: min(r[k] for r in guarded) for k in KEYS}
            out[name] = {**ours, "total_ratio": ours["total_s"] / best["total_s"],
                         "ttft_added_ms": (ours["ttft_s"] - best["ttft_s"]) * 1e3,
                         "max_gap_added_ms": (ours["max_gap_s"] - best["max_gap_s"]) * 1e3,
                         "worst_max_gap_s": max(r["max_gap_s"] for r in guarded),
                         "runs": [{k: r[k] for k in ("max_gap_s", "median_gap_s", "chunks", "largest_gaps")}
                                  for r in guarded],
                         "same_text": all(r["chars"] == direct[0]["chars"] for r in guarded)}
    costs = guard_costs(stream_model, threads, "".join(answer))
    along = {k: costs.pop(k) for k in ("steps_along", "token_ends")}
    out["guard"] = costs
    out["targets"] = {"total_ratio": 1.10, "ttft_s": best["ttft_s"] + costs["prompt_check_s"],
                      "max_gap_s": best["max_gap_s"] + costs["step_s"]}
    for name, guarded in runs_of.items():
        out[name]["gaps_against_local_step"] = [local_gaps(r, along, best["max_gap_s"]) for r in guarded]
    # When the upstream sends tokens faster than the guard judges them (its cost per token above
    # the upstream's interval) no scheduling meets 1.10x: the answer ends no sooner than the
    # prompt check plus every token at the guard's cost per token.
    n = len(along["steps_along"])  # the answer's tokens, each stepped once above
    out["answer_tokens"] = n
    out["upstream_tokens_per_s"] = n / best["total_s"]
    out["floor_total_ratio"] = max(1.0, (costs["prompt_check_s"] + n * costs["per_token_s"]) / best["total_s"])
    return out


def shared_cores(llm_gguf: str, stream_model: str, llm_threads: int, guard_threads: int, max_tokens: int,
                 ends: tuple[int, ...]) -> dict:
    port = free_port()
    llm = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", llm_gguf, "--host", "127.0.0.1",
                            "--port", str(port), "--n_threads", str(llm_threads), "--n_ctx", "2048"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    upstream = f"http://127.0.0.1:{port}/v1"
    try:
        wait_http(f"{upstream}/models", llm)
        proc, proxy = start_proxy(stream_model, upstream, guard_threads)
        body = {"model": "llm", "messages": [{"role": "user", "content": "Write a story about a dragon."}],
                "max_tokens": max_tokens, "temperature": 100.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 1,
                "logit_bias": {str(t): -100 for t in ends}}  # a random model must not end early
        try:
            timed_stream(proxy, body)
            direct = timed_stream(upstream, body)
            guarded = timed_stream(proxy, body)
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        llm.terminate()
        llm.wait(60)
    tokens = direct["chunks"]  # llama-cpp-python sends one token a chunk; the proxy regroups them
    return {"llm_threads": llm_threads, "guard_threads": guard_threads, "tokens": tokens,
            "direct_tok_s": tokens / direct["total_s"], "proxy_tok_s": tokens / guarded["total_s"],
            "ratio": direct["total_s"] / guarded["total_s"], "same_text": direct["chars"] == guarded["chars"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def models(full: bool) -> tuple[str, str, tuple[int, ...]]:
    """(Stream model folder, LLM GGUF, the LLM's end-of-text token ids)."""
    if full:
        from bench.models import gen_model, gguf_path, stream_model

        return (str(stream_model(only=("q4_k_m",))), str(gguf_path(gen_model(only=("q4_k_m",)), "q4_k_m")),
                (151643, 151645))
    from tests.fixtures.checkpoints import build_checkpoint
    from tests.fixtures.converted import converted
    from tests.fixtures.tiny_gguf import write_random_qwen3_gguf

    llm = REPO / ".cache" / "bench" / "proxy-llm.gguf"
    llm.parent.mkdir(parents=True, exist_ok=True)
    if not llm.exists():
        write_random_qwen3_gguf(llm, n_vocab=600, head_dim=32, ffn=256, seed=3, chat_template=TEMPLATE)
    return str(converted(build_checkpoint("stream", seed=2), ("f16",))), str(llm), (597, 598, 599)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the real 0.6B shape (Q4_K_M)")
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--rate", type=float, default=40.0, help="upstream words per second")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="guard threads (part 1)")
    parser.add_argument("--llm-tokens", type=int, default=120)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--compare-spin", action="store_true", help="also the proxy with spinning OpenMP threads")
    args = parser.parse_args()
    stream_model, llm, ends = models(args.full)
    out = {"model": "full 0.6B Q4_K_M" if args.full else "tiny fixtures", "cores": os.cpu_count(),
           "cpu": cpu_name(), "load_average_before": os.getloadavg(),
           "scripted": scripted(stream_model, args.tokens, args.rate, args.threads, args.runs, args.compare_spin)}
    if not args.skip_llm:
        cores = os.cpu_count() or 1
        out["shared_cores"] = [shared_cores(llm, stream_model, cores, cores, args.llm_tokens, ends)]
        if cores > 1:
            half = max(1, cores // 2)
            out["shared_cores"].append(shared_cores(llm, stream_model, cores - half, half, args.llm_tokens, ends))
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
