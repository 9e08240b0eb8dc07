"""Where a CUDA build of llama-cpp-python can crash its host: import orders and library clashes.

Run on a machine with a GPU and a CUDA build (README "GPU"):

    python bench/gpu_probe.py [--out probe.json] [--jobs 8]

Every experiment runs in a fresh child process (a crash there is a result, not the end of the
run): raw llama_cpp / onnxruntime / torch orders that reproduce the crashes seen once on an H200,
each with the CUDA-related shared libraries the child had mapped just before the risky step;
then all 24 import orders of edgeguard, onnxruntime, torch and llama_cpp followed by Gen and
Stream loaded on the GPU, compared with the scores of the same models on the CPU.
Models: the tiny converted test fixtures (built with the test suite's own fixtures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "How do I pick a lock?"

# Printed by a child before its risky step: the shared objects that could clash.
LIBS = textwrap.dedent("""
    import faulthandler, re, sys
    faulthandler.enable()
    def libs(tag):
        seen = []
        for line in open("/proc/self/maps"):
            p = line.split()[-1] if len(line.split()) >= 6 else ""
            if re.search(r"cuda|cublas|cudart|nvrtc|nvJit|cudnn|stdc\\+\\+|gomp|onnxruntime|torch_c|ggml|llama", p) \\
                    and p not in seen:
                seen.append(p)
        print("LIBS " + tag + " " + " ".join(seen), flush=True)
""")

RAW = {
    # name: (script body, env changes); {gguf} and {onnx} are filled in.
    "llama_import_then_onnxruntime": (
        "import llama_cpp\nlibs('before')\nimport onnxruntime\nonnxruntime.InferenceSession({onnx!r})\nlibs('after')",
        {},
    ),
    "llama_gpu_load_then_onnxruntime": (
        "import llama_cpp\nm = llama_cpp.Llama({gguf!r}, n_gpu_layers=99, "
        "verbose=False)\nlibs('before')\nimport onnxruntime\n"
        "onnxruntime.InferenceSession({onnx!r})\nlibs('after')",
        {},
    ),
    "llama_gpu_load_then_onnxruntime_no_ld_path": (
        "import llama_cpp\nm = llama_cpp.Llama({gguf!r}, n_gpu_layers=99, "
        "verbose=False)\nlibs('before')\nimport onnxruntime\n"
        "onnxruntime.InferenceSession({onnx!r})\nlibs('after')",
        {"LD_LIBRARY_PATH": None},
    ),
    "llama_gpu_load_then_torch": (
        "import llama_cpp\nm = llama_cpp.Llama({gguf!r}, n_gpu_layers=99, verbose=False)\n"
        "libs('before')\nimport torch\ntorch.zeros(2).sum()\nlibs('after')",
        {},
    ),
    "llama_gpu_load_then_torch_cuda": (
        "import llama_cpp\nm = llama_cpp.Llama({gguf!r}, n_gpu_layers=99, "
        "verbose=False)\nlibs('before')\nimport torch\n"
        "print('torch cuda', torch.cuda.is_available(), flush=True)\n"
        "torch.zeros(2, device='cuda').sum().item() if torch.cuda.is_available() "
        "else None\nlibs('after')",
        {},
    ),
    "onnxruntime_then_llama_gpu_load": (
        "import onnxruntime\nonnxruntime.InferenceSession({onnx!r})\nlibs('before')\n"
        "import llama_cpp\nm = llama_cpp.Llama({gguf!r}, n_gpu_layers=99, "
        "verbose=False)\nlibs('after')",
        {},
    ),
    "torch_then_llama_gpu_load": (
        "import torch\nlibs('before')\nimport llama_cpp\n"
        "m = llama_cpp.Llama({gguf!r}, n_gpu_layers=99, verbose=False)\nlibs('after')",
        {},
    ),
    "torch_cuda_then_llama_gpu_load": (
        "import torch\nprint('torch cuda', torch.cuda.is_available(), flush=True)\n"
        "torch.zeros(2, device='cuda').sum().item() if torch.cuda.is_available() "
        "else None\nlibs('before')\nimport llama_cpp\n"
        "m = llama_cpp.Llama({gguf!r}, n_gpu_layers=99, verbose=False)\nlibs('after')",
        {},
    ),
    "edgeguard_gen_import_then_gpu_load": (
        "import edgeguard.engines.gen, edgeguard\nlibs('before')\n"
        "g = edgeguard.load({gen!r}, 'q4_k_m', device='gpu')\n"
        "print(g.check({prompt!r}).label, flush=True)\nlibs('after')",
        {},
    ),
}
# One library at a time, loaded before onnxruntime or torch: which one makes the later import crash.
_LIB_FIRST = {
    "libgomp": "'libgomp.so.1'",
    "libcuda": "'libcuda.so.1'",
    "libcudart": "'libcudart.so.13'",
    "libcublas": "'libcublas.so.13'",
    "libggml-base": "LIB + '/libggml-base.so'",
    "libggml-cpu": "LIB + '/libggml-cpu.so'",
    "libggml-cuda": "LIB + '/libggml-cuda.so'",
}
for _lib, _path in _LIB_FIRST.items():
    for _then, _code in (
        ("onnxruntime", "import onnxruntime\nonnxruntime.InferenceSession({onnx!r})"),
        ("torch", "import torch\ntorch.zeros(2).sum()"),
    ):
        RAW[f"{_lib}_then_{_then}"] = (
            "import ctypes, os, importlib.util\n"
            "LIB = os.path.join(os.path.dirname(importlib.util.find_spec('llama_cpp').origin), 'lib')\n"
            f"ctypes.CDLL({_path})\nlibs('before')\n{_code}\nlibs('after')",
            {},
        )

IMPORTS = {
    "edgeguard": "import edgeguard",
    "onnxruntime": "import onnxruntime",
    "torch": "import torch",
    "llama_cpp": "import llama_cpp",
}


def run_child(script: str, env_changes: dict, timeout: int = 240) -> dict:
    env = dict(os.environ)
    env.setdefault("EDGEGUARD_CACHE_DIR", "/tmp/edgeguard-probe-cache")
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
        )
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "s": round(time.perf_counter() - t0, 1)}
    rc = p.returncode
    out = {
        "rc": rc,
        "signal": signal.Signals(-rc).name if rc < 0 else None,
        "s": round(time.perf_counter() - t0, 1),
        "stdout": p.stdout[-3000:],
    }
    if rc != 0:
        out["stderr"] = p.stderr[-3000:]
    return out


def fixtures() -> tuple[str, str]:
    from tests.fixtures.checkpoints import build_checkpoint
    from tests.fixtures.converted import converted

    return str(converted(build_checkpoint("gen"))), str(converted(build_checkpoint("stream", seed=2)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_probe.json"))
    ap.add_argument("--jobs", type=int, default=8)
    a = ap.parse_args()
    from bench.models import gguf_path

    gen, stream = fixtures()
    gguf = str(gguf_path(Path(gen), "q4_k_m"))
    onnx = str(next(Path(stream).glob("*.onnx")))
    res: dict = {"env": {k: os.environ.get(k) for k in ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES")}}
    info = run_child(
        LIBS
        + textwrap.dedent("""
        import json, onnxruntime, llama_cpp
        out = {"llama_cpp": llama_cpp.__version__, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
               "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers()}
        try:
            import torch
            out["torch"] = torch.__version__; out["torch_cuda"] = torch.version.cuda
        except Exception as e:
            out["torch"] = repr(e)
        print("INFO " + json.dumps(out), flush=True)
    """),
        {},
    )
    res["info"] = info
    print(info.get("stdout", ""), info.get("stderr", ""), flush=True)

    jobs = {
        name: (LIBS + body.format(gguf=gguf, onnx=onnx, gen=gen, prompt=PROMPT), env)
        for name, (body, env) in RAW.items()
    }

    # reference scores on the CPU, then every import order with both engines on the GPU
    ref = run_child(
        textwrap.dedent(f"""
        import json, edgeguard
        out = {{}}
        for model in ({gen!r}, {stream!r}):
            with edgeguard.load(model, "q4_k_m", device="cpu") as g:
                out[g.engine] = dict(g.check({PROMPT!r}).scores)
        print("SCORES " + json.dumps(out))
    """),
        {},
    )
    res["cpu_reference"] = ref
    for i, order in enumerate(itertools.permutations(IMPORTS)):
        engines = (gen, stream) if i % 2 else (stream, gen)
        body = "\n".join(IMPORTS[n] for n in order) + textwrap.dedent(f"""
            import json, edgeguard
            out = {{}}
            for model in {engines!r}:
                with edgeguard.load(model, "q4_k_m", device="gpu") as g:
                    assert g.device.device == "gpu", g.device
                    out[g.engine] = dict(g.check({PROMPT!r}).scores)
            print("SCORES " + json.dumps(out))
        """)
        jobs["order:" + "-".join(order) + (":gen-first" if i % 2 else ":stream-first")] = (LIBS + body, {})

    with ThreadPoolExecutor(a.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda kv: run_child(*kv), jobs.values())))
    res["runs"] = results

    def scores(r):
        for line in r.get("stdout", "").splitlines():
            if line.startswith("SCORES "):
                return json.loads(line[7:])
        return None

    cpu = scores(ref) or {}
    worst = 0.0
    for name, r in results.items():
        s = scores(r)
        if s and cpu:
            diff = max(abs(s[e][k] - cpu[e][k]) for e in s for k in s[e])
            r["max_abs_diff_vs_cpu"] = diff
            worst = max(worst, diff)
        status = "ok" if r["rc"] == 0 else (f"CRASH {r['signal']}" if r.get("signal") else f"failed rc={r['rc']}")
        print(f"{name:60s} {status:14s} {r['s']:6.1f} s {r.get('max_abs_diff_vs_cpu', '')}", flush=True)
        if r["rc"] != 0:
            tail = [ln for ln in (r.get("stdout", "") + r.get("stderr", "")).splitlines() if ln.strip()][-6:]
            print("    " + "\n    ".join(tail), flush=True)
    res["orders_crashed"] = sorted(n for n, r in results.items() if n.startswith("order:") and r["rc"] != 0)
    res["raw_crashed"] = sorted(n for n, r in results.items() if not n.startswith("order:") and r["rc"] != 0)
    res["max_abs_diff_gpu_vs_cpu"] = worst
    a.out.write_text(json.dumps(res, indent=1))
    print(
        f"orders crashed: {len(res['orders_crashed'])}/24; raw experiments crashed: {res['raw_crashed']}; "
        f"max |GPU - CPU| score {worst:.4f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
